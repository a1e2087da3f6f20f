"""LLaDA's reference sampler (block decoding, low-confidence remasking, unsupervised CFG), batched,
and one-step generation. The command line is ``pipeline.generate_cli``.

The sampler follows the official LLaDA / LLaDA-MoE ``generate`` (seeds/004): the answer region starts
fully masked; it is split into blocks filled left to right; each block gets ``steps / num_blocks``
steps, and each step commits the scheduled number of masked tokens of the current block, picking
the most confident predictions (``low_confidence``) or random ones (``random``); the others stay
masked. ``temperature > 0`` samples with Gumbel noise in float64. ``cfg_scale = w > 0`` runs the
unconditional branch (prompt replaced by mask tokens) and uses ``un + (w + 1) * (cond - un)``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from pipeline.generation.noise import GeneratorNoise, Noise, gumbel_perturbed
from pipeline.models.layers import upcast

Remasking = Literal["low_confidence", "random"]


@dataclasses.dataclass(frozen=True)
class SamplerNetwork:
    """A network split at its LM head, as the sampler and stage one call it: ``hidden(input_ids (B, T),
    attention_mask (B, T) or None)`` runs the trunk once, (B, T, C); ``head`` maps any rows of hidden
    states (N, C) to logits (N, V), so logits exist only where they are needed. ``mask_predictor``
    builds one for a LLaDA or a Student."""

    hidden: Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]


def as_sampler_network(model: "SamplerNetwork | Callable") -> SamplerNetwork:
    """``model`` itself, or a plain function (input_ids, attention_mask) -> logits (B, T, V) (a
    network without a trunk/head split, or a scripted one in tests) seen as a trunk whose "hidden
    states" are its logits and an identity head: it works, at its (B, T, V) cost."""
    return model if isinstance(model, SamplerNetwork) else SamplerNetwork(hidden=model, head=identity_head)


def identity_head(rows: torch.Tensor) -> torch.Tensor:
    """The head of a predictor whose "hidden states" are already logits."""
    return rows


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each step (B, steps): an even split, the remainder on the first steps."""
    total = mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base, remainder = total // steps, total % steps
    step = torch.arange(steps, device=mask_index.device)[None, :]  # (1, steps)
    return base + (step < remainder).long()


@dataclasses.dataclass
class HiddenRows:
    """The trunk's hidden states at selected positions, and their (guided) logits for any slice of rows."""

    cond: torch.Tensor
    """(N, C) at the selected positions, row-major."""
    uncond: torch.Tensor | None
    """(N, C) the unconditional branch's (CFG), None without guidance."""
    head: Callable[[torch.Tensor], torch.Tensor]
    cfg_scale: float = 0.0

    def logits(self, rows: slice = slice(None)) -> torch.Tensor:
        """(n, V) logits of ``rows``; with CFG ``un + (w + 1) * (cond - un)``, the two branches run
        through the head as stacked rows."""
        if self.uncond is None:
            return self.head(self.cond[rows])
        cond, un = self.head(torch.cat((self.cond[rows], self.uncond[rows]))).chunk(2)  # (n, V) each
        return un + (self.cfg_scale + 1) * (cond - un)


def guided_hidden(
    model: SamplerNetwork,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_index: torch.Tensor,
    cfg_scale: float,
    mask_id: int,
    positions: torch.Tensor,
) -> HiddenRows:
    """The trunk of ``model`` once on ``x`` (B, T), kept at ``positions`` (B, T) bool; with
    ``cfg_scale > 0`` also on the unconditional input (prompt positions replaced by ``mask_id``),
    in the same batch. ``.logits()`` gives the (guided) logits of those positions only."""
    if cfg_scale <= 0:
        return HiddenRows(model.hidden(x, attention_mask)[positions], None, model.head)
    unconditional = x.masked_fill(prompt_index, mask_id)
    both = torch.cat((x, unconditional), dim=0)
    mask = None if attention_mask is None else torch.cat((attention_mask, attention_mask), dim=0)
    cond, un = model.hidden(both, mask).chunk(2, dim=0)  # (B, T, C) each
    return HiddenRows(cond[positions], un[positions], model.head, cfg_scale)


@dataclasses.dataclass
class Trajectory:
    """What the sampler did. It never re-masks a committed token, so the state after step k is the
    prompt plus the answer positions with ``reveal_step < k`` (the others masked)."""

    sequences: torch.Tensor
    """(B, Lp + gen_length) final tokens."""
    reveal_step: torch.Tensor
    """(B, gen_length) int16: the step (0-based, counted over all blocks) that committed each position."""
    reveal_topk_ids: torch.Tensor | None = None
    """(B, gen_length, k) int32, with ``record_top_k = k``: the top-k ids of the (guided) logits'
    log-softmax at each position's reveal step, descending."""
    reveal_topk_logprobs: torch.Tensor | None = None
    """(B, gen_length, k) float32: their log-probs (over the full vocabulary)."""


def generate(model: SamplerNetwork, prompt: torch.Tensor, attention_mask: torch.Tensor | None = None,
             **options) -> torch.Tensor:
    """Fill ``gen_length`` masked positions after ``prompt`` (B, Lp); returns (B, Lp + gen_length).
    Options as ``sample_trajectory``."""
    return sample_trajectory(model, prompt, attention_mask, **options).sequences


@torch.no_grad()
def sample_trajectory(
    model: SamplerNetwork,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: Remasking = "low_confidence",
    mask_id: int = 126336,
    generator: torch.Generator | None = None,
    noise: Noise | None = None,
    record_top_k: int = 0,
) -> Trajectory:
    """LLaDA's sampler on ``prompt`` (B, Lp), recording when each answer position was committed.

    ``attention_mask`` (B, Lp) marks real prompt tokens (left padding is 0); the answer is always
    attended. ``steps == 1`` with ``block_length == gen_length`` is one-step generation. Randomness
    (Gumbel noise at ``temperature > 0``, ``random`` remasking) comes from ``noise``, by default
    fresh draws from ``generator`` at every step.

    Two deliberate departures from the reference: the mask token is never predicted (the reference
    can "commit" [MASK], which leaves the position masked, spends that step's budget and is revisited
    in later blocks; a trained LLaDA does not do this, a random one does), and noise is drawn only
    for the current block, never for the whole (B, T, V) logits (10 GB in float64 for LLaDA-8B at
    B = 32): with temperature > 0 the draws differ from the reference's, not their distribution.
    Otherwise the output equals the reference's exactly (tested).

    Memory: the trunk runs on the whole sequence, the head only on the current block's masked
    positions (M, V) (CFG stacks the unconditional rows under them); ``CounterNoise`` draws for
    those positions only, ``GeneratorNoise`` for the block (its stream keeps seeded runs unchanged).
    ``model`` is a ``SamplerNetwork`` (``mask_predictor``), or a plain function returning full logits
    (see ``as_sampler_network``).
    """
    if gen_length < 1 or block_length < 1 or steps < 1:
        raise ValueError("gen_length, block_length and steps must be positive")
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps {steps} is not a multiple of the number of blocks {num_blocks}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
    noise = noise if noise is not None else GeneratorNoise(generator)
    model = as_sampler_network(model)
    steps_per_block = steps // num_blocks
    B, Lp = prompt.shape
    x = torch.full((B, Lp + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :Lp] = prompt
    prompt_index = x != mask_id
    if attention_mask is not None:
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(B, gen_length)), dim=1)
    rank = torch.arange(block_length, device=x.device)[None, :]  # (1, block)
    reveal_step = torch.full((B, gen_length), -1, dtype=torch.int16, device=x.device)
    if record_top_k:
        reveal_ids = torch.zeros((B, gen_length, record_top_k), dtype=torch.int32, device=x.device)
        reveal_logprobs = torch.zeros((B, gen_length, record_top_k), dtype=torch.float32, device=x.device)

    for block in range(num_blocks):
        offset = block * block_length  # answer position of the block's first token
        window = slice(Lp + offset, Lp + offset + block_length)
        schedule = num_transfer_tokens(x[:, window] == mask_id, steps_per_block)  # (B, steps)
        for i in range(steps_per_block):
            step = block * steps_per_block + i
            current = x[:, window]  # (B, block)
            mask_index = current == mask_id
            positions = torch.zeros_like(prompt_index)
            positions[:, window] = mask_index
            # Logits only at the block's masked positions, the only ones a step can commit: (M, V).
            logits = guided_hidden(model, x, attention_mask, prompt_index, cfg_scale, mask_id, positions).logits()
            if record_top_k:
                top_logprobs, top_ids = torch.log_softmax(upcast(logits), dim=-1).topk(record_top_k, dim=-1)
            logits[..., mask_id] = -torch.inf  # committing [MASK] would be a wasted no-op
            if temperature > 0:
                uniforms = noise.gumbel_uniforms(mask_index, logits.shape[-1], step, offset)  # (M, V)
                x0_masked = torch.argmax(gumbel_perturbed(logits, temperature, uniforms), dim=-1)  # (M,)
            else:
                x0_masked = torch.argmax(logits, dim=-1)
            if remasking == "low_confidence":
                # fp32 at least: bf16 probabilities tie often and would make the ranking arbitrary.
                p = F.softmax(upcast(logits), dim=-1)
                x0_p = torch.gather(p, -1, x0_masked[:, None]).squeeze(-1)  # (M,)
            else:
                x0_p = noise.remask_uniforms(tuple(mask_index.shape), x.device, step, offset)[mask_index]
            x0 = current.masked_scatter(mask_index, x0_masked)  # (B, block)
            confidence = torch.full(mask_index.shape, -torch.inf, dtype=x0_p.dtype, device=x.device)
            confidence[mask_index] = x0_p
            # Commit the schedule[:, i] most confident masked positions of each row.
            order = confidence.argsort(dim=-1, descending=True, stable=True)
            transfer = torch.zeros_like(mask_index).scatter(1, order, rank < schedule[:, i : i + 1])
            x[:, window] = torch.where(transfer, x0, current)
            reveal_step[:, offset : offset + block_length].masked_fill_(transfer, step)
            if record_top_k:
                answer = slice(offset, offset + block_length)
                committed = transfer[mask_index]  # (M,) the masked positions this step commits
                reveal_ids[:, answer][transfer] = top_ids[committed].int()
                reveal_logprobs[:, answer][transfer] = top_logprobs[committed].float()
    if record_top_k:
        return Trajectory(x, reveal_step, reveal_ids, reveal_logprobs)
    return Trajectory(x, reveal_step)


def one_step_generate(model: SamplerNetwork, prompt: torch.Tensor, gen_length: int, **options) -> torch.Tensor:
    """Fill the whole answer in a single forward pass (the student's inference; the teacher's baseline)."""
    return generate(model, prompt, steps=1, gen_length=gen_length, block_length=gen_length, **options)


def mask_predictor(model, latent: torch.Tensor | None = None) -> SamplerNetwork:
    """The sampler's view of a network with ``hidden(input_ids=..., attention_mask=...)`` and
    ``head``: a ``LLaDA``, or a ``Student``, whose defaults r = 0, t = 1 are the one-step
    inference point (a network with only ``forward`` gives its full logits, as ``as_sampler_network``).
    ``latent`` (B, d): a latent student's z per row, the same at every step (CFG's unconditional
    rows reuse their row's z)."""
    split = hasattr(model, "hidden")
    trunk = model.hidden if split else model

    def hidden(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if latent is None:
            return trunk(input_ids=ids, attention_mask=mask)
        z = latent.to(ids.device).repeat(ids.shape[0] // latent.shape[0], 1)  # (B or 2B, d)
        return trunk(input_ids=ids, attention_mask=mask, latent=z)

    return SamplerNetwork(hidden=hidden, head=model.head if split else identity_head)
