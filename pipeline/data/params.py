"""``data``: the stage ``prepare_data``'s section of ``params.yaml``."""

from __future__ import annotations

import dataclasses

from pipeline.core.params import require, require_at_least, require_seed
from pipeline.data.tasks import TASKS


@dataclasses.dataclass
class DataParams:
    """``data``: where examples come from and the sequence layout (stage ``prepare_data``)."""

    source: str = "builtin"
    """``builtin`` (the task suite), a local ``.jsonl`` file, or a Hugging Face dataset id."""
    seed: int = 0
    """Seed of the built-in generator and of the split of external data."""
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["add", "sort", "perm", "word"])
    """Built-in tasks to include."""
    train_per_task: int = 100000
    """Built-in training examples per task."""
    val_per_task: int = 64
    """Built-in validation prompts per task."""
    test_per_task: int = 100
    """Built-in held-out test prompts per task."""
    prompt_field: str = "prompt"
    """External data: field holding the prompt."""
    response_field: str = "response"
    """External data: field holding the answer."""
    hf_split: str = "train"
    """Hugging Face dataset: split to read (then divided into train/val/test by prompt)."""
    val_fraction: float = 0.02
    """External data: fraction of distinct prompts held out for validation."""
    test_fraction: float = 0.02
    """External data: fraction of distinct prompts held out for testing."""
    prompt_length: int = 14
    """Tokens in the (left-padded) prompt region; longer prompts are refused."""
    gen_length: int = 7
    """Tokens in the answer region (answer, then EOS padding)."""
    answer_suffix: str | None = None
    """Token appended to every answer before the EOS padding (``<|eot_id|>`` for LLaDA-8B-Instruct)."""
    chat_template: bool | None = None
    """Wrap prompts in the tokenizer's chat template (None: when the tokenizer has one)."""

    def __post_init__(self) -> None:
        for i, task in enumerate(self.tasks):
            require(task in TASKS, f"tasks[{i}]", f"unknown task {task!r} (known: {', '.join(TASKS)})")
        require(len(set(self.tasks)) == len(self.tasks), "tasks", "tasks repeat")
        require(self.source != "builtin" or len(self.tasks) > 0, "tasks", "the built-in suite needs at least one task")
        require_seed(self)
        require_at_least(self, 1, "train_per_task", "val_per_task", "test_per_task", "gen_length")
        require_at_least(self, 2, "prompt_length")
        for key in ("val_fraction", "test_fraction"):
            require(0.0 < getattr(self, key) < 0.5, key, "must be in (0, 0.5)")
