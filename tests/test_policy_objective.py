"""The policy objective (``pipeline.student.policy_objective``): the leave-one-out baseline leaves the
gradient's expectation unchanged (exactly, on an enumerable case), the reward is the teacher's
pseudo-log-likelihood up to the first EOS, samples are pure functions of their uniforms."""

import itertools

import pytest
import torch

from pipeline.models.llada import LLaDA
from pipeline.student.policy_objective import (answer_extent, leave_one_out, policy_loss, policy_surrogate,
                                               pseudo_log_likelihood, sample_answers)
from tests.conftest import make_checkpoint, one_step_inputs

PROMPT, GEN = 4, 5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return LLaDA.from_pretrained(make_checkpoint(tmp_path_factory.mktemp("policy") / "m"))


def test_leave_one_out_baseline_keeps_the_expected_gradient():
    """Enumerating every group of M = 3 samples from a product policy over G = 2 positions of V = 3
    tokens: E[grad of the surrogate with LOO advantages] = -grad E_q[R] (float64, to rounding), while
    a baseline that uses the sample's own reward (the group mean) does not."""
    logits = torch.randn(1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    answers = list(itertools.product(range(3), repeat=2))
    reward = {x: float(r) for x, r in zip(answers, torch.randn(len(answers), generator=torch.Generator().manual_seed(1)))}

    def log_q(theta, x):
        return torch.log_softmax(theta, dim=-1)[0, torch.arange(2), torch.tensor(x)].sum()

    theta = logits.clone().requires_grad_(True)
    exact = sum(log_q(theta, x).exp() * reward[x] for x in answers)
    (expected,) = torch.autograd.grad(-exact, theta)

    def expected_estimate(advantages_of):
        total = torch.zeros_like(logits)
        for group in itertools.product(answers, repeat=3):
            theta = logits.clone().requires_grad_(True)
            lq = torch.stack([log_q(theta, x) for x in group])[None]  # (1, M)
            rewards = torch.tensor([[reward[x] for x in group]], dtype=torch.float64)
            (grad,) = torch.autograd.grad(policy_surrogate(lq, advantages_of(rewards)), theta)
            total += lq.detach().sum().exp() * grad  # the group's probability
        return total

    torch.testing.assert_close(expected_estimate(leave_one_out), expected, rtol=1e-9, atol=1e-12)
    biased = expected_estimate(lambda r: r - r.mean(dim=1, keepdim=True))
    assert not torch.allclose(biased, expected, rtol=1e-3)


def test_leave_one_out_is_the_reward_minus_the_others_mean():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    assert torch.equal(leave_one_out(rewards), torch.tensor([[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]]))


def test_answer_extent_ends_at_the_first_eos():
    eos = 0
    answers = torch.tensor([[5, 6, 0, 0, 7], [0, 3, 3, 3, 3], [4, 4, 4, 4, 4]])
    assert answer_extent(answers, eos).tolist() == [[True, True, True, False, False], [True, False, False, False, False],
                                                     [True] * 5]


def test_samples_follow_the_probabilities_and_never_mask(base):
    mask_id = base.config.mask_token_id
    V = base.config.embedding_size
    logits = torch.randn(1, 2, V, generator=torch.Generator().manual_seed(2))
    logits[..., mask_id] = 10.0  # the most likely token, and never sampled
    N = 2000
    uniforms = ((torch.arange(N, dtype=torch.float64) + 0.5) / N)[None, :, None].expand(1, N, 2)
    answers = sample_answers(logits, uniforms, mask_id)
    assert (answers != mask_id).all()
    probs = torch.softmax(logits.double().masked_fill(torch.arange(V) == mask_id, -torch.inf), dim=-1)
    for position in range(2):
        counts = torch.bincount(answers[0, :, position], minlength=V).double() / N
        assert torch.allclose(counts, probs[0, position], atol=1.0 / N)
    assert torch.equal(sample_answers(logits, uniforms, mask_id), answers)


def test_reward_is_the_teachers_pseudo_log_likelihood_up_to_the_first_eos(base):
    """One teacher row per scored position, in chunks: equal to a loop over the positions."""
    mask_id, eos = base.config.mask_token_id, 0
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, base.config.vocab_size, (3, PROMPT), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0
    answers = torch.randint(1, base.config.vocab_size, (3, GEN), generator=g)
    answers[0, 2] = eos
    extent = answer_extent(answers, eos)
    got = pseudo_log_likelihood(base, prompt, prompt_mask, answers, extent, mask_id, chunk_rows=4)
    expected = torch.zeros(3, dtype=torch.float64)
    for n in range(3):
        for i in range(GEN if n else 3):
            masked = answers[n].clone()
            masked[i] = mask_id
            with torch.no_grad():
                logits = base(input_ids=torch.cat((prompt[n], masked))[None],
                              attention_mask=torch.cat((prompt_mask[n], torch.ones(GEN, dtype=torch.long)))[None])
            expected[n] += torch.log_softmax(logits[0, PROMPT + i].double(), dim=-1)[answers[n, i]]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_policy_loss_on_an_untrained_student_scores_the_teachers_samples(base):
    """At initialization (gate 0) the student is its base: the samples are the base's one-step samples,
    the reward their pseudo-log-likelihood, and the gradient reaches the soft prompt."""
    mask_id, eos = base.config.mask_token_id, 0
    student, prompt, prompt_mask, latent, uniforms = one_step_inputs(base, 4, PROMPT, GEN)
    out = policy_loss(student, prompt, prompt_mask, latent, uniforms, GEN, mask_id, eos, entropy_weight=0.1)
    with torch.no_grad():
        logits = base(input_ids=torch.cat((prompt, torch.full((2, GEN), mask_id)), dim=1))[:, PROMPT:]
    answers = sample_answers(logits, uniforms, mask_id)
    extent = answer_extent(answers, eos)
    expected = pseudo_log_likelihood(base, prompt.repeat_interleave(4, dim=0), prompt_mask.repeat_interleave(4, dim=0),
                                     answers.reshape(8, GEN), extent.reshape(8, GEN), mask_id).view(2, 4)
    torch.testing.assert_close(out.reward, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.length, extent.sum(dim=2))
    out.loss.backward()
    assert student.soft_prompt.prompt_gate.grad.abs().sum() > 0
