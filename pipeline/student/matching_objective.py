"""DiMO-style distribution matching with an auxiliary model: an on-policy, mode-seeking signal for the
one-step student, as pure functions beside ``pipeline.student.policy_objective``.

The student S samples an answer x in one pass (all masked, r = 0, t = 1, latent z); x is partly
re-masked (t from the arccos schedule, ``max(1, round(G t))`` positions) into x~. Without gradient, the
teacher T (the student's frozen base, gate closed) and an auxiliary model A (the same base plus a
second soft prompt, gate 0 at the start, so A = T) predict the masked positions of x~:
p_T = softmax(T(x~)), p_A = softmax(A(x~)). A is trained by cross-entropy on the student's samples, so
it learns what the student's own distribution predicts at those positions; the direction

    g = (1 - beta) (p_A - p_T) + beta p_A (log p_A - log p_T - KL(p_A || p_T))

is the gradient, on the student's logits, of a divergence between the two (beta = 0: forward KL,
beta = 1: reverse KL, DiMO's Jeffreys mixture between), zero where A agrees with T. The student's loss
0.5 ||l - sg(l - g)||^2 over the masked positions has gradient g on its logits l. While A equals T, g
is 0: A is warmed up first (``student.matching_warmup_steps``).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from pipeline.models.layers import upcast
from pipeline.student.policy_objective import sample_answers


@dataclasses.dataclass
class MatchingLoss:
    student: torch.Tensor
    """Scalar: the student's surrogate loss (gradient g on its logits)."""
    auxiliary: torch.Tensor
    """Scalar: the auxiliary model's cross-entropy on the student's samples."""
    kl: torch.Tensor
    """Scalar: mean KL(p_A || p_T) at the re-masked positions (no gradient): rises while A learns the
    student's errors, falls as the student corrects them."""
    masked_fraction: torch.Tensor
    """Scalar: the mean fraction of answer positions re-masked."""


def arccos_mask(t_uniform: torch.Tensor, position_uniforms: torch.Tensor) -> torch.Tensor:
    """(B, G) bool: t = arccos(u) / (pi / 2) per row (``t_uniform`` (B,)), and the max(1, round(G t))
    positions with the smallest ``position_uniforms`` (B, G) masked."""
    G = position_uniforms.shape[1]
    t = torch.arccos(t_uniform.double()) / (math.pi / 2)
    count = torch.round(G * t).long().clamp(min=1, max=G)  # (B,)
    rank = position_uniforms.argsort(dim=1).argsort(dim=1)  # (B, G) each position's rank
    return rank < count[:, None]


def aux_log_ratio(log_p_aux: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    """log p_A - log p_T (..., V), 0 where p_A = 0 (those tokens contribute nothing)."""
    return torch.where(log_p_aux.exp() > 0, log_p_aux - log_p_teacher, torch.zeros_like(log_p_aux))


def aux_kl(log_p_aux: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    """KL(p_A || p_T) (...,) over the last dimension."""
    return (log_p_aux.exp() * aux_log_ratio(log_p_aux, log_p_teacher)).sum(dim=-1)


def matching_direction(log_p_aux: torch.Tensor, log_p_teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """g (..., V) from the auxiliary and teacher log-probabilities (..., V): (1 - beta)(p_A - p_T) +
    beta p_A (log p_A - log p_T - KL(p_A || p_T)); tokens with p_A = 0 contribute 0."""
    p_aux, p_teacher = log_p_aux.exp(), log_p_teacher.exp()
    log_ratio = aux_log_ratio(log_p_aux, log_p_teacher)
    kl = aux_kl(log_p_aux, log_p_teacher)[..., None]
    return torch.nan_to_num((1 - beta) * (p_aux - p_teacher) + beta * p_aux * (log_ratio - kl))


def matching_surrogate(logits: torch.Tensor, direction: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """0.5 sum over the ``where`` (B, G) positions and the vocabulary of (l - sg(l - g))^2, over B: its
    gradient on ``logits`` (B, G, V) is g / B at those positions, 0 elsewhere."""
    target = (logits - direction).detach()
    return 0.5 * ((logits - target) ** 2 * where[..., None]).sum() / logits.shape[0]


def masked_log_probs(model, ids: torch.Tensor, attention: torch.Tensor, where: torch.Tensor, mask_id: int,
                     **times) -> torch.Tensor:
    """(n, V) float64 log-probabilities of ``model`` (a ``MaskPredictor`` or a ``Student``, with
    ``times``) at the ``where`` (B, G) answer positions, [MASK] excluded."""
    G = where.shape[1]
    hidden = model.hidden(input_ids=ids, attention_mask=attention, **times)[:, -G:]  # (B, G, C)
    logits = upcast(model.head(hidden[where])).double()  # (n, V)
    logits[:, mask_id] = -torch.inf
    return torch.log_softmax(logits, dim=-1)


def distribution_matching_loss(student, auxiliary, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                               latent: torch.Tensor | None, sample_uniforms: torch.Tensor, t_uniform: torch.Tensor,
                               position_uniforms: torch.Tensor, mask_id: int, beta: float,
                               label_smoothing: float = 0.1) -> MatchingLoss:
    """The matching objective on B prompts (ids and mask (B, Lp)) with latents (B, d) (None without
    one): ``sample_uniforms`` (B, 1, G) draw the student's sample, ``t_uniform`` (B,) and
    ``position_uniforms`` (B, G) its re-masking. ``auxiliary`` is a ``Student`` on the same base."""
    B, G = position_uniforms.shape
    answer = torch.full((B, G), mask_id, dtype=torch.long, device=prompt_ids.device)
    attention = torch.cat((prompt_mask.long(), torch.ones_like(answer)), dim=1)
    hidden = student.hidden(input_ids=torch.cat((prompt_ids.long(), answer), dim=1), attention_mask=attention,
                            r=0.0, t=1.0, latent=latent)[:, -G:]
    logits = upcast(student.head(hidden)).double()  # (B, G, V)
    logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) == mask_id, -torch.inf)
    x = sample_answers(logits, sample_uniforms, mask_id)[:, 0]  # (B, G)
    where = arccos_mask(t_uniform, position_uniforms).to(x.device)  # (B, G) re-masked
    ids = torch.cat((prompt_ids.long(), x.masked_fill(where, mask_id)), dim=1)
    t = where.double().mean(dim=1)  # the masked fraction: A is a one-step predictor at that state
    aux_log_probs = masked_log_probs(auxiliary, ids, attention, where, mask_id, r=t, t=t)  # (n, V), one pass
    with torch.no_grad():
        log_p_teacher = masked_log_probs(student.base, ids, attention, where, mask_id)
        log_p_aux = aux_log_probs.detach()
        direction = matching_direction(log_p_aux, log_p_teacher, beta)  # (n, V)
        kl = aux_kl(log_p_aux, log_p_teacher)
    full = torch.zeros_like(logits).masked_scatter(where[..., None].expand_as(logits), direction)
    student_loss = matching_surrogate(logits.masked_fill(~torch.isfinite(logits), 0.0), full, where)
    nll = torch.zeros(where.shape, dtype=aux_log_probs.dtype, device=x.device).masked_scatter(
        where, smoothed_nll(aux_log_probs, x[where], label_smoothing))  # (B, G)
    auxiliary_loss = (nll.sum(dim=1) / where.sum(dim=1)).mean()  # per row, then over rows (as DDP averages)
    return MatchingLoss(student=student_loss.float(), auxiliary=auxiliary_loss.float(), kl=kl.mean().float(),
                        masked_fraction=t.mean().float())


def smoothed_nll(log_probs: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """(n,) cross-entropy with label smoothing over the tokens of finite log-probability (not [MASK])."""
    finite = torch.isfinite(log_probs)
    safe = log_probs.masked_fill(~finite, 0.0)
    nll = -safe.gather(1, labels[:, None])[:, 0]
    uniform = -(safe.sum(dim=1) / finite.sum(dim=1))
    return (1 - smoothing) * nll + smoothing * uniform
