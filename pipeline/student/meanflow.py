"""Discrete-space MeanFlow, as pure functions.

Conventions: t = 1 is fully masked, t = 0 is data. The teacher's logits on x_t are the instantaneous
velocity v; the student's logits u(e, r, t) on e = E[x_t] are the average velocity over [r, t]. The
MeanFlow identity gives the regression target

    u_tgt = v - (t - r) * du/dt,    du/dt = d/dt u(e(t), r, t) = J_e u . de/dt + d_t u,

a Jacobian-vector product of the student along the tangent (de/dt, 1) with r held fixed, taken without
gradient. With r = t the target is exactly v. ``meanflow_loss`` chains the pieces into the training
objective on one batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from pipeline.models.layers import upcast
from pipeline.models.logit_rows import map_row_chunks

Tail = Literal["uniform", "drop"]
Tangent = Literal["linear", "seed"]
Loss = Literal["kl", "mse", "ce"]


def dense_logprobs(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, vocab_size: int, tail: Tail = "uniform"):
    """Full log-probabilities (M, V) from cached top-k (M, k) log-softmax values.

    ``uniform``: the tail mass 1 - sum(exp(topk)) is spread evenly over the other V - k ids;
    ``drop``: the top-k are renormalized and every other id gets probability 0. Mass is 1 either way.
    """
    logprobs = topk_logprobs.float()
    M, k = logprobs.shape
    if tail == "drop":
        dense = torch.full((M, vocab_size), -torch.inf, device=logprobs.device)
        return dense.scatter(1, topk_ids.long(), logprobs - torch.logsumexp(logprobs, dim=1, keepdim=True))
    if tail != "uniform":
        raise ValueError(f"tail must be 'uniform' or 'drop', got {tail!r}")
    if k >= vocab_size:
        return torch.full((M, vocab_size), -torch.inf, device=logprobs.device).scatter(1, topk_ids.long(), logprobs)
    # fp16 storage can make the stored top-k sum a hair above 1: renormalize them, leave no tail.
    head = torch.logsumexp(logprobs, dim=1, keepdim=True)  # log sum p_topk, (M, 1)
    logprobs = logprobs - head.clamp(min=0.0)
    tail_mass = (-torch.expm1(head.clamp(max=0.0))).clamp(min=0.0)  # 1 - sum p_topk, (M, 1)
    per_id = torch.log(tail_mass / (vocab_size - k))  # -inf when there is no tail
    dense = per_id.expand(M, vocab_size).clone()
    return dense.scatter_(1, topk_ids.long(), logprobs)


def sample_r(
    t: torch.Tensor, equal_fraction: float, generator: torch.Generator | None = None,
    uniforms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """r (B,) for t (B,): r = t for a fraction ``equal_fraction`` of samples, else r ~ U[0, t).
    ``uniforms`` (two (B,) tensors in [0, 1)) replace the generator's draws."""
    if uniforms is None:
        uniforms = (torch.rand(t.shape, generator=generator, device=t.device),
                    torch.rand(t.shape, generator=generator, device=t.device))
    equal = uniforms[0].to(t.device) < equal_fraction
    return torch.where(equal, t, t * uniforms[1].to(t.device, t.dtype))


@dataclasses.dataclass
class TeacherRows:
    """The teacher's v at the masked positions (M rows), made dense (M, V) only a chunk of rows at a
    time: from the cached top-k (``topk_ids``/``topk_logprobs`` (M, k), ``dense_logprobs``), or from
    dense logits (``dense`` (M, V), as tests and benchmarks have them)."""

    vocab_size: int
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail: Tail = "uniform"
    dense: torch.Tensor | None = None

    @classmethod
    def of(cls, v: "torch.Tensor | TeacherRows") -> "TeacherRows":
        """``v`` itself, or dense logits (M, V) wrapped."""
        return v if isinstance(v, TeacherRows) else cls(vocab_size=v.shape[-1], dense=v)

    def __len__(self) -> int:
        return len(self.dense if self.dense is not None else self.topk_ids)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """(n, V) v at the rows ``index`` (n,)."""
        if self.dense is not None:
            return self.dense[index]
        return dense_logprobs(self.topk_ids[index], self.topk_logprobs[index], self.vocab_size, self.tail)


def tangent(
    kind: Tangent, v_masked: "torch.Tensor | TeacherRows", masked: torch.Tensor, embedding: torch.Tensor, mask_id: int,
    t: torch.Tensor, chunk_bytes: int | None = None,
) -> torch.Tensor:
    """de/dt (B, T, C) of the student's input embeddings along the forward process.

    v_masked (M, V) teacher logits (or log-probs) at the masked positions (or ``TeacherRows``), in
    row-major order of masked (B, T) bool; embedding (V, C) the input embedding matrix; t (B,). With
    e_bar = softmax(v) @ E (computed ``chunk_bytes`` of logits at a time):

    * ``linear``: the mean-embedding path E[e_s] = s e_mask + (1 - s) e(x0), re-anchored through x_t
      (p = softmax(v) as the posterior of x0): at masked positions (e_mask - e_bar) / t, 0 at visible
      ones (for s < t visible tokens stay visible);
    * ``seed``: the seed's literal e_bar - e(x_t) at masked positions (opposite sign, no 1 / t).
    """
    teacher = TeacherRows.of(v_masked)

    def mean_embedding(rows: torch.Tensor) -> tuple[torch.Tensor]:
        table = upcast(embedding)  # (V, C), float32 at least
        return ((torch.softmax(teacher.rows(rows).to(table.dtype), dim=-1) @ table).to(embedding.dtype),)

    (e_bar,) = map_row_chunks(mean_embedding, (torch.arange(len(teacher), device=embedding.device),),
                              teacher.vocab_size, chunk_bytes)  # (M, C)
    e_mask = embedding[mask_id]  # (C,)
    if kind == "linear":
        t_masked = t[masked.nonzero()[:, 0]].to(embedding.dtype)[:, None]  # (M, 1)
        direction = (e_mask - e_bar) / t_masked
    elif kind == "seed":
        direction = e_bar - e_mask
    else:
        raise ValueError(f"tangent must be 'linear' or 'seed', got {kind!r}")
    de_dt = torch.zeros(*masked.shape, embedding.shape[1], dtype=embedding.dtype, device=embedding.device)
    de_dt[masked] = direction
    return de_dt


def average_velocity_jvp(
    student_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    e: torch.Tensor,
    t: torch.Tensor,
    de_dt: torch.Tensor,
    keep_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, du/dt) with ``torch.func.jvp`` of ``student_fn(e, t)`` along (de_dt, 1). ``student_fn`` may
    return logits, or the hidden states the logits are a linear map of (the LM head): then the
    second output is their tangent, and the head of it is du/dt.

    ``student_fn`` must use the explicit ("math") attention: fused SDPA kernels have no forward-mode
    derivative. With ``keep_graph`` the primal u keeps its autograd graph (one grad-mode JVP); without,
    the JVP runs under ``no_grad`` (cheaper; compute u for the gradient with an ordinary forward)."""
    tangents = (de_dt, torch.ones_like(t))
    if keep_graph:
        return torch.func.jvp(student_fn, (e, t), tangents)
    with torch.no_grad():
        return torch.func.jvp(student_fn, (e, t), tangents)


def meanflow_target(v: torch.Tensor, du_dt: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """u_tgt = v - (t - r) du/dt, detached (stop-gradient). v, du_dt (N, ..., V); r, t (N,): one
    interval per leading index (a row (B, T, V), or a masked position (M, V))."""
    gap = (t - r).to(du_dt.dtype)
    gap = gap.view(*gap.shape, *([1] * (du_dt.dim() - gap.dim())))
    return (v.to(du_dt.dtype) - gap * du_dt).detach()


def token_losses(kind: Loss, u: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token losses (N,) for student logits u (N, V) against target logits (N, V).

    ``kl``: KL(softmax(target) || softmax(u)); ``mse``: mean squared difference of the log-softmax
    vectors (logits are shift invariant, so raw logits would penalize an irrelevant offset) over the
    ids the target gives mass (a dropped or fp16-vanished tail has log-probability -inf: nothing to
    match there); ``ce``: cross-entropy of u to the hard ``labels`` (N,)."""
    log_u = F.log_softmax(upcast(u), dim=-1)
    if kind == "kl":
        log_target = F.log_softmax(upcast(target), dim=-1)
        p = log_target.exp()
        # 0 log 0 = 0 where the target gives an id no mass (a dropped tail); NaN stays NaN.
        return (p * (log_target - log_u)).masked_fill(p == 0, 0.0).sum(dim=-1)
    if kind == "mse":
        log_target = F.log_softmax(upcast(target), dim=-1)
        defined = ~torch.isneginf(log_target)  # NaN stays in, so a broken target still raises
        squared = torch.where(defined, log_u - log_target, torch.zeros_like(log_u)).pow(2)
        return squared.sum(dim=-1) / defined.sum(dim=-1).clamp(min=1)
    if kind == "ce":
        if labels is None:
            raise ValueError("the ce loss needs labels")
        return F.nll_loss(log_u, labels.long(), reduction="none")
    raise ValueError(f"loss must be 'kl', 'mse' or 'ce', got {kind!r}")


def adaptive_weighted_mean(
    losses: torch.Tensor, power: float = 1.0, eps: float = 1e-3, normalizer: float | None = None
) -> torch.Tensor:
    """MeanFlow's adaptive weighting: sum of sg(1 / (loss + eps) ** power) * loss divided by
    ``normalizer`` (default: the number of losses); power 0 is a plain mean."""
    weighted = losses if power == 0 else losses / (losses.detach() + eps) ** power
    return weighted.sum() / (len(losses) if normalizer is None else normalizer)


# ---------------------------------------------------------------------- the objective


@dataclasses.dataclass
class MeanFlowLoss:
    """The MeanFlow objective on one batch. Per-token tensors run over the masked positions in the
    row-major order of ``masked``."""

    loss: torch.Tensor
    """Scalar to minimize; its gradient reaches the soft prompt only."""
    kl: torch.Tensor
    """(M,) KL(softmax(u_tgt) || softmax(u)) per token, without gradient."""
    equal: torch.Tensor
    """(M,) bool: the token's row has r = t (its target is v itself)."""
    du_dt_abs: torch.Tensor
    """Mean |du/dt| over the tokens of rows with r < t (0 when there are none)."""
    target: torch.Tensor | None = None
    """(M, V) u_tgt = v - (t - r) du/dt, with ``keep_target`` only (training never holds it whole)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeanFlowOptions:
    """The settings the MeanFlow objective reads (the ``student`` section's keys of the same names)."""

    tangent: Literal["linear", "seed"] = "linear"
    """de/dt of the JVP: the forward process's mean-embedding path, or the seed's literal form."""
    jvp: Literal["no_grad", "grad"] = "no_grad"
    """``no_grad``: the JVP without a graph on the rows with r < t, then an ordinary forward for u;
    ``grad``: one grad-mode JVP whose primal is u."""
    loss: Literal["kl", "mse"] = "kl"
    ce_weight: float = 0.0
    """Weight of the auxiliary cross-entropy to the clean tokens x0."""
    adaptive_power: float = 1.0
    adaptive_eps: float = 1e-3

    @classmethod
    def of(cls, section) -> "MeanFlowOptions":
        """The options of a ``StudentParams`` (or anything with these fields)."""
        return cls(**{field.name: getattr(section, field.name) for field in dataclasses.fields(cls)})


def meanflow_loss(
    student,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    v: "torch.Tensor | TeacherRows",
    options: MeanFlowOptions,
    answer_length: int,
    x0: torch.Tensor | None = None,
    latent: torch.Tensor | None = None,
    keep_target: bool = False,
    chunk_bytes: int | None = None,
) -> MeanFlowLoss:
    """Tangent, JVP, target and loss for rows x_t = ``input_ids`` (B, T) with ``masked`` (B, T) bool,
    times ``t`` and ``r`` (B,), and the teacher's v at the masked positions: dense (M, V), or
    ``TeacherRows`` (the cached top-k, made dense a chunk at a time).

    ``student`` is a ``Student``; ``options`` choose the tangent, the JVP pattern (``no_grad``: the JVP
    without a graph on the rows with r < t, then an ordinary forward for u; ``grad``: one grad-mode
    JVP whose primal is u), the loss and its adaptive weight, and the weight of the auxiliary
    cross-entropy to ``x0`` (B, T). ``latent`` (B, d): a latent student's z per row, held fixed
    along the JVP. The loss is summed over tokens and divided by B x
    ``answer_length`` (per row, like LLaDA's: means over ranks average exactly).

    Memory grows with the M masked positions, not with B x T x V: the trunk runs once on the whole
    sequence, and its hidden states h and their tangent dh/dt are kept at the masked positions only
    (M, C); the head is linear, so u = head(h) and du/dt = head(dh/dt), and u, du/dt, v, the target
    and the loss exist for ``chunk_bytes`` of logits at a time (``pipeline.models.logit_rows``)."""
    base = student.base
    teacher = TeacherRows.of(v)
    with torch.no_grad():
        e = base.embed(input_ids)  # (B, T, C)
    embedding = base.embedding_weight.detach()
    de_dt = tangent(options.tangent, teacher, masked, embedding, base.config.mask_token_id, t, chunk_bytes)
    row = masked.nonzero()[:, 0]  # (M,) row of each masked position

    # du/dt only matters where r < t (the target is v itself at r = t): with the no-grad JVP,
    # only those rows pay for it.
    jvp_rows = torch.ones_like(t, dtype=torch.bool) if options.jvp == "grad" else r < t

    def hidden_at_masked(z_, t_):  # (M_jvp, C): the masked positions of the rows in jvp_rows
        h = student.hidden(inputs_embeds=z_, r=r[jvp_rows], t=t_, attention_mask=attention_mask[jvp_rows],
                           attention="math", latent=None if latent is None else latent[jvp_rows])
        return h[masked[jvp_rows]]

    dh_dt = torch.zeros(len(row), e.shape[-1], dtype=e.dtype, device=e.device)  # (M, C), 0 where r = t
    if jvp_rows.any():
        h, dh_dt[jvp_rows[row]] = average_velocity_jvp(hidden_at_masked, e[jvp_rows], t[jvp_rows],
                                                       de_dt[jvp_rows].to(e.dtype), keep_graph=options.jvp == "grad")
    if options.jvp == "no_grad":
        h = student.hidden(inputs_embeds=e, r=r, t=t, attention_mask=attention_mask, latent=latent)[masked]
    labels = x0[masked] if options.ce_weight else torch.zeros_like(row)

    def token_terms(h_rows, dh_rows, index, r_rows, t_rows, label_rows):
        """Per token of a chunk: the loss, the CE to x0, the KL and sum |du/dt| (and the target)."""
        du_dt = upcast(student.head(dh_rows))  # (n, V)
        target = meanflow_target(teacher.rows(index), du_dt, r_rows, t_rows)  # (n, V)
        with torch.no_grad():
            du_dt_abs = du_dt.abs().sum(dim=-1)
        del du_dt  # each (n, V) tensor held is a chunk of memory
        u_rows = upcast(student.head(h_rows))  # (n, V)
        losses = token_losses(options.loss, u_rows, target)
        ce = token_losses("ce", u_rows, target, label_rows) if options.ce_weight else torch.zeros_like(losses)
        with torch.no_grad():
            kl = losses.detach() if options.loss == "kl" else token_losses("kl", u_rows, target)
        return (losses, ce, kl, du_dt_abs) + ((target,) if keep_target else ())

    terms = map_row_chunks(token_terms, (h, dh_dt, torch.arange(len(row), device=e.device), r[row], t[row], labels),
                           teacher.vocab_size, chunk_bytes)
    losses, ce, kl, du_dt_abs = terms[:4]
    normalizer = masked.shape[0] * answer_length
    loss = adaptive_weighted_mean(losses, options.adaptive_power, options.adaptive_eps, normalizer=normalizer)
    if options.ce_weight:
        loss = loss + options.ce_weight * ce.sum() / normalizer
    with torch.no_grad():
        equal = (r == t)[row]
        du_dt_abs = du_dt_abs[~equal].sum() / ((~equal).sum() * teacher.vocab_size) if (~equal).any() \
            else du_dt_abs.new_zeros(())
    return MeanFlowLoss(loss=loss, kl=kl.detach(), equal=equal, du_dt_abs=du_dt_abs,
                        target=terms[4] if keep_target else None)
