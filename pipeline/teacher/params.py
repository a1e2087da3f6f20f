"""``teacher``: the stage ``teacher``'s section of ``params.yaml``."""

from __future__ import annotations

import dataclasses
import math

from pipeline.core.params import require, require_at_least, require_seed, require_time_cap


@dataclasses.dataclass
class TeacherModelParams:
    """Architecture of the built-in teacher (a LLaDA config)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    mlp_hidden_size: int = 384
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size")
        require(self.d_model % self.n_heads == 0, "d_model", "must be divisible by n_heads")
        require(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", "must divide n_heads")
        require((self.d_model // self.n_heads) % 2 == 0, "d_model",
                f"d_model / n_heads (the head size, {self.d_model // self.n_heads}) must be even for rotary embeddings")
        require(self.rope_theta > 0, "rope_theta", "must be > 0")

@dataclasses.dataclass
class TeacherTrainParams:
    """Pretraining of the built-in teacher with LLaDA's SFT objective."""

    max_steps: int = 2500
    """Optimizer steps."""
    max_minutes: float | None = None
    """Wall-clock cap (null: none). A cap that stops pretraining before ``max_steps`` fails the stage
    and saves nothing: a teacher cut by the clock would depend on the machine's speed and load."""
    batch_size: int = 256
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup_steps: int = 100
    weight_decay: float = 0.01
    min_mask_ratio: float = 1e-3
    """eps of LLaDA's t ~ U(eps, 1]."""
    task_weights: dict[str, float] | None = dataclasses.field(
        default_factory=lambda: {"add": 2.5, "sort": 1.25, "perm": 1.25, "word": 0.5})
    """Relative rate at which each built-in task's training examples are drawn (tasks learned slowly,
    like ``add``, oversampled); null: every training example equally often (external data)."""
    seed: int = 0
    num_threads: int = 0
    """torch CPU threads (0: torch's default)."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, "max_steps", "batch_size")
        require_at_least(self, 0, "warmup_steps", "num_threads")
        require_time_cap(self.max_minutes)
        if self.task_weights is not None:
            for task, weight in self.task_weights.items():
                require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 <= weight < math.inf,
                        f"task_weights.{task}", f"must be a finite number >= 0, got {weight!r}")
            require(any(w > 0 for w in self.task_weights.values()), "task_weights", "needs a weight > 0")
        require(self.lr > 0, "lr", "must be > 0")
        require_seed(self)
        require(0 < self.min_mask_ratio < 1, "min_mask_ratio", "must be in (0, 1)")

@dataclasses.dataclass
class TeacherParams:
    """``teacher``: an existing LLaDA checkpoint, or the built-in one to pretrain (stage ``teacher``)."""

    checkpoint: str | None = None
    """Local directory or Hugging Face id of a LLaDA checkpoint; null pretrains the built-in teacher."""
    mask_token_id: int | None = None
    """Override the checkpoint's ``mask_token_id`` (LLaDA-8B: 126336; LLaDA-MoE: 156895)."""
    fingerprint: str = "sampled"
    """How later stages recognize the teacher's weights: ``sampled`` (the safetensors headers and sixteen
    1 MiB slices of each weight file: fast at any size, blind to a flipped byte between the slices) or
    ``full`` (every byte, read by every stage that loads the teacher)."""
    model: TeacherModelParams = dataclasses.field(default_factory=TeacherModelParams)
    train: TeacherTrainParams = dataclasses.field(default_factory=TeacherTrainParams)

    def __post_init__(self) -> None:
        require(self.fingerprint in ("sampled", "full"), "fingerprint",
                f"must be sampled or full, got {self.fingerprint!r}")
