"""Mean-field reverse KL to the teacher: a mode-seeking signal for the one-step student whose
gradient needs no valid sample, as pure functions beside ``pipeline.student.policy_objective``.

Given (prompt, z) the student's one pass at the one-step point is a product distribution
q(x) = prod_i q_i(x_i). Its reverse KL to the teacher's joint p_T over the answer is

    KL(q || p_T) = E_q[log q(x)] - E_q[log p_T(x)].

For a product q the exact gradient with respect to q_i of E_q[log p_T(x)] is
E_{x_-i ~ q_-i}[log p_T(. | x_-i)] (plus a constant in x_i, which the softmax projects out), because
log p_T(x) = log p_T(x_i | x_-i) + log p_T(x_-i) and the second term does not depend on x_i. So with
contexts x ~ q sampled without gradient and one teacher row per (sample, position) with that position
masked, a_i = log p_T(. | x_-i) over the whole vocabulary, the loss

    L = (1 / G) sum_i sum_v q_i(v) (lambda log q_i(v) - sg(a_i(v)))

has the reverse KL's gradient (lambda = 1; the teacher is the student's own frozen base with the gate
closed). Unlike the policy gradient it is Rao-Blackwellized over each position's own token: it does not
wait for a consistent sample, it asks at every position which token the teacher wants given the others
as sampled. On a many-answer task the teacher's conditional points away from the tokens the other
positions already took, so q_i moves off collisions; the fixed points are sharp, mutually consistent
answers (DESIGN 11.7), the product of marginals being a saddle. ``lambda`` < 1 sharpens further.

Cost per prompt: one student forward and backward and S x G teacher rows without gradient, S the
contexts sampled per (prompt, z) (1 is enough: every position's gradient is already an expectation
over its own token).
"""

from __future__ import annotations

import dataclasses

import torch

from pipeline.models.layers import upcast
from pipeline.student.policy_objective import masked_position_rows, sample_answers


@dataclasses.dataclass
class MeanFieldLoss:
    loss: torch.Tensor
    """Scalar: the surrogate (its gradient is the estimated gradient of KL(q || p_T) per position)."""
    conditional_kl: torch.Tensor
    """Scalar: the mean over positions of KL(q_i || p_T(. | the sampled others)), averaged over the
    contexts (no gradient): near 0 when every position agrees with what the teacher wants given the
    rest, as at a consistent answer."""
    pseudo_log_likelihood: torch.Tensor
    """(B, S) the teacher's pseudo-log-likelihood of each sampled context (sum over positions)."""
    entropy: torch.Tensor
    """Scalar: the mean entropy (nats) of q at the answer positions (no gradient)."""
    distinct: torch.Tensor
    """(B,) distinct answers among each prompt's S samples."""


def mean_field_surrogate(logits: torch.Tensor, teacher_log_probs: torch.Tensor,
                         entropy_weight: float = 1.0) -> torch.Tensor:
    """Scalar (1 / (B G)) sum q (lambda log q - a) over (B, G, V): ``logits`` (B, G, V) the student's
    with gradient, ``teacher_log_probs`` a (B, G, V) the teacher's conditionals at each position given
    the sampled others (averaged over the samples), ``entropy_weight`` lambda. -inf logits (tokens q
    never emits) contribute nothing."""
    log_q = torch.log_softmax(logits, dim=-1)
    q = log_q.exp()
    log_q = log_q.masked_fill(q == 0, 0.0)  # 0 log 0 = 0, with a finite gradient
    a = teacher_log_probs.detach().to(log_q.dtype)
    return (q * (entropy_weight * log_q - a)).sum(dim=-1).mean()


def latent_contexts(latent: torch.Tensor, gen_length: int) -> torch.Tensor:
    """(B, 1, G) the sampling uniforms of one context per row taken from the row's latent (B, d >= G):
    u_i = Phi(z_i), the standard normal CDF of coordinate i, uniform on (0, 1) under the prior."""
    return torch.special.ndtr(latent[:, :gen_length].double())[:, None, :]


def mean_field_loss(student, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, latent: torch.Tensor | None,
                    uniforms: torch.Tensor, gen_length: int, mask_id: int, entropy_weight: float = 1.0,
                    anchor: torch.Tensor | None = None, chunk_rows: int = 1024) -> MeanFieldLoss:
    """The mean-field objective on B prompts (ids and mask (B, Lp)), each with its latent (``latent``
    (B, d), None without one; ``anchor`` (B,) bool rows that use the greedy anchor instead) and S
    contexts drawn from the student's one pass by ``uniforms`` (B, S, G)."""
    B, G = prompt_ids.shape[0], gen_length
    answer = torch.full((B, G), mask_id, dtype=torch.long, device=prompt_ids.device)
    ids = torch.cat((prompt_ids.long(), answer), dim=1)
    attention = torch.cat((prompt_mask.long(), torch.ones_like(answer)), dim=1)
    hidden = student.hidden(input_ids=ids, attention_mask=attention, r=0.0, t=1.0, latent=latent,
                            anchor=anchor)[:, -G:]
    logits = upcast(student.head(hidden)).float()  # (B, G, V)
    logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) == mask_id, -torch.inf)
    samples = sample_answers(logits, uniforms, mask_id)  # (B, S, G)
    S = samples.shape[1]
    teacher = torch.zeros_like(logits)  # (B, G, V): a_i averaged over the S contexts
    pll = torch.zeros(B * S, dtype=torch.float64, device=logits.device)
    flat = samples.reshape(B * S, G)
    for r, p, logp in masked_position_rows(student.base, prompt_ids.repeat_interleave(S, dim=0),
                                           prompt_mask.repeat_interleave(S, dim=0), flat,
                                           torch.ones_like(flat, dtype=torch.bool), mask_id, chunk_rows):
        teacher.index_put_((r // S, p), (logp / S).to(teacher.dtype), accumulate=True)
        pll.index_add_(0, r, logp.gather(1, flat[r, p][:, None])[:, 0])
    loss = mean_field_surrogate(logits, teacher, entropy_weight)
    with torch.no_grad():
        log_q = torch.log_softmax(logits, dim=-1)
        q = log_q.exp()
        entropy = -(q * log_q.masked_fill(q == 0, 0.0)).sum(dim=-1).mean()
        kl = loss.detach() if entropy_weight == 1.0 else mean_field_surrogate(logits, teacher, 1.0)
    distinct = torch.tensor([len(torch.unique(s, dim=0)) for s in samples], device=samples.device)
    return MeanFieldLoss(loss=loss, conditional_kl=kl, pseudo_log_likelihood=pll.view(B, S).detach(),
                         entropy=entropy, distinct=distinct)
