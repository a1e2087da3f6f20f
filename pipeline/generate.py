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

from typing import Callable, Literal

import torch
import torch.nn.functional as F

from pipeline.llada import upcast

# A mask predictor maps (input_ids (B, T), attention_mask (B, T) or None) to logits (B, T, V).
MaskPredictor = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Remasking = Literal["low_confidence", "random"]


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None):
    """Gumbel-max in float64: the argmax of the result samples softmax(logits / T).

    The reference computes ``exp(logits) / (-log u) ** T``; this is its logarithm divided by T (same
    argmax), which cannot overflow when guidance makes logits large."""
    if temperature == 0:
        return logits
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return logits.to(torch.float64) / temperature - torch.log(-torch.log(noise))


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each step (B, steps): an even split, the remainder on the first steps."""
    total = mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base, remainder = total // steps, total % steps
    step = torch.arange(steps, device=mask_index.device)[None, :]  # (1, steps)
    return base + (step < remainder).long()


def guided_logits(
    model: MaskPredictor,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_index: torch.Tensor,
    cfg_scale: float,
    mask_id: int,
    window: slice = slice(None),
) -> torch.Tensor:
    """Logits of ``model`` on ``x`` at positions ``window``; with ``cfg_scale > 0`` unsupervised CFG
    against the same input with the prompt positions replaced by ``mask_id``."""
    if cfg_scale <= 0:
        return model(x, attention_mask)[:, window]
    unconditional = x.masked_fill(prompt_index, mask_id)
    both = torch.cat((x, unconditional), dim=0)
    mask = None if attention_mask is None else torch.cat((attention_mask, attention_mask), dim=0)
    cond, un = model(both, mask)[:, window].chunk(2, dim=0)
    return un + (cfg_scale + 1) * (cond - un)


@torch.no_grad()
def generate(
    model: MaskPredictor,
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
) -> torch.Tensor:
    """Fill ``gen_length`` masked positions after ``prompt`` (B, Lp); returns (B, Lp + gen_length).

    ``attention_mask`` (B, Lp) marks real prompt tokens (left padding is 0); the answer is always
    attended. ``steps == 1`` with ``block_length == gen_length`` is one-step generation.

    Two deliberate departures from the reference: the mask token is never predicted (the reference
    can "commit" [MASK], which leaves the position masked, spends that step's budget and is revisited
    in later blocks; a trained LLaDA does not do this, a random one does), and noise (Gumbel, ``random`` remasking) is drawn only
    for the current block, never for the whole (B, T, V) logits (10 GB in float64 for LLaDA-8B at
    B = 32): with temperature > 0 the draws differ from the reference's, not their distribution.
    Otherwise the output equals the reference's exactly (tested).
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
    steps_per_block = steps // num_blocks
    B, Lp = prompt.shape
    x = torch.full((B, Lp + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :Lp] = prompt
    prompt_index = x != mask_id
    if attention_mask is not None:
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(B, gen_length)), dim=1)
    rank = torch.arange(block_length, device=x.device)[None, :]  # (1, block)

    for block in range(num_blocks):
        window = slice(Lp + block * block_length, Lp + (block + 1) * block_length)
        schedule = num_transfer_tokens(x[:, window] == mask_id, steps_per_block)  # (B, steps)
        for i in range(steps_per_block):
            current = x[:, window]  # (B, block)
            mask_index = current == mask_id
            logits = guided_logits(model, x, attention_mask, prompt_index, cfg_scale, mask_id, window)
            logits[..., mask_id] = -torch.inf  # committing [MASK] would be a wasted no-op
            x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)  # (B, block)
            if remasking == "low_confidence":
                # fp32 at least: bf16 probabilities tie often and would make the ranking arbitrary.
                p = F.softmax(upcast(logits), dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape, generator=generator, device=x.device)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            # Commit the schedule[:, i] most confident masked positions of each row.
            order = confidence.argsort(dim=-1, descending=True, stable=True)
            transfer = torch.zeros_like(mask_index).scatter(1, order, rank < schedule[:, i : i + 1])
            x[:, window] = torch.where(transfer, x0, current)
    return x


def one_step_generate(model: MaskPredictor, prompt: torch.Tensor, gen_length: int, **options) -> torch.Tensor:
    """Fill the whole answer in a single forward pass (the student's inference; the teacher's baseline)."""
    return generate(model, prompt, steps=1, gen_length=gen_length, block_length=gen_length, **options)


def mask_predictor(model) -> MaskPredictor:
    """Adapt a network called as ``model(input_ids=..., attention_mask=...)`` to the sampler's
    interface: a ``LLaDA``, or a ``Student``, whose defaults r = 0, t = 1 are the one-step
    inference point."""
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask)
