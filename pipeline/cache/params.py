"""``cache``: stage one's (``cache_teacher``) section of ``params.yaml``."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from pipeline.core.params import require, require_at_least, require_seed


@dataclasses.dataclass
class RolloutParams:
    """``cache.rollouts``: the teacher's own sampler runs on training prompts, cached beside the top-k
    rows (format: ``pipeline.cache.rollouts``). What the one-step student needs to learn the teacher's
    multi-step outputs rather than its per-position marginals (README: the one-step student, trained on the teacher's rollouts)."""

    max_examples: int | None = 16000
    """Rollouts for the first N training examples (None: all of the cache's ``max_examples``)."""
    per_example: int = 4
    """Rollouts per example (0: no rollouts)."""
    greedy_first: bool = True
    """Rollout 0 of every example is greedy (temperature 0); the others sample at ``temperature``."""
    steps: int | None = None
    """Sampler steps (None: gen_length, the evaluation's multi-step setting)."""
    block_length: int | None = None
    """Semi-autoregressive block length (None: the whole answer in one block)."""
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    cfg_scale: float = 0.0
    """Unsupervised CFG of the sampler (0: none)."""
    temperature: float = 1.0
    """Temperature of the sampled rollouts (Gumbel-max)."""
    noise: Literal["per_step", "fixed", "shared"] = "per_step"
    """``per_step``: fresh Gumbel noise at every step; ``fixed``: one Gumbel field per rollout, reused at
    every step (the rollout is a function of (prompt, seed)); ``shared``: one of ``num_fields`` fields
    shared by every prompt, the rollout storing the field index."""
    num_fields: int = 4
    """Fields of the ``shared`` noise (sampled rollout i of a prompt uses field i mod num_fields)."""
    top_k: int = 0
    """Also store the teacher's top-k log-probs at each position's reveal step (0: not stored)."""
    rollouts_per_shard: int = 16384
    """Rollouts per shard file."""
    batch_size: int = 256
    """Rollouts sampled together. Part of the params hash (unlike ``cache.batch_size``): in bf16 on a
    GPU the logits of a row change in the last bits with the batch, and so can a sampler's choice.
    The sampler's peak memory grows with batch x block_length x vocabulary (LLaDA-8B: keep it small)."""

    def __post_init__(self) -> None:
        require(self.max_examples is None or self.max_examples >= 1, "max_examples", "must be >= 1 or null")
        require(self.per_example >= 0, "per_example", "must be >= 0")
        require_at_least(self, 1, "num_fields", "rollouts_per_shard", "batch_size")
        sampled = self.per_example - int(self.greedy_first)
        require(self.temperature > 0 or sampled <= 1 or self.remasking == "random", "per_example",
                f"{self.per_example} rollouts at temperature 0 would be copies of one another")
        require(self.noise != "shared" or sampled <= self.num_fields, "per_example",
                f"{sampled} sampled rollouts per prompt but {self.num_fields} shared fields: rollouts of one "
                f"prompt on the same field are copies (raise num_fields)")
        require(self.steps is None or self.steps >= 1, "steps", "must be >= 1 or null")
        require(self.block_length is None or self.block_length >= 1, "block_length", "must be >= 1 or null")
        require(self.top_k >= 0, "top_k", "must be >= 0")
        require(self.cfg_scale >= 0, "cfg_scale", "must be >= 0")
        require(self.temperature >= 0 and math.isfinite(self.temperature), "temperature", "must be finite and >= 0")

@dataclasses.dataclass
class CacheParams:
    """``cache``: stage one, the teacher's top-k log-probs on sampled (x_t, t) (stage ``cache_teacher``)."""

    samples_per_example: int = 4
    """Draws of (t, mask) per training example."""
    max_examples: int | None = 80000
    """Use only the first N training examples (None: all); the built-in train split interleaves its
    tasks, so a prefix is balanced."""
    top_k: int = 16
    """Log-probs kept per masked position (the rest is the tail mass)."""
    t_distribution: Literal["uniform", "logit_normal"] = "uniform"
    """Law of t for the non-fully-masked samples."""
    t_min: float = 0.02
    """Smallest t (uniform: t ~ U(t_min, 1]; logit-normal samples are clipped to it)."""
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    full_mask_fraction: float = 0.1
    """Fraction of samples at exactly t = 1 (every answer token masked): the one-step inference point."""
    cfg_scale: float = 0.0
    """Cache guided teacher logits ``un + (w + 1)(cond - un)`` (prompt masked for ``un``) when > 0."""
    rows_per_shard: int = 16384
    """Rows per shard file (bounded shard size)."""
    record_batch_rows: int = 512
    """Rows per Arrow record batch: the unit of random access and decompression."""
    batch_size: int = 256
    """Teacher forward batch of the top-k rows (speed only: not part of the params hash)."""
    seed: int = 0
    rollouts: RolloutParams = dataclasses.field(default_factory=RolloutParams)

    def content(self) -> dict:
        """The params that determine the cache's content (its params hash): all but ``batch_size``,
        which changes speed only."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "batch_size"}

    def __post_init__(self) -> None:
        require_at_least(self, 1, "samples_per_example", "top_k", "rows_per_shard", "record_batch_rows", "batch_size")
        require_seed(self)
        require(self.max_examples is None or self.max_examples >= 1, "max_examples", "must be >= 1 or null")
        require(0.0 < self.t_min < 1.0, "t_min", "must be in (0, 1)")
        require(self.logit_normal_std > 0, "logit_normal_std", "must be > 0")
        require(0.0 <= self.full_mask_fraction <= 1.0, "full_mask_fraction", "must be in [0, 1]")
        require(self.cfg_scale >= 0, "cfg_scale", "must be >= 0")
