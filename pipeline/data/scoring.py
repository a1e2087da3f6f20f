"""Scoring completions: one registry of scorers, used wherever a completion is judged (the
evaluation, validation during training, stage one's report on the teacher's own rollouts, and
``python -m pipeline.score_cli``).

- ``builtin``: rows of the built-in task suite (records with a ``task``) are judged by their task
  (``pipeline.data.tasks``, with distinct valid completions for the many-answer tasks); other rows
  by ``exact``.
- ``exact``: the completion equals the reference, surrounding whitespace aside.
- ``gsm8k``: lm-evaluation-harness's ``gsm8k`` task, ``strict-match``: the number after the first
  ``#### `` of the completion (``#### (\\-?[0-9\\.\\,]+)``; none: wrong) against the reference's,
  both with ``,``, ``$``, everything up to ``#### `` and a final ``.`` removed, compared ignoring case.
- ``gsm8k_flexible``: the same task's ``flexible-extract``: the last number of the completion
  (``(-?[$0-9.,]{2,})|(-?[0-9]+)``), normalized as above (chat models rarely write ``####``).
- ``math_boxed``: the contents of the last ``\\boxed{...}`` (braces matched) of the completion against
  the reference's last ``\\boxed{...}`` (or the whole reference), whitespace removed.
- ``regex:<pattern>``: the first match of the pattern (its first group, when it has groups) in the
  completion against its first match in the reference (or the whole reference), stripped.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from pipeline.core.errors import ParamsError
from pipeline.core.params import PARAMS_FILE, load_key
from pipeline.data.tasks import TASKS, score

SCORERS = ("builtin", "exact", "gsm8k", "gsm8k_flexible", "math_boxed", "regex:<pattern>")
"""The scorer names ``parse_scorer`` accepts."""

GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")


def first_group(match) -> str:
    """A ``findall`` item as lm-eval's regex filter takes it: the first non-empty group."""
    return next((group for group in match if group), "") if isinstance(match, tuple) else match


def gsm8k_normalized(text: str) -> str:
    for pattern in GSM8K_IGNORED:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_extract(completion: str, pattern: re.Pattern, last: bool) -> str | None:
    matches = pattern.findall(completion)
    return first_group(matches[-1 if last else 0]).strip() if matches else None


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (nested braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i]
    return None


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A named judgment ``correct(completion, reference) -> bool`` of external rows; ``builtin``
    judges rows of the task suite by their task first."""

    name: str
    correct: Callable[[str, str], bool]

    def score_records(self, records: list[dict]) -> dict[str, dict[str, float]]:
        """Metrics of ``{"prompt", "answer", "completions"[, "task"]}`` records: per built-in task
        (``builtin`` only; accuracy, and ``distinct_valid`` for many-answer tasks) and under the
        scorer's name for the other rows (accuracy over all completions, and ``prompts``), with
        their ``mean``."""
        builtin = [r for r in records if r.get("task") in TASKS] if self.name == "builtin" else []
        other = [r for r in records if r.get("task") not in TASKS] if builtin else records
        metrics = {name: m for name, m in score(builtin).items() if name != "mean"} if builtin else {}
        if other:
            judged = [self.correct(c, r["answer"]) for r in other for c in r["completions"]]
            metrics[self.metric_name] = {"accuracy": sum(judged) / max(1, len(judged)), "prompts": len(other)}
        metrics["mean"] = {"accuracy": sum(m["accuracy"] for m in metrics.values()) / max(1, len(metrics))}
        return metrics

    @property
    def metric_name(self) -> str:
        """The metric of rows judged by ``correct`` (``exact_match`` for ``exact`` and ``builtin``)."""
        return "exact_match" if self.name in ("exact", "builtin") else self.name.split(":")[0]

    def judgments(self, record: dict) -> list[bool]:
        """Each completion of a record right or wrong (a task's validity for rows of the suite)."""
        task = TASKS.get(record.get("task")) if self.name == "builtin" else None
        if task is not None:
            return [task.is_valid(record["prompt"], c) for c in record["completions"]]
        return [self.correct(c, record["answer"]) for c in record["completions"]]


def exact(completion: str, reference: str) -> bool:
    return completion.strip() == reference.strip()


def gsm8k(completion: str, reference: str, flexible: bool = False) -> bool:
    found = gsm8k_extract(completion, GSM8K_FLEXIBLE if flexible else GSM8K_STRICT, last=flexible)
    return found is not None and gsm8k_normalized(found) == gsm8k_normalized(reference)


def math_boxed(completion: str, reference: str) -> bool:
    found = last_boxed(completion)
    expected = last_boxed(reference)
    expected = reference if expected is None else expected
    return found is not None and re.sub(r"\s+", "", found) == re.sub(r"\s+", "", expected)


def regex_scorer(pattern: re.Pattern) -> Callable[[str, str], bool]:
    def extract(text: str) -> str | None:
        match = pattern.search(text)
        if match is None:
            return None
        return (match.group(1) if pattern.groups else match.group(0)).strip()

    def correct(completion: str, reference: str) -> bool:
        found, expected = extract(completion), extract(reference)
        return found is not None and found == (reference.strip() if expected is None else expected)

    return correct


def parse_scorer(name: str) -> Scorer:
    """The scorer called ``name`` (one of ``SCORERS``); ``ValueError`` naming the known ones."""
    if name.startswith("regex:"):
        try:
            pattern = re.compile(name[len("regex:"):])
        except re.error as err:
            raise ValueError(f"{name!r}: not a regular expression ({err})") from err
        return Scorer(name, regex_scorer(pattern))
    judges = {"builtin": exact, "exact": exact, "gsm8k": gsm8k,
              "gsm8k_flexible": lambda c, r: gsm8k(c, r, flexible=True), "math_boxed": math_boxed}
    if name not in judges:
        raise ValueError(f"unknown scorer {name!r} (known: {', '.join(SCORERS)})")
    return Scorer(name, judges[name])


def configured_scorer(path=PARAMS_FILE) -> Scorer:
    """The scorer ``evaluate.scorer`` names (null: ``builtin``, which judges external rows by exact
    match), for the stages that judge completions besides the evaluation (validation during
    training, stage one's rollout report)."""
    name = load_key("evaluate", "scorer", path)
    try:
        return parse_scorer("builtin" if name is None else name)
    except (TypeError, AttributeError, ValueError) as err:
        raise ParamsError(f"{path}:evaluate.scorer: {err if isinstance(err, ValueError) else 'must be a string'}") from err


def score_records(records: list[dict], scorer: Scorer | None = None) -> dict[str, dict[str, float]]:
    """``scorer.score_records`` (default ``builtin``: the task suite by task, other rows by exact match)."""
    return (scorer or parse_scorer("builtin")).score_records(records)


def score_rollouts(rollouts, rows, tokenizer, stops: set[int], scorer: Scorer | None = None) -> dict[str, dict]:
    """The teacher's accuracy on its own cached rollouts (``pipeline.cache.rollouts.RolloutCache``)
    of training ``rows`` (the split they were sampled from), greedy and sampled rollouts apart: per
    task accuracy, and distinct valid completions per prompt for many-answer tasks."""
    from pipeline.data.tokenizer import decode_answer

    by_kind: dict[str, dict[int, list[str]]] = {"greedy": {}, "sampled": {}}
    for j in range(rollouts.num_batches):
        batch = rollouts.batch(j)
        for example, temperature, tokens in zip(batch.example_index, batch.temperature, batch.tokens):
            kind = "greedy" if temperature == 0 else "sampled"
            by_kind[kind].setdefault(int(example), []).append(decode_answer(tokenizer, tokens.tolist(), stops))
    scores = {}
    for kind, completions in by_kind.items():
        if completions:
            records = [{"prompt": rows[i]["prompt"], "answer": rows[i]["answer"], "completions": c,
                        **({"task": rows[i]["task"]} if "task" in rows.column_names else {})}
                       for i, c in sorted(completions.items())]
            scores[kind] = score_records(records, scorer)
    return scores
