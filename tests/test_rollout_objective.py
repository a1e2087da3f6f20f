"""The rollout objective: targets are what the teacher's sampler committed between two steps, the
step sampler covers every pair, the latent selection trains the winner exactly as if it were fixed,
and without a latent the loss is plain cross-entropy."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.generation.noise import CounterNoise
from pipeline.generation.sampler import SamplerOptions, generate, sample_trajectory, sampler_network
from pipeline.models import logit_rows
from pipeline.models.layers import upcast
from pipeline.models.llada import LLaDA
from pipeline.student.model import Student
from pipeline.student.rollout_objective import (Selection, repeat_rows, responsibilities, rollout_interval,
                                                rollout_loss, sample_draws, sample_steps, select_latents, take_rows)
from tests.conftest import assert_float64_close, make_checkpoint

PROMPT, GEN, STEPS = 5, 8, 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return LLaDA.from_pretrained(make_checkpoint(tmp_path_factory.mktemp("rollout") / "m"))


@pytest.fixture(scope="module")
def recorded(base):
    """A sampled trajectory of 3 prompts (2 blocks) and the network's input at every step, plus the
    final sequence (the state after the last step)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, base.config.vocab_size, (3, PROMPT), generator=g)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    states = []

    def predictor(ids, attention_mask):
        states.append(ids.clone())
        return base(input_ids=ids, attention_mask=attention_mask)

    trajectory = sample_trajectory(predictor, prompt, SamplerOptions(steps=STEPS, gen_length=GEN, block_length=GEN // 2,
                                   temperature=1.0), mask_id=base.config.mask_token_id, attention_mask=mask,
                                   noise=CounterNoise(torch.tensor([11, 12, 13])))
    return prompt, mask, trajectory, states + [trajectory.sequences]


def reference_row_losses(answer_logits, tokens, targets):
    """Each row's mean cross-entropy at its targets from the full answer logits (N, G, V): the
    objective as it was computed before the head ran on the target positions only."""
    ce = F.cross_entropy(upcast(answer_logits).transpose(1, 2), tokens, reduction="none")  # (N, G)
    return (ce * targets).sum(dim=1) / targets.sum(dim=1).clamp(min=1)


def latent_student(base):
    """A latent student whose output depends strongly on z (a random gate, a scaled-up MLP)."""
    student = Student(base, prompt_length=2, hidden_size=8, latent_dim=4)
    with torch.no_grad():
        student.soft_prompt.prompt_gate.normal_(generator=torch.Generator().manual_seed(3))
        for p in student.soft_prompt.prompt_mlp.parameters():
            p.mul_(20)
    return student


def interval_at(recorded, k: int, k_end: int, mask_id: int):
    prompt, mask, trajectory, _ = recorded
    n = len(prompt)
    return rollout_interval(prompt, mask, trajectory.sequences[:, PROMPT:], trajectory.reveal_step,
                            torch.full((n,), k), torch.full((n,), k_end), mask_id)


def test_targets_are_what_the_sampler_committed_between_the_two_steps(base, recorded):
    mask_id = base.config.mask_token_id
    states = recorded[3]
    assert len(states) == STEPS + 1
    for k in range(STEPS):
        for k_end in range(k + 1, STEPS + 1):
            interval = interval_at(recorded, k, k_end, mask_id)
            before, after = states[k][:, PROMPT:], states[k_end][:, PROMPT:]
            assert torch.equal(interval.input_ids, states[k])  # x_t is the sampler's own input at step k
            committed = (before == mask_id) & (after != mask_id)
            assert torch.equal(interval.targets, committed)
            assert committed.any()
            assert torch.equal(interval.tokens[committed], after[committed])
            assert torch.equal(interval.t, (before == mask_id).float().mean(dim=1))
            assert torch.equal(interval.r, (after == mask_id).float().mean(dim=1))
            assert interval.one_step.all() == (k == 0)
    assert torch.equal(interval_at(recorded, 0, STEPS, mask_id).t, torch.ones(3))


def test_step_sampler_covers_every_pair_with_the_requested_fractions():
    n = 40000
    uniforms = torch.rand(4, n, generator=torch.Generator().manual_seed(0))
    k, k_end = sample_steps(7, uniforms, one_step_fraction=0.3, r0_fraction=0.4)
    assert (k >= 0).all() and (k < 7).all() and (k_end > k).all() and (k_end <= 7).all()
    assert abs((k == 0).float().mean() - 0.3) < 0.01
    assert abs((k_end == 7).float().mean() - (0.4 + 0.6 * (1 / (7 - k.float())).mean())) < 0.01
    pairs = set(zip(k.tolist(), k_end.tolist()))
    assert pairs == {(a, b) for a in range(7) for b in range(a + 1, 8)}
    k, k_end = sample_steps(7, uniforms, one_step_fraction=1.0, r0_fraction=1.0)
    assert (k == 0).all() and (k_end == 7).all()
    k, k_end = sample_steps(1, uniforms, one_step_fraction=0.0, r0_fraction=0.0)
    assert (k == 0).all() and (k_end == 1).all()


def test_without_a_latent_the_loss_is_plain_cross_entropy(base, recorded):
    student = Student(base, prompt_length=2, hidden_size=8)
    with torch.no_grad():
        student.soft_prompt.prompt_gate.normal_(generator=torch.Generator().manual_seed(1))
    interval = interval_at(recorded, 1, 3, base.config.mask_token_id)
    out = rollout_loss(student, interval, None, base.config.mask_token_id)
    logits = student(input_ids=interval.input_ids, attention_mask=interval.attention_mask, r=interval.r, t=interval.t)
    expected = torch.stack([F.cross_entropy(logits[b, PROMPT:][interval.targets[b]],
                                            interval.tokens[b][interval.targets[b]]) for b in range(3)]).mean()
    assert torch.allclose(out.loss, expected, rtol=1e-6) and out.selection is None
    # one draw of a latent student is trained as it is: plain CE given that z
    latent_student = Student(base, prompt_length=2, hidden_size=8, latent_dim=4)
    z = torch.randn(3, 1, 4, generator=torch.Generator().manual_seed(2))
    single = rollout_loss(latent_student, interval, z, base.config.mask_token_id)
    logits = latent_student(input_ids=interval.input_ids, attention_mask=interval.attention_mask, r=interval.r,
                            t=interval.t, latent=z[:, 0])
    assert torch.allclose(single.loss, reference_row_losses(logits[:, PROMPT:], interval.tokens, interval.targets).mean())


def test_latent_selection_trains_the_winner_as_if_it_were_fixed(base, recorded):
    mask_id = base.config.mask_token_id
    student = latent_student(base)
    interval = interval_at(recorded, 0, STEPS, mask_id)
    latents = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(4))
    student.train()
    selected = rollout_loss(student, interval, latents, mask_id)
    assert student.training  # scoring in eval mode does not leave the student there
    selected.loss.backward()
    grads = [p.grad.clone() for p in student.soft_prompt.parameters()]
    student.zero_grad()

    # each draw's loss, computed one draw at a time: the winner is the argmin
    with torch.no_grad():
        per_draw = torch.stack([reference_row_losses(student(input_ids=interval.input_ids, attention_mask=interval.attention_mask,
                                                   r=interval.r, t=interval.t, latent=latents[:, j])[:, PROMPT:],
                                           interval.tokens, interval.targets) for j in range(5)], dim=1)
    assert torch.allclose(selected.selection.losses, per_draw, rtol=1e-5)
    winner = latents[torch.arange(3), per_draw.argmin(dim=1)]
    assert torch.equal(selected.selection.winner, winner)
    assert (per_draw.argmin(dim=1) != 0).any()  # not trivially the first draw
    assert (selected.selection.gap >= 0).all() and (selected.selection.gap > 0).any()

    fixed = rollout_loss(student, interval, winner[:, None], mask_id)
    fixed.loss.backward()
    assert torch.equal(fixed.loss, selected.loss)
    for a, p in zip(grads, student.soft_prompt.parameters()):
        assert torch.equal(a, p.grad)


def test_distinct_greedy_answers_across_draws(base, recorded):
    mask_id = base.config.mask_token_id
    interval = interval_at(recorded, 0, STEPS, mask_id)
    student = Student(base, prompt_length=2, hidden_size=8, latent_dim=4)
    latents = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(5))
    # a zero gate ignores z: one distinct answer, no gap
    ignored = select_latents(student, interval, latents, mask_id)
    assert (ignored.distinct == 1).all() and torch.equal(ignored.gap, torch.zeros(3))
    with torch.no_grad():
        student.soft_prompt.prompt_gate.fill_(5.0)
        for p in student.soft_prompt.prompt_mlp.parameters():
            p.normal_(std=3.0, generator=torch.Generator().manual_seed(6))
    used = select_latents(student, interval, latents, mask_id)
    expected = []
    for b in range(3):
        with torch.no_grad():
            logits = student(input_ids=interval.input_ids[b:b + 1].expand(4, -1),
                             attention_mask=interval.attention_mask[b:b + 1].expand(4, -1),
                             r=interval.r[b], t=interval.t[b], latent=latents[b])[:, PROMPT:]
        logits[..., mask_id] = -torch.inf
        expected.append(len({tuple(a) for a in logits.argmax(-1).tolist()}))
    assert used.distinct.tolist() == expected and max(expected) > 1


def test_annealed_selection_spans_winner_takes_all_to_the_mean_of_draws(base, recorded):
    mask_id = base.config.mask_token_id
    student = latent_student(base)
    interval = interval_at(recorded, 0, STEPS, mask_id)
    latents = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(4))
    hard = rollout_loss(student, interval, latents, mask_id)
    cold = rollout_loss(student, interval, latents, mask_id, Selection("weighted", 1e-6))
    hot = rollout_loss(student, interval, latents, mask_id, Selection("weighted", 1e6))
    assert torch.allclose(cold.loss, hard.loss, rtol=1e-5)
    assert torch.allclose(hot.loss, hard.selection.losses.mean(), rtol=1e-4)
    assert torch.allclose(cold.selection.losses, hard.selection.losses, rtol=1e-5)
    assert torch.equal(cold.selection.distinct, hard.selection.distinct)


def reference_rollout_loss(student, interval, latents, mask_id, selection_temperature=0.0):
    """The objective as computed before the head ran on target rows only: full answer logits
    (N, G, V) for every draw. Kept here as the oracle."""
    def answer_logits(rows, latent):
        return student(input_ids=rows.input_ids, attention_mask=rows.attention_mask, r=rows.r, t=rows.t,
                       latent=latent)[:, PROMPT:]

    if latents is None:
        return reference_row_losses(answer_logits(interval, None), interval.tokens, interval.targets).mean()
    B, K, d = latents.shape
    expanded = repeat_rows(interval, K)
    if selection_temperature > 0:
        losses = reference_row_losses(answer_logits(expanded, latents.reshape(B * K, d)), expanded.tokens,
                                      expanded.targets).view(B, K)
        return (torch.softmax(-losses.detach() / selection_temperature, dim=1) * losses).sum(dim=1).mean()
    with torch.no_grad():
        losses = reference_row_losses(answer_logits(expanded, latents.reshape(B * K, d)), expanded.tokens,
                                      expanded.targets).view(B, K)
    winner = latents[torch.arange(B), losses.argmin(dim=1)]
    return reference_row_losses(answer_logits(interval, winner), interval.tokens, interval.targets).mean()


@pytest.mark.parametrize("draws,temperature", [(0, 0.0), (1, 0.0), (5, 0.0), (5, 0.5)])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_loss_on_target_rows_equals_the_full_logits_loss(base, recorded, monkeypatch, draws, temperature, chunk_rows):
    """Float64: the head on the target rows (the masked answer rows when draws are scored), in chunks
    of 3 rows or one, gives the loss and soft-prompt gradient of the full answer logits."""
    if chunk_rows is not None:
        monkeypatch.setattr(logit_rows, "LOGITS_CHUNK_BYTES", chunk_rows * 4 * base.config.embedding_size)
    student = latent_student(copy.deepcopy(base)).double() if draws else Student(copy.deepcopy(base), prompt_length=2,
                                                                                 hidden_size=8).double()
    if not draws:
        with torch.no_grad():
            student.soft_prompt.prompt_gate.normal_(generator=torch.Generator().manual_seed(1))
    mask_id = base.config.mask_token_id
    interval = interval_at(recorded, 1, 3, mask_id)
    interval = dataclasses.replace(interval, t=interval.t.double(), r=interval.r.double())
    latents = torch.randn(3, draws, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64) if draws else None

    def gradient(fn):
        student.zero_grad()
        value = fn()
        value.backward()
        return value.detach(), [p.grad.clone() for p in student.soft_prompt.parameters()]

    expected = gradient(lambda: reference_rollout_loss(student, interval, latents, mask_id, temperature))
    selection = Selection("weighted" if temperature else "best", temperature)
    out = gradient(lambda: rollout_loss(student, interval, latents, mask_id, selection).loss)
    # equal up to float64 rounding (the head's gradient is summed over fewer rows)
    assert_float64_close(out[0], expected[0], "loss")
    for a, b in zip(out[1], expected[1]):
        assert_float64_close(a, b, "soft-prompt gradient")
    assert any(g.abs().sum() > 0 for g in expected[1])


def test_anchor_rows_train_without_selection(base, recorded):
    """Greedy rows are scored given the anchor (their draws unused, no selection); the other rows are
    selected among their draws exactly as in a batch without anchor rows."""
    mask_id = base.config.mask_token_id
    student = latent_student(base)
    interval = interval_at(recorded, 0, STEPS, mask_id)
    latents = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(6))
    anchor = torch.tensor([True, False, True])
    out = rollout_loss(student, interval, latents, mask_id, anchor=anchor)
    logits = student(input_ids=interval.input_ids, attention_mask=interval.attention_mask, r=interval.r,
                     t=interval.t, latent=torch.zeros(3, 4), anchor=torch.ones(3, dtype=torch.bool))
    expected = reference_row_losses(logits[:, PROMPT:], interval.tokens, interval.targets)
    assert torch.allclose(out.rows[anchor], expected[anchor], rtol=1e-5)
    alone = rollout_loss(student, take_rows(interval, ~anchor), latents[1:2], mask_id)
    assert torch.allclose(out.rows[1], alone.rows[0], rtol=1e-5)
    assert out.selection.losses.shape == (1, 4) and torch.equal(out.anchor, anchor)
    assert torch.allclose(out.loss, out.rows.mean())


def test_the_anchor_learns_the_greedy_rollouts_while_draws_learn_the_sampled_ones(base):
    """A tiny run: two prompts, their greedy rollouts at 4 steps on the anchor and a sampled rollout
    each on drawn latents; afterwards the anchor decodes the greedy rollouts in one step."""
    torch.manual_seed(0)
    mask_id = base.config.mask_token_id
    prompt = torch.randint(3, base.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompt)
    options = SamplerOptions(steps=4, gen_length=GEN)
    greedy = sample_trajectory(sampler_network(base), prompt, options, mask_id=mask_id, attention_mask=mask)
    sampled = sample_trajectory(sampler_network(base), prompt, dataclasses.replace(options, temperature=1.0), mask_id=mask_id,
                                attention_mask=mask, noise=CounterNoise(torch.tensor([1, 2])))
    student = Student(base, prompt_length=4, hidden_size=32, latent_dim=4, anchor="flag")

    def one_step_anchor():
        return generate(sampler_network(student, anchor=True), prompt, SamplerOptions.one_step(GEN),
                        mask_id=mask_id, attention_mask=mask)[:, PROMPT:]

    assert not torch.equal(one_step_anchor(), greedy.sequences[:, PROMPT:])  # the base alone does not
    tokens = torch.cat((greedy.sequences, sampled.sequences))[:, PROMPT:]
    reveal = torch.cat((greedy.reveal_step, sampled.reveal_step))
    anchor = torch.tensor([True, True, False, False])
    optimizer = torch.optim.Adam(student.soft_prompt.parameters(), lr=1e-2)
    for step in range(300):
        k, k_end = sample_steps(4, torch.rand(4, 4), one_step_fraction=0.75, r0_fraction=0.75)
        interval = rollout_interval(prompt.repeat(2, 1), mask.repeat(2, 1), tokens, reveal, k, k_end, mask_id)
        loss = rollout_loss(student, interval, torch.randn(4, 2, 4), mask_id, anchor=anchor).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(one_step_anchor(), greedy.sequences[:, PROMPT:])


def test_responsibilities_sum_to_one_and_reduce_to_winner_takes_all():
    log_q = torch.tensor([[-3.0, -1.0, -2.0, -1.5], [-0.5, -4.0, -0.7, -9.0]], dtype=torch.float64)
    for tau in (1e-3, 0.5, 1.0, 7.0):
        r = responsibilities(log_q, tau)
        assert torch.allclose(r.sum(dim=1), torch.ones(2, dtype=torch.float64))
    winner = F.one_hot(log_q.argmax(dim=1), 4).double()
    assert torch.allclose(responsibilities(log_q, 1e-4), winner)
    assert torch.equal(responsibilities(log_q, 0.0), winner)
    # tau = 1: the exact posterior q(answer | k) / sum_j q(answer | j) of a uniform prior
    assert torch.allclose(responsibilities(log_q, 1.0), log_q.exp() / log_q.exp().sum(dim=1, keepdim=True))
    assert torch.allclose(responsibilities(log_q, 1e6), torch.full((2, 4), 0.25, dtype=torch.float64))


def test_draws_are_sampled_in_proportion_to_their_weights():
    """Evenly spaced uniforms are the weights' quantiles: each draw is picked in proportion to its
    weight (to 1/N), a zero-weight draw never."""
    weights = torch.tensor([[0.5, 0.0, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    N = 1000
    uniforms = ((torch.arange(N, dtype=torch.float64) + 0.5) / N).expand(2, N)
    picks = sample_draws(weights, uniforms)
    counts = torch.stack([torch.bincount(row, minlength=4) for row in picks]).double() / N
    assert torch.allclose(counts, weights, atol=1.0 / N) and counts[0, 1] == 0


def test_posterior_selection_trains_the_sampled_draws(base, recorded):
    """Soft EM trains the draws picked from the responsibilities, each as if it were fixed; at tau = 0
    it is winner-takes-all whatever the uniforms."""
    mask_id = base.config.mask_token_id
    student = latent_student(base)
    interval = interval_at(recorded, 0, STEPS, mask_id)
    latents = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(4))
    uniforms = torch.tensor([[0.1, 0.7], [0.5, 0.99], [0.0, 0.3]])
    best = rollout_loss(student, interval, latents, mask_id)
    greedy_posterior = rollout_loss(student, interval, latents, mask_id, Selection("posterior", 0.0, uniforms[:, :1]))
    assert torch.allclose(greedy_posterior.loss, best.loss, rtol=1e-6)
    out = rollout_loss(student, interval, latents, mask_id, Selection("posterior", 1.0, uniforms))
    targets = interval.targets.sum(dim=1, keepdim=True)
    expected_weights = torch.softmax(-out.selection.losses * targets, dim=1)
    assert torch.allclose(out.selection.weights, expected_weights, rtol=1e-5)
    assert torch.allclose(out.selection.credit.sum(dim=1), torch.ones(3))
    picks = sample_draws(expected_weights, uniforms)
    fixed = [rollout_loss(student, interval, latents[torch.arange(3), picks[:, j]][:, None], mask_id).rows
             for j in range(2)]
    assert torch.allclose(out.rows, (fixed[0] + fixed[1]) / 2, rtol=1e-5)
