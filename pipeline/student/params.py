"""``student``: stage two's (``train_student``) section of ``params.yaml``."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pipeline.core.params import require, require_at_least, require_seed, require_time_cap
from pipeline.student.soft_prompt import SoftPromptConfig


@dataclasses.dataclass
class StudentParams:
    """``student``: the soft prompt and its MeanFlow distillation (stage ``train_student``)."""

    soft_prompt: SoftPromptConfig = dataclasses.field(default_factory=SoftPromptConfig)
    meanflow_weight: float = 0.0
    """Weight of the seed's MeanFlow objective on the cache's top-k rows (0: off)."""
    rollout_weight: float = 1.0
    """Weight of the rollout objective on the cache's teacher rollouts (``pipeline.student.rollout_objective``; 0: off)."""
    rollouts: Literal["all", "greedy", "sampled"] = "all"
    """Which cached rollouts the rollout objective trains on (greedy: temperature 0)."""
    one_step_fraction: float = 0.5
    """Probability that a rollout row starts fully masked (k = 0, t = 1: the one-step point); the
    others start after a uniform step 1 .. steps - 1."""
    r0_fraction: float = 0.5
    """Probability that a rollout row's target is the whole rest of the trajectory (r = 0); the others
    end after a uniform later step."""
    latent_draws: int = 4
    """K: latents drawn per rollout for a latent student (``soft_prompt.latent_dim`` > 0); the best one
    (lowest loss, scored without gradient) is trained."""
    selection_temperature: float = 0.0
    """0: train only the best of the K draws (winner-takes-all); T > 0: train every draw, weighted by
    softmax(-loss / T) over the draws (annealed selection)."""
    tangent: Literal["linear", "seed"] = "linear"
    """dz/dt of the JVP: the forward process's mean-embedding path, or the seed's literal form."""
    loss: Literal["kl", "mse"] = "kl"
    ce_weight: float = 0.0
    """Weight of an auxiliary cross-entropy to the clean tokens x0."""
    adaptive_power: float = 1.0
    """MeanFlow's adaptive weight sg(1 / (loss + eps) ** p); 0 disables it."""
    adaptive_eps: float = 1e-3
    equal_fraction: float = 0.75
    """Fraction of samples with r = t (plain distillation of v); MeanFlow uses 25-75%."""
    tail: Literal["uniform", "drop"] = "uniform"
    """Dense reconstruction of v from the cached top-k."""
    jvp: Literal["no_grad", "grad"] = "no_grad"
    """``no_grad``: JVP without a graph, then an ordinary forward for the gradient (less memory);
    ``grad``: one grad-mode JVP whose primal is u."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    batch_size: int = 64
    """Rows per device per step."""
    max_steps: int = 1000
    max_minutes: float | None = None
    """Wall-clock cap (null: none). A cap that stops training before ``max_steps`` fails the stage and
    publishes no student; the run's checkpoints stay, so raising the cap and ``--resume`` finish it."""
    eval_every: int = 100
    """Steps between one-step validation accuracy measurements."""
    devices: int = 1
    strategy: str = "auto"
    """Lightning strategy (``ddp`` for several GPUs)."""
    precision: str | None = None
    """Lightning precision (one of ``PRECISIONS``); default bf16-mixed on GPU, 32-true on CPU."""
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "batch_size", "max_steps", "eval_every", "devices", "latent_draws")
        require_seed(self)
        require_at_least(self, 0, "meanflow_weight", "rollout_weight", "selection_temperature")
        require(self.meanflow_weight > 0 or self.rollout_weight > 0, "rollout_weight",
                "meanflow_weight and rollout_weight are both 0: nothing to train")
        require(self.rollouts in ("all", "greedy", "sampled"), "rollouts", "must be 'all', 'greedy' or 'sampled'")
        for key in ("one_step_fraction", "r0_fraction"):
            require(0.0 <= getattr(self, key) <= 1.0, key, "must be in [0, 1]")
        require_at_least(self, 0, "warmup_steps", "num_workers", "ce_weight", "adaptive_power", "weight_decay")
        require(0.0 <= self.equal_fraction <= 1.0, "equal_fraction", "must be in [0, 1]")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.adaptive_eps > 0, "adaptive_eps", "must be > 0")
        require_time_cap(self.max_minutes)
        require(self.precision is None or self.precision in PRECISIONS, "precision",
                f"{self.precision!r} is not one of {', '.join(PRECISIONS)} (or null)")

PRECISIONS = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "transformer-engine",
              "transformer-engine-float16", "64", "32", "16", "bf16")
"""The precision values Lightning accepts."""
