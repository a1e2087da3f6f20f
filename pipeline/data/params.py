"""``data``: the stage ``prepare_data``'s section of ``params.yaml``."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pipeline.core.params import require, require_at_least, require_seed
from pipeline.data.tasks import TASKS


@dataclasses.dataclass
class DataParams:
    """``data``: where examples come from and the sequence layout (stage ``prepare_data``)."""

    source: str = "builtin"
    """``builtin`` (the task suite); a local data file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``);
    a local folder of data files (split by their names, as ``datasets.load_dataset`` does) or saved with
    ``save_to_disk``; or a Hugging Face dataset id (``openai/gsm8k``)."""
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
    """External data: field holding the prompt (unless ``prompt_template`` is set)."""
    response_field: str = "response"
    """External data: field holding the answer (GSM8K: ``answer``)."""
    prompt_template: str | None = None
    """External data: the prompt as a template over the row's fields, ``"Question: {question}"``
    (``{{`` for a literal brace); null: the ``prompt_field`` as it is."""
    system_prompt: str | None = None
    """A system message put before every prompt by the chat template (refused without one)."""
    hf_config: str | None = None
    """The dataset's config name (``main`` for ``openai/gsm8k``)."""
    hf_revision: str | None = None
    """The dataset's revision (a branch, tag or commit) on the hub; null: the default branch."""
    train_split: str = "train"
    """The dataset's split to train on, when it has several."""
    test_split: str = "test"
    """The dataset's split to report on, when it has several (GSM8K: the official 1,319 problems)."""
    val_split: str | None = None
    """The dataset's validation split; null: ``val_fraction`` of the training prompts are held out."""
    val_fraction: float = 0.02
    """External data: fraction of distinct prompts held out for validation (from the training split
    when the dataset has a test split, else from its only split)."""
    test_fraction: float = 0.02
    """External data of one split: fraction of distinct prompts held out for testing."""
    too_long: Literal["error", "drop"] = "error"
    """A prompt longer than ``prompt_length`` or an answer longer than ``gen_length`` tokens: stop the
    stage naming it, or drop the row (the counts dropped per split are in ``metrics/data.json``)."""
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
        require(self.train_split != self.test_split, "test_split", f"is the training split {self.train_split!r}")
        require(self.val_split not in (self.train_split, self.test_split), "val_split",
                f"{self.val_split!r} is the training or the test split")
