"""The rollout objective: a discrete average velocity from the teacher's own trajectories,
as pure functions beside ``pipeline.student.meanflow``.

A cached rollout is a prompt, its final answer tokens and the step that committed each answer position
(``reveal_step``); the sampler never re-masks, so the state after step k is "positions with
``reveal_step < k`` visible". For steps k < k' with masked fractions t (after k) and r (after k'), the
average velocity over [r, t] in the x0-parameterization is what the teacher commits between the two
states: the target of u(x_t, r, t, z) is the final token at every position with
``k <= reveal_step < k'``, and the loss is their cross-entropy, averaged per row. k = 0 (all masked,
t = 1) is the one-step inference point, k' = steps (r = 0) the whole remaining trajectory.

A latent student is tied to its targets by selection: K latents are drawn per rollout, each scored
without gradient (the base is frozen and the soft prompt has no dropout, so eval mode changes
nothing but is what the selection must not depend on), and only the best one is trained
(winner-takes-all, hard EM). A student with a greedy anchor trains it on the greedy rollouts, without
selection: the teacher's greedy answer is one deterministic mode, so it gets a latent of its own.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from pipeline.models.layers import upcast
from pipeline.models.logit_rows import map_row_chunks


@dataclasses.dataclass
class RolloutInterval:
    """Student inputs and targets for one (k, k') per rollout."""

    input_ids: torch.Tensor
    """(B, Lp + G) the prompt and the state after step k (masked where ``reveal_step >= k``)."""
    attention_mask: torch.Tensor
    """(B, Lp + G) 0 on the prompt's left padding."""
    targets: torch.Tensor
    """(B, G) bool: answer positions the teacher committed in steps [k, k')."""
    tokens: torch.Tensor
    """(B, G) the rollout's final tokens (the labels at ``targets``)."""
    t: torch.Tensor
    """(B,) masked fraction after step k."""
    r: torch.Tensor
    """(B,) masked fraction after step k'."""
    one_step: torch.Tensor
    """(B,) bool: k = 0 (t = 1)."""


def sample_steps(steps: int, uniforms: torch.Tensor, one_step_fraction: float, r0_fraction: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, k') (B,) int64 from ``uniforms`` (4, B) in [0, 1): k = 0 with probability
    ``one_step_fraction``, else uniform in 1 .. steps - 1 (0 when steps is 1); k' = steps with
    probability ``r0_fraction``, else uniform in k + 1 .. steps."""
    u = uniforms.double()
    intermediate = 1 + torch.floor(u[1] * (steps - 1)).long()
    one_step = (u[0] < one_step_fraction) | (steps == 1)
    k = torch.where(one_step, torch.zeros_like(intermediate), intermediate)
    later = k + 1 + torch.floor(u[3] * (steps - k)).long().clamp(max=steps - k - 1)
    k_end = torch.where(u[2] < r0_fraction, torch.full_like(k, steps), later)
    return k, k_end


def rollout_interval(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor,
                     reveal_step: torch.Tensor, k: torch.Tensor, k_end: torch.Tensor, mask_id: int) -> RolloutInterval:
    """The state after step k of each rollout (prompt (B, Lp), tokens and reveal_step (B, G)) and the
    positions committed in steps [k, k')."""
    reveal = reveal_step.long()
    visible = reveal < k[:, None]  # (B, G)
    targets = ~visible & (reveal < k_end[:, None])
    answer = torch.where(visible, tokens, torch.full_like(tokens, mask_id))
    G = tokens.shape[1]
    return RolloutInterval(
        input_ids=torch.cat((prompt_ids, answer), dim=1).long(),
        attention_mask=torch.cat((prompt_mask.long(), torch.ones_like(answer)), dim=1),
        targets=targets,
        tokens=tokens.long(),
        t=(~visible).sum(dim=1).float() / G,
        r=(reveal >= k_end[:, None]).sum(dim=1).float() / G,
        one_step=k == 0,
    )


@dataclasses.dataclass
class AnswerScores:
    """The student's answer positions scored against the rollout's final tokens."""

    ce: torch.Tensor
    """(N, G) cross-entropy at the scored positions, 0 elsewhere."""
    greedy: torch.Tensor
    """(N, G) argmax (never [MASK]) at the scored positions, the rollout's tokens elsewhere."""


def row_losses(ce: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) cross-entropy ``ce`` (N, G) averaged over each row's ``targets`` (N, G) (0 for a row
    without targets)."""
    return (ce * targets).sum(dim=1) / targets.sum(dim=1).clamp(min=1)


def answer_scores(student, interval: RolloutInterval, latent: torch.Tensor | None, positions: torch.Tensor,
                  mask_id: int, chunk_bytes: int | None = None, anchor: torch.Tensor | None = None) -> AnswerScores:
    """u(x_t, r, t, z) at the answer positions ``positions`` (N, G) bool only: the trunk runs on the
    whole sequence, the head on those rows, ``chunk_bytes`` of logits at a time
    (``pipeline.models.logit_rows``). ``anchor`` (N,) bool: rows given the greedy anchor."""
    G = interval.tokens.shape[1]
    hidden = student.hidden(input_ids=interval.input_ids, attention_mask=interval.attention_mask, r=interval.r,
                            t=interval.t, latent=latent, anchor=anchor)[:, -G:]  # (N, G, C)

    def scores(h_rows: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = upcast(student.head(h_rows))  # (n, V), float32 at least
        with torch.no_grad():
            never_mask = torch.arange(logits.shape[-1], device=logits.device) == mask_id
            greedy = logits.masked_fill(never_mask, -torch.inf).argmax(-1)
        return F.cross_entropy(logits, labels, reduction="none"), greedy

    labels = interval.tokens[positions]  # (n,)
    ce, greedy = map_row_chunks(scores, (hidden[positions], labels), student.base.config.embedding_size, chunk_bytes)
    return AnswerScores(ce=torch.zeros(positions.shape, dtype=ce.dtype, device=ce.device).masked_scatter(positions, ce),
                        greedy=interval.tokens.masked_scatter(positions, greedy))


@dataclasses.dataclass
class LatentSelection:
    winner: torch.Tensor
    """(B, d) the draw with the lowest loss per rollout."""
    losses: torch.Tensor
    """(B, K) each draw's loss (no gradient)."""
    distinct: torch.Tensor
    """(B,) distinct greedy answers across the K draws (visible positions from the rollout)."""
    weights: torch.Tensor | None = None
    """(B, K) what each draw is trained with in expectation: softmax weights or responsibilities
    (None: winner-takes-all, a one-hot on the best draw)."""

    @property
    def gap(self) -> torch.Tensor:
        """(B,) mean minus best draw's loss: about 0 when the latent is ignored."""
        return self.losses.mean(dim=1) - self.losses.min(dim=1).values

    @property
    def credit(self) -> torch.Tensor:
        """(B, K) the training weight of each draw (sums to 1 per rollout)."""
        if self.weights is not None:
            return self.weights
        return F.one_hot(self.losses.argmin(dim=1), self.losses.shape[1]).to(self.losses.dtype)


@dataclasses.dataclass(frozen=True)
class Selection:
    """How a latent student's K scored draws per rollout are trained (``student.selection``)."""

    kind: str = "best"
    """``best``: the lowest-loss draw only (winner-takes-all); ``weighted``: every draw, weighted by
    sg(softmax(-loss / T)) of the row-mean losses; ``posterior``: soft EM, ``trained_draws`` draws
    sampled from the responsibilities softmax(log q(answer | z) / tau), log q the summed
    log-likelihood of the targets."""
    temperature: float = 0.0
    """T of ``weighted``, tau of ``posterior`` (1: the exact posterior under a uniform prior)."""
    draw_uniforms: torch.Tensor | None = None
    """(B, m) uniforms in [0, 1) picking the m draws ``posterior`` trains."""


def responsibilities(log_likelihood: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, K) softmax(log q / tau) over the K draws: the posterior over a uniform prior's draws at tau = 1,
    winner-takes-all (a one-hot on the most likely draw) as tau -> 0, uniform as tau -> inf."""
    if temperature <= 0:
        return F.one_hot(log_likelihood.argmax(dim=1), log_likelihood.shape[1]).to(log_likelihood.dtype)
    return torch.softmax(log_likelihood / temperature, dim=1)


def sample_draws(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B, m) draw indices, each drawn from the row's ``weights`` (B, K) by inverse CDF of ``uniforms``
    (B, m): training the m draws with weight 1/m is an unbiased estimate of sum_k w_k loss_k."""
    cdf = weights.double().cumsum(dim=1)
    u = uniforms.double() * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=weights.shape[1] - 1)


def repeat_rows(interval: RolloutInterval, K: int) -> RolloutInterval:
    """Each rollout K times in a row: row b's copies are rows b*K .. b*K + K - 1."""
    return RolloutInterval(*(getattr(interval, f.name).repeat_interleave(K, dim=0)
                             for f in dataclasses.fields(interval)))


def take_rows(interval: RolloutInterval, rows: torch.Tensor) -> RolloutInterval:
    """The rollouts selected by ``rows`` (B,) bool."""
    return RolloutInterval(*(getattr(interval, f.name)[rows] for f in dataclasses.fields(interval)))


def score_draws(scores: AnswerScores, expanded: RolloutInterval, latents: torch.Tensor) -> LatentSelection:
    """The selection from the scores of K draws per rollout (``latents`` (B, K, d)) at the masked answer
    positions of ``expanded`` (B*K rows)."""
    B, K, _ = latents.shape
    losses = row_losses(scores.ce.detach(), expanded.targets).view(B, K)
    answers = scores.greedy.view(B, K, -1)  # (B, K, G): greedy where masked, the rollout's tokens where visible
    distinct = torch.tensor([len(torch.unique(a, dim=0)) for a in answers], device=latents.device)
    winner = latents[torch.arange(B, device=latents.device), losses.argmin(dim=1)]
    return LatentSelection(winner=winner, losses=losses, distinct=distinct)


def masked_answer(interval: RolloutInterval, mask_id: int) -> torch.Tensor:
    """(N, G) bool: the answer positions still masked in x_t (the targets are among them)."""
    return interval.input_ids[:, -interval.tokens.shape[1]:] == mask_id


@torch.no_grad()
def select_latents(student, interval: RolloutInterval, latents: torch.Tensor, mask_id: int) -> LatentSelection:
    """Score K latent draws (B, K, d) per rollout in one batched pass without gradient (eval mode)
    and pick the best."""
    B, K, d = latents.shape
    expanded = repeat_rows(interval, K)
    was_training = student.training
    student.eval()
    scores = answer_scores(student, expanded, latents.reshape(B * K, d), masked_answer(expanded, mask_id), mask_id)
    student.train(was_training)
    return score_draws(scores, expanded, latents)


@dataclasses.dataclass
class RolloutLoss:
    loss: torch.Tensor
    """Scalar: the mean over rows of each row's cross-entropy at its targets."""
    rows: torch.Tensor
    """(B,) per-row losses (no gradient)."""
    one_step: torch.Tensor
    """(B,) bool: rows at the one-step point."""
    anchor: torch.Tensor
    """(B,) bool: rows trained on the greedy anchor."""
    selection: LatentSelection | None
    """The latent selection of the other rows (``~anchor``), when K > 1 draws were scored."""


def rollout_loss(student, interval: RolloutInterval, latents: torch.Tensor | None, mask_id: int,
                 selection: Selection = Selection(), anchor: torch.Tensor | None = None) -> RolloutLoss:
    """The rollout objective on one batch. ``latents``: (B, K, d) draws for a latent student, trained
    as ``selection`` says (by default the best of K; K = 1 trains the only draw), None without a
    latent. ``anchor`` (B,) bool: rows trained on the student's greedy anchor, without selection (their
    draws are unused). The head runs at the target positions only (at the masked answer positions
    when draws are scored)."""
    B, device = interval.tokens.shape[0], interval.tokens.device
    anchor = torch.zeros(B, dtype=torch.bool, device=device) if anchor is None else anchor
    parts, scored = [], None  # (rows (B,) bool, their losses)
    if anchor.any():
        anchored = take_rows(interval, anchor)
        n = anchored.tokens.shape[0]
        ce = answer_scores(student, anchored, torch.zeros(n, student.latent_dim, device=device), anchored.targets,
                           mask_id, anchor=torch.ones(n, dtype=torch.bool, device=device)).ce
        parts.append((anchor, row_losses(ce, anchored.targets)))
    if not anchor.all():
        drawn = take_rows(interval, ~anchor)
        if selection.draw_uniforms is not None:
            selection = dataclasses.replace(selection, draw_uniforms=selection.draw_uniforms[~anchor])
        drawn_rows, scored = drawn_row_losses(student, drawn, None if latents is None else latents[~anchor],
                                              mask_id, selection)
        parts.append((~anchor, drawn_rows))
    rows = torch.zeros(B, dtype=parts[0][1].dtype, device=device)
    for where, losses in parts:
        rows = rows.masked_scatter(where, losses)
    return RolloutLoss(loss=rows.mean(), rows=rows.detach(), one_step=interval.one_step, anchor=anchor,
                       selection=scored)


def drawn_row_losses(student, interval: RolloutInterval, latents: torch.Tensor | None, mask_id: int,
                     selection: Selection) -> tuple[torch.Tensor, LatentSelection | None]:
    """(B,) row losses (with gradient) given drawn latents (B, K, d) or none, and the selection among
    K > 1 draws (``rollout_loss``)."""
    if latents is None or latents.shape[1] == 1:
        latent = None if latents is None else latents[:, 0]
        return row_losses(answer_scores(student, interval, latent, interval.targets, mask_id).ce, interval.targets), None
    B, K, d = latents.shape
    if selection.kind == "weighted":
        expanded = repeat_rows(interval, K)
        scores = answer_scores(student, expanded, latents.reshape(B * K, d), masked_answer(expanded, mask_id), mask_id)
        losses = row_losses(scores.ce, expanded.targets).view(B, K)
        weights = torch.softmax(-losses.detach() / selection.temperature, dim=1)
        chosen = score_draws(scores, expanded, latents)
        return (weights * losses).sum(dim=1), dataclasses.replace(chosen, weights=weights)
    scored = select_latents(student, interval, latents, mask_id)
    if selection.kind == "best":
        latent = scored.winner
        return row_losses(answer_scores(student, interval, latent, interval.targets, mask_id).ce, interval.targets), scored
    # posterior: soft EM over the draws, m of them trained
    log_likelihood = -scored.losses * interval.targets.sum(dim=1, keepdim=True).clamp(min=1)  # (B, K)
    weights = responsibilities(log_likelihood, selection.temperature)
    picks = sample_draws(weights, selection.draw_uniforms.to(weights.device))  # (B, m)
    m = picks.shape[1]
    trained = repeat_rows(interval, m)
    chosen = latents.gather(1, picks[..., None].expand(-1, -1, d)).reshape(B * m, d)
    losses = row_losses(answer_scores(student, trained, chosen, trained.targets, mask_id).ce, trained.targets)
    return losses.view(B, m).mean(dim=1), dataclasses.replace(scored, weights=weights)
