"""The MeanFlow pieces: dense reconstruction, r sampling, tangents, the JVP target and the losses."""

import math

import pytest
import torch

from pipeline.core.counter_random import counter_uniform
from pipeline.models.registry import load_model
from pipeline.student.meanflow import (MeanFlowOptions, TeacherRows, adaptive_weighted_mean, average_velocity_jvp,
                                       dense_logprobs, meanflow_loss, meanflow_target, sample_r, tangent, token_losses)
from pipeline.student.model import Student
from tests.conftest import assert_float64_close


def topk_of(logits, k):
    values, ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return ids, values.half()


@pytest.mark.parametrize("tail", ["uniform", "drop"])
def test_dense_reconstruction_has_unit_mass_and_keeps_the_top_k(tail):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids, values = topk_of(logits, 8)
    dense = dense_logprobs(ids, values, 50, tail)
    assert torch.allclose(dense.exp().sum(-1), torch.ones(6), atol=1e-6)
    kept = dense.gather(1, ids)
    if tail == "uniform":
        assert torch.allclose(kept, values.float(), atol=1e-3)
        others = torch.ones(6, 50, dtype=torch.bool).scatter(1, ids, False)
        rest = dense[others].view(6, 42)
        assert torch.allclose(rest, rest[:, :1].expand(6, 42))  # the tail is flat
        tail_mass = 1 - torch.log_softmax(logits, -1).gather(1, ids).exp().sum(-1)
        assert torch.allclose(rest.exp().sum(-1), tail_mass, atol=2e-3)
    else:
        assert torch.isinf(dense).sum() == 6 * 42
        assert torch.allclose(kept.exp().sum(-1), torch.ones(6), atol=1e-6)


def test_fp16_rounding_above_unit_mass_leaves_no_tail():
    ids = torch.tensor([[0, 1]])
    values = torch.log(torch.tensor([[0.5, 0.5004]])).half()
    dense = dense_logprobs(ids, values, 10)
    assert torch.allclose(dense.exp().sum(), torch.tensor(1.0)) and torch.isinf(dense[0, 2:]).all()


@pytest.mark.parametrize("source", ["generator", "counter"])
def test_sample_r(source):
    t = torch.rand(20000, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.1
    if source == "generator":
        r = sample_r(t, 0.25, torch.Generator().manual_seed(2))
    else:
        rows = torch.arange(20000)
        r = sample_r(t, 0.25, uniforms=(counter_uniform(0, rows, 1), counter_uniform(0, rows, 2)))
    equal = r == t
    assert abs(equal.float().mean().item() - 0.25) < 0.02
    assert (r[~equal] < t[~equal]).all() and (r >= 0).all()
    assert abs((r[~equal] / t[~equal]).mean().item() - 0.5) < 0.02


def test_tangents():
    g = torch.Generator().manual_seed(3)
    E = torch.randn(12, 5, generator=g)
    v = torch.randn(2, 4, 12, generator=g)
    masked = torch.tensor([[True, False, True, False], [False, False, False, True]])
    t = torch.tensor([0.5, 0.25])
    e_bar = torch.softmax(v, -1) @ E
    linear = tangent("linear", v[masked], masked, E, mask_id=11, t=t)
    assert torch.allclose(linear[0, 0], (E[11] - e_bar[0, 0]) / 0.5, atol=1e-6)
    assert torch.allclose(linear[1, 3], (E[11] - e_bar[1, 3]) / 0.25, atol=1e-6)
    assert (linear[~masked] == 0).all()
    seed = tangent("seed", v[masked], masked, E, mask_id=11, t=t)
    assert torch.allclose(seed[masked], -(linear * t[:, None, None])[masked], atol=1e-6)


@pytest.fixture
def student64(any_checkpoint):
    student = Student(load_model(any_checkpoint, dtype=torch.float64), prompt_length=3, hidden_size=16)
    with torch.no_grad():
        student.soft_prompt.prompt_gate.normal_(0, 1, generator=torch.Generator().manual_seed(4))
    return student


def jvp_inputs(student, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, student.base.config.vocab_size, (2, 7), generator=g)
    masked = torch.zeros(2, 7, dtype=torch.bool)
    masked[:, 4:] = True
    ids[masked] = student.base.config.mask_token_id
    e = student.base.embed(ids).detach()
    t = torch.tensor([0.8, 0.5], dtype=torch.float64)
    v = torch.randn(2, 7, student.base.config.embedding_size, generator=g, dtype=torch.float64)
    de = tangent("linear", v[masked], masked, student.base.embedding_weight.detach(),
                 student.base.config.mask_token_id, t)
    return e, t, v, masked, de, ids


def test_target_equals_v_when_r_equals_t(student64):
    e, t, v, masked, de, _ = jvp_inputs(student64)
    fn = lambda z_, t_: student64(inputs_embeds=z_, r=t, t=t_, attention="math")  # noqa: E731
    _, du_dt = average_velocity_jvp(fn, e, t, de, keep_graph=False)
    assert du_dt.abs().max() > 0
    assert torch.equal(meanflow_target(v, du_dt, t, t), v)


def test_jvp_matches_finite_differences(student64):
    e, t, v, masked, de, _ = jvp_inputs(student64)
    r = torch.tensor([0.1, 0.3], dtype=torch.float64)
    fn = lambda z_, t_: student64(inputs_embeds=z_, r=r, t=t_, attention="math")  # noqa: E731
    _, du_dt = average_velocity_jvp(fn, e, t, de, keep_graph=False)
    h = 1e-6
    with torch.no_grad():
        fd = (fn(e + h * de, t + h) - fn(e - h * de, t - h)) / (2 * h)
    assert (du_dt - fd).abs().max() / fd.abs().max() < 1e-7
    target = meanflow_target(v, du_dt, r, t)
    assert torch.allclose(target, v - (t - r)[:, None, None] * du_dt) and not target.requires_grad


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_loss_is_zero_at_the_target_and_positive_elsewhere(kind):
    target = torch.randn(5, 30, generator=torch.Generator().manual_seed(6))
    assert token_losses(kind, target.clone(), target).abs().max() < 1e-6
    assert token_losses(kind, target + 3.0, target).abs().max() < 1e-5  # logits are shift invariant
    assert (token_losses(kind, target.flip(-1), target) > 0).all()
    dropped = target.clone()
    dropped[:, 10:] = -torch.inf  # a dropped (or fp16-vanished) tail: finite, and only the defined ids count
    losses = token_losses(kind, target, dropped)
    assert torch.isfinite(losses).all() and (losses > 0).all()
    if kind == "mse":
        log_u, log_target = target.log_softmax(-1)[:, :10], dropped[:, :10].log_softmax(-1)
        assert torch.allclose(losses, (log_u - log_target).pow(2).mean(-1))
    broken = target.clone()
    broken[0, 3] = torch.nan  # a broken target must not be silently ignored
    assert torch.isnan(token_losses(kind, target, broken)[0])


def test_ce_and_adaptive_weighting():
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 3, 8, 1])
    ce = token_losses("ce", logits, logits, labels)
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
    losses = torch.tensor([0.5, 2.0], requires_grad=True)
    weighted = adaptive_weighted_mean(losses, power=1.0, eps=1e-3)
    weighted.backward()
    assert math.isclose(weighted.item(), (0.5 / 0.501 + 2.0 / 2.001) / 2, rel_tol=1e-6)
    assert torch.allclose(losses.grad, torch.tensor([1 / 0.501, 1 / 2.001]) / 2)  # weights are stop-gradient
    assert adaptive_weighted_mean(losses.detach(), power=0.0) == losses.detach().mean()


def test_no_grad_jvp_then_forward_gives_the_same_gradient(any_checkpoint):
    """The cheaper pattern (JVP without graph, then an ordinary forward for u, on the rows with r < t)
    equals one grad-mode JVP, through the objective training uses; its target is v - (t - r) du/dt."""
    student = Student(load_model(any_checkpoint, dtype=torch.float64), prompt_length=3, hidden_size=16)
    with torch.no_grad():
        student.soft_prompt.prompt_gate.normal_(0, 1, generator=torch.Generator().manual_seed(8))
    e, t, v, masked, de, ids = jvp_inputs(student, seed=9)
    r = torch.tensor([0.2, 0.5], dtype=torch.float64)
    attention_mask = torch.ones_like(ids)

    def objective(jvp):
        student.zero_grad()
        out = meanflow_loss(student, ids, attention_mask, masked, t, r, v[masked], MeanFlowOptions(jvp=jvp), answer_length=3,
                             keep_target=True)
        out.loss.backward()
        return out, [p.grad.clone() for p in student.soft_prompt.parameters()]

    out_a, grads_a = objective("grad")
    out_b, grads_b = objective("no_grad")
    assert torch.allclose(out_a.loss, out_b.loss, rtol=1e-10)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads_a)
    fn = lambda z_, t_: student(inputs_embeds=z_, r=r, t=t_, attention_mask=attention_mask, attention="math")  # noqa: E731
    _, du_dt = average_velocity_jvp(fn, e, t, de, keep_graph=False)
    assert torch.allclose(out_b.target, meanflow_target(v, du_dt, r, t)[masked], rtol=1e-10)
    assert not out_b.target.requires_grad and out_b.du_dt_abs > 0
    assert torch.equal(out_b.equal, (r == t)[masked.nonzero()[:, 0]])  # row 1 has r = t: its target is v


def reference_meanflow_loss(student, input_ids, attention_mask, masked, t, r, v, params, answer_length, x0=None):
    """The objective as computed before memory followed the masked positions: full (B, T, V) logits,
    a JVP of the logits, du/dt allocated for every position. Kept here as the oracle."""
    base = student.base
    with torch.no_grad():
        e = base.embed(input_ids)
    de_dt = tangent(params.tangent, v, masked, base.embedding_weight.detach(), base.config.mask_token_id, t)
    jvp_rows = torch.ones_like(t, dtype=torch.bool) if params.jvp == "grad" else r < t

    def average_velocity(z_, t_):
        return student(inputs_embeds=z_, r=r[jvp_rows], t=t_, attention_mask=attention_mask[jvp_rows], attention="math")

    du_dt = torch.zeros(*masked.shape, base.config.embedding_size, dtype=e.dtype)
    if jvp_rows.any():
        u, du_dt[jvp_rows] = average_velocity_jvp(average_velocity, e[jvp_rows], t[jvp_rows], de_dt[jvp_rows],
                                                  keep_graph=params.jvp == "grad")
    if params.jvp == "no_grad":
        u = student(inputs_embeds=e, r=r, t=t, attention_mask=attention_mask)
    row = masked.nonzero()[:, 0]
    target = meanflow_target(v, du_dt[masked], r[row], t[row])
    losses = token_losses(params.loss, u[masked], target)
    normalizer = masked.shape[0] * answer_length
    loss = adaptive_weighted_mean(losses, params.adaptive_power, params.adaptive_eps, normalizer=normalizer)
    if params.ce_weight:
        loss = loss + params.ce_weight * token_losses("ce", u[masked], target, x0[masked]).sum() / normalizer
    return loss, target


@pytest.mark.parametrize("jvp", ["no_grad", "grad"])
@pytest.mark.parametrize("loss,ce_weight", [("kl", 0.0), ("mse", 0.5)])
@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_objective_on_masked_rows_equals_the_full_logits_objective(any_checkpoint, jvp, loss, ce_weight, chunk_rows):
    """Float64: the head, u, du/dt, the target and the loss on the masked rows only (in chunks of 2
    rows, checkpointed, or one chunk) give the loss, target and soft-prompt gradient of the full
    (B, T, V) computation up to float64 rounding, on a batch mixing r = t and r < t, from dense v or the cached top-k."""
    student = Student(load_model(any_checkpoint, dtype=torch.float64), prompt_length=3, hidden_size=16)
    with torch.no_grad():
        student.soft_prompt.prompt_gate.normal_(0, 1, generator=torch.Generator().manual_seed(10))
    g = torch.Generator().manual_seed(11)
    V = student.base.config.embedding_size
    ids = torch.randint(0, student.base.config.vocab_size, (3, 7), generator=g)
    masked = torch.rand(3, 7, generator=g) < 0.6
    masked[:, :2], masked[:, -1] = False, True
    x0 = ids.clone()
    ids[masked] = student.base.config.mask_token_id
    t = torch.tensor([0.9, 0.5, 0.7], dtype=torch.float64)
    r = torch.tensor([0.3, 0.5, 0.0], dtype=torch.float64)  # row 1 at r = t
    topk_ids, topk_logprobs = topk_of(torch.randn(int(masked.sum()), V, generator=g, dtype=torch.float64) * 2, 5)
    teacher = TeacherRows(V, topk_ids, topk_logprobs)
    v = dense_logprobs(topk_ids, topk_logprobs, V).double()
    params = MeanFlowOptions(jvp=jvp, loss=loss, ce_weight=ce_weight)
    mask = torch.ones_like(ids)
    chunk = {} if chunk_rows is None else {"chunk_bytes": chunk_rows * 4 * V}

    def gradient(fn):
        student.zero_grad()
        value, target = fn()
        value.backward()
        return value.detach(), target, [p.grad.clone() for p in student.soft_prompt.parameters()]

    expected = gradient(lambda: reference_meanflow_loss(student, ids, mask, masked, t, r, v, params, 4, x0))
    for source in (v, teacher):
        out = gradient(lambda: (lambda o: (o.loss, o.target))(
            meanflow_loss(student, ids, mask, masked, t, r, source, params, 4, x0, keep_target=True, **chunk)))
        assert_float64_close(out[0], expected[0], "loss")
        assert_float64_close(out[1], expected[1], "target")
        for a, b in zip(out[2], expected[2]):
            assert_float64_close(a, b, "soft-prompt gradient")
    assert all(g.abs().sum() > 0 for g in expected[2])
