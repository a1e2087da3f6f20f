"""A policy gradient with the teacher's pseudo-likelihood as reward: a mode-seeking signal for the
one-step student, as pure functions beside ``pipeline.student.rollout_objective``.

Per prompt and latent z, the student's one pass at the one-step point (answer all masked, r = 0,
t = 1) is a product distribution q(x | prompt, z) over the answer; M answers are sampled from that one
pass. The reward of an answer is the teacher's pseudo-log-likelihood up to and including its first EOS,
R(x) = sum_i log p_T(x_i | prompt, x without position i), one teacher row per scored position, the
teacher being the student's own frozen base (prefix gate closed: no extra weights). The loss is

    -(1/M) sum_m A_m log q(x_m)  -  entropy_weight * H(q)

with the leave-one-out baseline A_m = R_m - mean_{j != m} R_j, which leaves the gradient's
expectation unchanged (each baseline is independent of its own sample) and lowers its variance. Its
fixed point is a sharp, mutually consistent answer per (prompt, z) the teacher accepts: one pass can
only be valid on a many-answer task if the per-position distributions agree, which the per-position
objectives never ask (DESIGN 11.7). Post-EOS positions are neither rewarded nor trained (the decoded
answer ends at the first EOS).

Cost per prompt: one student forward and backward, and M x (answer length) teacher rows without
gradient; the teacher rows run ``chunk_rows`` at a time.
"""

from __future__ import annotations

import dataclasses

import torch

from pipeline.models.layers import upcast
from pipeline.student.rollout_objective import sample_draws


@dataclasses.dataclass
class PolicyLoss:
    loss: torch.Tensor
    """Scalar: the surrogate loss (its gradient is the policy gradient estimate)."""
    reward: torch.Tensor
    """(B, M) the samples' rewards (no gradient)."""
    length: torch.Tensor
    """(B, M) answer positions up to and including the first EOS (all when there is none)."""
    entropy: torch.Tensor
    """Scalar: the mean entropy (nats) of q at the answer positions (no gradient)."""
    distinct: torch.Tensor
    """(B,) distinct answers among each prompt's M samples."""


def sample_answers(logits: torch.Tensor, uniforms: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B, M, G) answers sampled from the product distribution softmax(``logits`` (B, G, V)), never
    [MASK], by inverse CDF of ``uniforms`` (B, M, G): one uniform per sampled token, so a sample is a
    pure function of its keys even at a vocabulary of 126k."""
    B, G, V = logits.shape
    M = uniforms.shape[1]
    probs = torch.softmax(logits.detach().double().masked_fill(
        torch.arange(V, device=logits.device) == mask_id, -torch.inf), dim=-1)  # (B, G, V)
    picks = sample_draws(probs.reshape(B * G, V), uniforms.permute(0, 2, 1).reshape(B * G, M))  # (B*G, M)
    return picks.view(B, G, M).permute(0, 2, 1)


def answer_extent(answers: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(..., G) bool: the positions up to and including each answer's first EOS (all without one)."""
    is_eos = (answers == eos_id).long()
    before = is_eos.cumsum(dim=-1) - is_eos  # EOS strictly before each position
    return before == 0


@torch.no_grad()
def masked_position_rows(base, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answers: torch.Tensor,
                         scored: torch.Tensor, mask_id: int, chunk_rows: int = 1024):
    """Yield (row (n,), position (n,), log p_T (n, V)): for each ``scored`` (N, G) position i of an
    answer (``answers`` (N, G); prompt ids and mask (N, Lp)), the log-probabilities under ``base`` (a
    ``MaskPredictor``) of every token at i given the prompt and the answer with i masked. One teacher
    row per scored position, ``chunk_rows`` rows per forward."""
    G = answers.shape[1]
    row, position = scored.nonzero(as_tuple=True)  # (S,) each
    for start in range(0, len(row), chunk_rows):
        r, p = row[start:start + chunk_rows], position[start:start + chunk_rows]
        masked = answers[r].clone()
        masked[torch.arange(len(r), device=r.device), p] = mask_id
        ids = torch.cat((prompt_ids[r], masked), dim=1).long()
        attention = torch.cat((prompt_mask[r].long(), torch.ones_like(masked)), dim=1)
        hidden = base.hidden(input_ids=ids, attention_mask=attention)[:, -G:]  # (n, G, C)
        h = hidden[torch.arange(len(r), device=r.device), p]  # (n, C)
        yield r, p, torch.log_softmax(upcast(base.head(h)).double(), dim=-1)  # (n, V)


def pseudo_log_likelihood(base, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answers: torch.Tensor,
                          extent: torch.Tensor, mask_id: int, chunk_rows: int = 1024) -> torch.Tensor:
    """(N,) sum over the ``extent`` (N, G) positions i of log p_T(answers_i | prompt, answers with i
    masked) under ``base``; prompt ids and mask (N, Lp)."""
    total = torch.zeros(answers.shape[0], dtype=torch.float64, device=answers.device)
    for r, p, logp in masked_position_rows(base, prompt_ids, prompt_mask, answers, extent, mask_id, chunk_rows):
        total.index_add_(0, r, logp.gather(1, answers[r, p][:, None])[:, 0])
    return total


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """(B, M) advantages R_m - mean of the other M - 1 rewards of the same group (M >= 2)."""
    M = rewards.shape[1]
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (M - 1)


def policy_surrogate(log_q: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Scalar whose gradient is the policy gradient estimate -(1/(B M)) sum A_m grad log q(x_m); ``log_q``
    (B, M) with gradient, ``advantages`` (B, M) constants."""
    return -(advantages.detach() * log_q).mean()


def policy_loss(student, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, latent: torch.Tensor | None,
                uniforms: torch.Tensor, gen_length: int, mask_id: int, eos_id: int,
                entropy_weight: float = 0.0, chunk_rows: int = 1024) -> PolicyLoss:
    """The policy-gradient objective on B prompts (ids and mask (B, Lp)), each with its latent
    (``latent`` (B, d), None without one) and M samples drawn by ``uniforms`` (B, M, G)."""
    B, G = prompt_ids.shape[0], gen_length
    answer = torch.full((B, G), mask_id, dtype=torch.long, device=prompt_ids.device)
    ids = torch.cat((prompt_ids.long(), answer), dim=1)
    attention = torch.cat((prompt_mask.long(), torch.ones_like(answer)), dim=1)
    hidden = student.hidden(input_ids=ids, attention_mask=attention, r=0.0, t=1.0, latent=latent)[:, -G:]
    logits = upcast(student.head(hidden)).float()  # (B, G, V)
    logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) == mask_id, -torch.inf)
    answers = sample_answers(logits, uniforms, mask_id)  # (B, M, G)
    M = answers.shape[1]
    extent = answer_extent(answers, eos_id)  # (B, M, G)
    log_probs = torch.log_softmax(logits, dim=-1)  # (B, G, V)
    token_log_q = log_probs[:, None].expand(B, M, G, -1).gather(3, answers[..., None])[..., 0]  # (B, M, G)
    log_q = (token_log_q * extent).sum(dim=2)  # (B, M)
    rewards = pseudo_log_likelihood(student.base, prompt_ids.repeat_interleave(M, dim=0),
                                    prompt_mask.repeat_interleave(M, dim=0), answers.reshape(B * M, G),
                                    extent.reshape(B * M, G), mask_id, chunk_rows).view(B, M)
    probs = log_probs.exp()
    entropy = -(probs * log_probs.masked_fill(probs == 0, 0.0)).sum(dim=-1).mean()  # mean over (B, G)
    loss = policy_surrogate(log_q, leave_one_out(rewards).to(log_q.dtype)) - entropy_weight * entropy
    distinct = torch.tensor([len(torch.unique(a.masked_fill(~e, eos_id), dim=0)) for a, e in zip(answers, extent)],
                            device=answers.device)
    return PolicyLoss(loss=loss, reward=rewards.detach(), length=extent.sum(dim=2), entropy=entropy.detach(),
                      distinct=distinct)
