"""The built-in task suite: four character-level tasks, seeded splits and a scorer.

| task   | prompt                 | valid completions                        |
|--------|------------------------|------------------------------------------|
| add    | ``add:{a:03d}+{b:03d}=`` | ``{a+b:04d}``, a, b in 0..999          |
| sort   | ``sort:{s}``, 6 letters| the letters of s in ascending order      |
| perm   | ``perm:{s}``, 5 distinct letters | any permutation of s           |
| word   | ``word:{d}``, a digit  | any word of ``lexicon[d]``               |

``add`` and ``sort`` have one answer; ``perm`` and ``word`` have many, which is what breaks decoding
all positions independently in one step. ``word`` has only ten prompts: its test prompts are the
same ten digits (the task measures validity and diversity, not generalization); for the other
tasks no held-out prompt appears in training data.

``python -m pipeline.score_cli COMPLETIONS.jsonl`` scores ``python -m pipeline.generate_cli`` output.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import random
import string
from collections import defaultdict
from functools import lru_cache
from importlib import resources
from typing import Iterable

LETTERS = string.ascii_lowercase
ALPHABET = LETTERS + string.digits + "+=:"


@lru_cache(maxsize=1)
def lexicon() -> dict[str, tuple[str, ...]]:
    data = json.loads(resources.files("pipeline.data").joinpath("resources/lexicon.json").read_text())
    return {digit: tuple(words) for digit, words in data.items()}


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


class Task(abc.ABC):
    """A task: how to draw a prompt, draw one valid answer, and check a completion."""

    name: str
    closed_prompts: tuple[str, ...] | None = None  # the whole prompt set, when it is small

    @abc.abstractmethod
    def sample_prompt(self, rng: random.Random) -> str:
        ...

    @abc.abstractmethod
    def sample_answer(self, prompt: str, rng: random.Random) -> str:
        ...

    @abc.abstractmethod
    def is_valid(self, prompt: str, completion: str) -> bool:
        ...

    @staticmethod
    def argument(prompt: str) -> str:
        return prompt.split(":", 1)[1]


class Add(Task):
    name = "add"

    def sample_prompt(self, rng):
        return f"add:{rng.randrange(1000):03d}+{rng.randrange(1000):03d}="

    def sample_answer(self, prompt, rng):
        a, b = self.argument(prompt).rstrip("=").split("+")
        return f"{int(a) + int(b):04d}"

    def is_valid(self, prompt, completion):
        return completion == self.sample_answer(prompt, None)


class Sort(Task):
    name = "sort"

    def sample_prompt(self, rng):
        return "sort:" + "".join(rng.choice(LETTERS) for _ in range(6))

    def sample_answer(self, prompt, rng):
        return "".join(sorted(self.argument(prompt)))

    def is_valid(self, prompt, completion):
        return completion == self.sample_answer(prompt, None)


class Perm(Task):
    name = "perm"

    def sample_prompt(self, rng):
        return "perm:" + "".join(rng.sample(LETTERS, 5))

    def sample_answer(self, prompt, rng):
        letters = list(self.argument(prompt))
        rng.shuffle(letters)
        return "".join(letters)

    def is_valid(self, prompt, completion):
        return sorted(completion) == sorted(self.argument(prompt))


class Word(Task):
    name = "word"
    closed_prompts = tuple(f"word:{d}" for d in string.digits)

    def sample_prompt(self, rng):
        return f"word:{rng.choice(string.digits)}"

    def sample_answer(self, prompt, rng):
        return rng.choice(lexicon()[self.argument(prompt)])

    def is_valid(self, prompt, completion):
        return completion in lexicon()[self.argument(prompt)]


TASKS: dict[str, Task] = {task.name: task for task in (Add(), Sort(), Perm(), Word())}


def task_of(prompt: str) -> Task:
    name = prompt.split(":", 1)[0]
    if name not in TASKS or ":" not in prompt:
        raise ValueError(f"not a prompt of the built-in tasks: {prompt!r}")
    return TASKS[name]


def make_splits(
    tasks: Iterable[str], seed: int, train_per_task: int, val_per_task: int, test_per_task: int
) -> dict[str, list[Example]]:
    """Seeded ``train``/``val``/``test`` examples. Held-out prompts (test first, then val) are drawn
    without repeats and never appear in ``train``, except for a task whose whole prompt set is small
    (``word``), whose held-out prompts cycle through that set. ``train`` interleaves the tasks (one
    example of each in turn), so any prefix of it (``cache.max_examples``) is balanced."""
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    train_by_task: list[list[Example]] = []
    for name in tasks:
        task = TASKS[name]
        rng = random.Random(f"{seed}:{name}")
        held_out: set[str] = set()
        for split, count in (("test", test_per_task), ("val", val_per_task)):
            for i in range(count):
                if task.closed_prompts:
                    prompt = task.closed_prompts[i % len(task.closed_prompts)]
                else:
                    prompt = task.sample_prompt(rng)
                    while prompt in held_out:
                        prompt = task.sample_prompt(rng)
                    held_out.add(prompt)
                splits[split].append(Example(name, prompt, task.sample_answer(prompt, rng)))
        train_by_task.append([])
        for _ in range(train_per_task):
            prompt = task.sample_prompt(rng)
            while prompt in held_out:
                prompt = task.sample_prompt(rng)
            train_by_task[-1].append(Example(name, prompt, task.sample_answer(prompt, rng)))
    splits["train"] = [example for group in zip(*train_by_task) for example in group]
    return splits


def score(records: Iterable[dict]) -> dict[str, dict[str, float]]:
    """Per-task metrics of ``{"prompt", "completions": [...]}`` records: ``accuracy`` (valid
    completions / all), and for many-answer tasks ``distinct_valid`` (distinct valid completions per
    prompt, averaged)."""
    valid, total, distinct, prompts = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(int)
    for record in records:
        task = task_of(record["prompt"])
        ok = [c for c in record["completions"] if task.is_valid(record["prompt"], c)]
        valid[task.name] += len(ok)
        total[task.name] += len(record["completions"])
        distinct[task.name] += len(set(ok))
        prompts[task.name] += 1
    metrics = {}
    for name in total:
        metrics[name] = {"accuracy": valid[name] / total[name], "prompts": prompts[name]}
        if name in ("perm", "word"):
            metrics[name]["distinct_valid"] = distinct[name] / prompts[name]
    if metrics:
        metrics["mean"] = {"accuracy": sum(m["accuracy"] for m in metrics.values()) / len(metrics)}
    return metrics
