"""``evaluate``: the stage ``evaluate``'s section of ``params.yaml``."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pipeline.core.params import require, require_at_least, require_seed
from pipeline.data.scoring import parse_scorer


@dataclasses.dataclass
class EvaluateParams:
    """``evaluate``: the held-out comparison of teacher and student (stage ``evaluate``)."""

    teacher_steps: list[int] | None = None
    """Teacher step counts (``gen_length`` is always added); null: 1, 2, 4, ... and ``gen_length``
    (times the number of blocks)."""
    student_steps: list[int] | None = None
    """Student step counts (1 is always added: the one-step student); null: the teacher's default
    list, so both curves have the same points."""
    block_length: int | None = None
    """The semi-autoregressive block length; null: the whole answer is one block
    (LLaDA-8B-Instruct is usually decoded in blocks of 32). Teacher and student use the same; one
    step is always one block."""
    cfg_scale: float = 0.5
    """Guidance scale w of the "with CFG" settings (logits un + (w + 1)(cond - un)); 0: none."""
    temperature: float = 1.0
    """Temperature of the sampled settings."""
    samples: int = 4
    """Completions per prompt in the sampled settings (accuracy and distinct valid completions)."""
    batch_size: int = 256
    """Completions decoded together, the same for every setting (seconds per sample depend on it);
    CFG doubles the rows the network sees. LLaDA-8B on one 80 GB GPU: 16 or less."""
    timing_repeats: int = 3
    """Greedy settings are decoded this many times and the fastest time is reported."""
    noise_variants: list[Literal["fixed", "shared"]] = dataclasses.field(default_factory=lambda: ["fixed", "shared"])
    """Extra sampled rows of the teacher at ``gen_length`` steps with coupled noise: ``fixed`` (one
    Gumbel field per completion at every step), ``shared`` (completion i of every prompt uses field
    i mod ``num_fields``), as stage one's ``cache.rollouts.noise``. The plain sampled rows draw
    fresh noise at every step (``per_step``)."""
    num_fields: int = 4
    """Fields of the ``shared`` noise variant."""
    scorer: str | None = None
    """How a completion is judged (``pipeline.data.scoring``): ``builtin`` (the task suite by task,
    other rows by exact match), ``exact``, ``gsm8k`` (lm-eval's strict match), ``gsm8k_flexible``,
    ``math_boxed``, ``regex:<pattern>``; null: ``builtin``. Validation during training and stage
    one's rollout report judge with it too."""
    seed: int = 0
    num_threads: int = 0
    """CPU threads for torch; 0: torch's default."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, "samples", "batch_size", "timing_repeats", "num_fields")
        require_seed(self)
        if self.scorer is not None:
            try:
                parse_scorer(self.scorer)
            except ValueError as err:
                raise ValueError(f"scorer: {err}") from err
        require_at_least(self, 0, "cfg_scale", "num_threads")
        require(self.temperature > 0, "temperature", "must be > 0 (greedy settings are always included)")
        if self.block_length is not None:
            require(self.block_length >= 1, "block_length", "must be >= 1")
        for key in ("teacher_steps", "student_steps"):
            steps = getattr(self, key)
            require(steps is None or (len(steps) > 0 and all(isinstance(n, int) and n >= 1 for n in steps)), key,
                    "must be a non-empty list of positive step counts (or null)")
