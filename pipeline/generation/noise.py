"""The sampler's randomness: fresh draws from a ``torch.Generator``, or counter-based noise that is a
pure function of (seed, step, position, token id), so a completion or a cached rollout can be
regenerated on any device and in any batch; the seeds and latents of completions.

Gumbel-max in float64 (``gumbel_perturbed``) turns the uniforms into samples.
"""

from __future__ import annotations

import torch

from pipeline.core.counter_random import (COMPLETION_LATENT, COMPLETION_SEED, FIELD_SEED, REMASK, counter_hash,
                                          counter_normal, counter_uniform)


class GeneratorNoise:
    """Fresh draws from a ``torch.Generator`` at every step (the reference sampler's noise)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def gumbel_uniforms(self, where: torch.Tensor, vocab_size: int, step: int, offset: int) -> torch.Tensor:
        """(M, V) float64 uniforms for the positions ``where`` (B, W) of the block. Drawn for the whole
        block (B, W, V), then selected, so the generator's stream, and the samples of a seeded run,
        do not depend on which positions are still masked."""
        block = torch.rand((*where.shape, vocab_size), generator=self.generator, dtype=torch.float64,
                           device=where.device)
        return block[where]

    def remask_uniforms(self, shape: tuple[int, int], device, step: int, offset: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=device)


class CounterNoise:
    """Per-row noise that is a pure function of the row's seed (``seeds`` (B,) int64), regenerable on
    any device: the Gumbel uniform of answer position p and token id v at step s is
    ``counter_uniform(seed, s, p, v)``, or with ``fixed`` ``counter_uniform(seed, p, v)`` at every step
    (one Gumbel field per row, so the completion is a deterministic function of (prompt, seed))."""

    def __init__(self, seeds: torch.Tensor, fixed: bool = False):
        self.seeds, self.fixed = torch.as_tensor(seeds, dtype=torch.int64), fixed

    def gumbel_uniforms(self, where: torch.Tensor, vocab_size: int, step: int, offset: int) -> torch.Tensor:
        """(M, V) float64 uniforms for the positions ``where`` (B, W) of the block starting at answer
        position ``offset``, computed for those positions only."""
        row, column = where.nonzero(as_tuple=True)  # (M,) each
        seeds = self.seeds.to(where.device)[row, None]  # (M, 1)
        position = (offset + column)[:, None]  # (M, 1)
        token = torch.arange(vocab_size, device=where.device)[None, :]  # (1, V)
        return counter_uniform(seeds, position, token) if self.fixed else counter_uniform(seeds, step, position, token)

    def remask_uniforms(self, shape: tuple[int, int], device, step: int, offset: int) -> torch.Tensor:
        position = offset + torch.arange(shape[1], device=device)[None, :]
        return counter_uniform(self.seeds.to(device)[:, None], REMASK, step, position).float()


Noise = GeneratorNoise | CounterNoise


def completion_seeds(seed: int, example: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """Noise seeds (int64) of completions ``draw`` of prompts ``example``: ``counter_hash(seed, 1,
    example, draw)``, each completion its own."""
    return counter_hash(seed, COMPLETION_SEED, example, draw)


def field_seeds(seed: int, field: torch.Tensor) -> torch.Tensor:
    """Seeds of shared Gumbel fields ``field``: ``counter_hash(seed, 2, field)``, the same for every
    prompt (the ``shared`` coupling)."""
    return counter_hash(seed, FIELD_SEED, field)


def completion_latents(seed: int, example: torch.Tensor, draw: torch.Tensor, dim: int) -> torch.Tensor:
    """The student's latents z ~ N(0, I_dim) (N, dim) of completions ``draw`` of prompts ``example``
    (``counter_normal(dim, seed, 3, example, draw)``): completion i of a prompt always gets the same z,
    whatever the batch it is decoded in."""
    return counter_normal(dim, seed, COMPLETION_LATENT, torch.as_tensor(example), torch.as_tensor(draw))


def gumbel_perturbed(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> torch.Tensor:
    """Gumbel-max in float64: the argmax of ``logits / T + g``, g = -log(-log u), samples softmax(logits / T).

    The reference computes ``exp(logits) / (-log u) ** T``; this is its logarithm divided by T (same
    argmax), which cannot overflow when guidance makes logits large."""
    return logits.to(torch.float64) / temperature - torch.log(-torch.log(uniforms))


def completion_noise(noise: str, seed: int, rows: torch.Tensor, samples: torch.Tensor, num_fields: int):
    """The counter-based noise of completions (row, sample) under ``fixed`` (one field per
    completion) or ``shared`` (sample i of every row uses field i mod ``num_fields``)."""
    if noise == "fixed":
        return CounterNoise(completion_seeds(seed, rows, samples), fixed=True)
    if noise == "shared":
        return CounterNoise(field_seeds(seed, samples % num_fields), fixed=True)
    raise ValueError(f"noise must be 'fixed' or 'shared', got {noise!r}")
