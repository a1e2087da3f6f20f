"""The mean-field objective (``pipeline.student.mean_field_objective``): its expected gradient is the
reverse KL's of a product distribution to an enumerated joint (exactly), it is 0 where q is the
teacher's conditional, a tabular product per latent trained on sampled contexts of a many-answer
joint (the permutations of 3 letters) settles on consistent answers, and on a student the contexts'
conditionals are the teacher's."""

import itertools

import pytest
import torch

from pipeline.models.llada import LLaDA
from pipeline.student.mean_field_objective import latent_contexts, mean_field_loss, mean_field_surrogate
from pipeline.student.model import Student
from pipeline.student.policy_objective import pseudo_log_likelihood, sample_answers
from tests.conftest import make_checkpoint, one_step_inputs

PROMPT, GEN = 4, 5


def conditionals_of(joint: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, G, V) log p(. | x_-i) of the joint table (V,) * G at the answers x (N, G)."""
    G = x.shape[1]
    rows = []
    for i in range(G):
        column = joint.movedim(i, -1)[tuple(x[:, j] for j in range(G) if j != i)]  # (N, V)
        rows.append(torch.log(column / column.sum(dim=-1, keepdim=True)))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("entropy_weight", [1.0, 0.5])
def test_the_expected_gradient_is_the_reverse_kl_gradient_of_the_product(entropy_weight):
    """Averaging the surrogate over every context x weighted by q(x) gives, with respect to the logits,
    the gradient of lambda E_q[log q] - E_q[log p], enumerated over all V^G answers, for a joint p with
    no independence (G = 3, V = 3)."""
    G, V = 3, 3
    g = torch.Generator().manual_seed(0)
    joint = torch.rand((V,) * G, generator=g, dtype=torch.float64) ** 3
    joint = joint / joint.sum()
    logits = torch.randn(G, V, generator=g, dtype=torch.float64, requires_grad=True)
    answers = torch.tensor(list(itertools.product(range(V), repeat=G)))  # (V^G, G)
    q = logits.softmax(dim=-1)
    q_of = q[torch.arange(G), answers].prod(dim=1)  # (V^G,)
    log_p = joint[tuple(answers.T)].log()
    reverse = entropy_weight * (q_of * q_of.log()).sum() - (q_of * log_p).sum()
    (expected,) = torch.autograd.grad(reverse, logits)

    a = conditionals_of(joint, answers)  # (V^G, G, V)
    weights = q_of.detach()
    surrogate = sum(w * mean_field_surrogate(logits[None], a_x[None], entropy_weight) for w, a_x in zip(weights, a))
    (got,) = torch.autograd.grad(surrogate * G, logits)  # the surrogate averages over positions
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_the_surrogate_is_zero_with_zero_gradient_where_q_is_the_teachers_conditional():
    """lambda = 1 and q_i = p_T(. | x_-i): the conditional KL is 0 and so is its gradient; tokens q
    never emits (-inf logits, the mask token) contribute nothing and keep the gradient finite."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    logits[..., 5] = -torch.inf
    teacher = torch.log_softmax(logits, dim=-1).masked_fill(torch.isinf(logits), -30.0)
    logits.requires_grad_(True)
    value = mean_field_surrogate(logits, teacher)
    value.backward()
    assert abs(value.item()) < 1e-12
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() < 1e-12


def test_a_product_per_latent_settles_on_consistent_answers_of_a_many_answer_joint():
    """The teacher is uniform over the 6 permutations of 3 letters (every other string 1e-3 as likely);
    the product of its marginals is valid 2 times in 9. A tabular product per latent, one sampled
    context per step, every latent ends valid under argmax and under sampling, with more than one
    answer across latents."""
    n, K = 3, 6
    valid = set(itertools.permutations(range(n)))
    joint = torch.full((n,) * n, 1e-3, dtype=torch.float64)
    for perm in valid:
        joint[perm] = 1.0
    joint = joint / joint.sum()
    g = torch.Generator().manual_seed(0)
    logits = (0.3 * torch.randn(K, n, n, generator=g, dtype=torch.float64)).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for _ in range(600):
        uniforms = torch.rand(K, 1, n, generator=g, dtype=torch.float64)
        x = sample_answers(logits, uniforms, mask_id=n)[:, 0]  # (K, n); mask_id n: no token excluded
        loss = mean_field_surrogate(logits, conditionals_of(joint, x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    q = logits.detach().softmax(dim=-1)
    argmax = [tuple(row.tolist()) for row in q.argmax(dim=-1)]
    assert all(answer in valid for answer in argmax)
    p_valid = sum(q[k, torch.arange(n), torch.tensor(perm)].prod() for k in range(K) for perm in valid) / K
    assert p_valid > 0.9  # the product of marginals: 2 / 9
    assert len(set(argmax)) >= 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return LLaDA.from_pretrained(make_checkpoint(tmp_path_factory.mktemp("mean_field") / "m"))


def test_mean_field_loss_on_an_untrained_student_uses_the_teachers_conditionals(base):
    """At initialization (gate 0) the student is its base: the contexts are the base's one-step samples,
    their pseudo-log-likelihood the policy objective's over every position, the loss the surrogate of
    the teacher's conditionals averaged over the contexts, and the gradient reaches the soft prompt
    (anchor rows included)."""
    mask_id, S = base.config.mask_token_id, 3
    student, prompt, prompt_mask, latent, uniforms = one_step_inputs(base, S, PROMPT, GEN)
    out = mean_field_loss(student, prompt, prompt_mask, latent, uniforms, GEN, mask_id, entropy_weight=0.7,
                          anchor=torch.tensor([True, False]), chunk_rows=4)
    with torch.no_grad():
        logits = base(input_ids=torch.cat((prompt, torch.full((2, GEN), mask_id)), dim=1))[:, PROMPT:].float()
    logits = logits.masked_fill(torch.arange(logits.shape[-1]) == mask_id, -torch.inf)
    contexts = sample_answers(logits, uniforms, mask_id)  # (2, S, GEN)
    every = torch.ones(2 * S, GEN, dtype=torch.bool)
    expected_pll = pseudo_log_likelihood(base, prompt.repeat_interleave(S, dim=0), prompt_mask.repeat_interleave(S, dim=0),
                                         contexts.reshape(2 * S, GEN), every, mask_id).view(2, S)
    torch.testing.assert_close(out.pseudo_log_likelihood, expected_pll, rtol=1e-5, atol=1e-5)
    teacher = torch.zeros(2, GEN, logits.shape[-1], dtype=torch.float64)
    for b, s, i in itertools.product(range(2), range(S), range(GEN)):
        masked = contexts[b, s].clone()
        masked[i] = mask_id
        with torch.no_grad():
            row = base(input_ids=torch.cat((prompt[b], masked))[None])[0, PROMPT + i].double()
        teacher[b, i] += torch.log_softmax(row, dim=-1) / S
    torch.testing.assert_close(out.loss.detach(), mean_field_surrogate(logits, teacher, 0.7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.conditional_kl, mean_field_surrogate(logits, teacher, 1.0), rtol=1e-5, atol=1e-5)
    assert out.entropy > 0 and 1 <= out.distinct.min() and out.distinct.max() <= S
    out.loss.backward()
    assert student.soft_prompt.prompt_gate.grad.abs().sum() > 0


def test_latent_contexts_are_uniform_under_the_prior_and_a_function_of_the_latent():
    """u_i = Phi(z_i): the anchor's z = 0 gives the median 0.5 everywhere, coordinates past the answer
    length are unused, and under z ~ N(0, I) every u_i is uniform (deciles within sampling error)."""
    z = torch.randn(20000, 8, generator=torch.Generator().manual_seed(3))
    u = latent_contexts(z, 7)
    assert u.shape == (20000, 1, 7) and u.dtype == torch.float64
    assert torch.equal(latent_contexts(torch.zeros(2, 8), 7), torch.full((2, 1, 7), 0.5, dtype=torch.float64))
    changed = z.clone()
    changed[:, 7] += 1.0
    assert torch.equal(latent_contexts(changed, 7), u)
    deciles = torch.quantile(u[:, 0, :].float(), torch.linspace(0.1, 0.9, 9), dim=0)  # (9, 7)
    torch.testing.assert_close(deciles, torch.linspace(0.1, 0.9, 9)[:, None].expand(9, 7), atol=0.015, rtol=0)


def test_latent_contexts_need_a_coordinate_of_z_per_answer_position(base):
    from pipeline.core.errors import ParamsError
    from pipeline.student.distillation import StudentDistillation
    from pipeline.student.params import StudentParams
    from pipeline.student.soft_prompt import SoftPromptConfig

    config = SoftPromptConfig(prompt_length=2, hidden_size=8, latent_dim=3)
    params = StudentParams(soft_prompt=config, mean_field_weight=1.0, mean_field_contexts="latent")
    with pytest.raises(ParamsError, match=r"latent_dim >= the answer length 5 .* got 3"):
        StudentDistillation(Student(base, config=config), params, gen_length=GEN)
    StudentDistillation(Student(base, config=config), params, gen_length=3)  # enough coordinates
