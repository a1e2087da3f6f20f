"""Scoring completions: rows of the built-in task suite (records with a ``task``) are judged by their
task (``pipeline.data.tasks``), rows of external data count as correct when the completion equals the
reference answer (``exact_match``). Used by the evaluation, validation during training, and stage
one's report on the teacher's own rollouts.
"""

from __future__ import annotations

from pipeline.data.tasks import TASKS, score
from pipeline.data.tokenizer import decode_answer


def score_records(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per-task metrics (see ``pipeline.data.tasks.score``) of records whose ``task`` is a built-in task;
    the others are scored by exact match against ``answer`` under the name ``exact_match``."""
    builtin = [r for r in records if r.get("task") in TASKS]
    other = [r for r in records if r.get("task") not in TASKS]
    metrics = {name: m for name, m in score(builtin).items() if name != "mean"} if builtin else {}
    if other:
        hits = sum(c.strip() == r["answer"].strip() for r in other for c in r["completions"])
        metrics["exact_match"] = {"accuracy": hits / sum(len(r["completions"]) for r in other), "prompts": len(other)}
    metrics["mean"] = {"accuracy": sum(m["accuracy"] for m in metrics.values()) / len(metrics)}
    return metrics


def score_rollouts(rollouts, rows, tokenizer, stops: set[int]) -> dict[str, dict]:
    """The teacher's accuracy on its own cached rollouts (``pipeline.cache.rollouts.RolloutCache``)
    of training ``rows`` (the split they were sampled from), greedy and sampled rollouts apart: per
    task accuracy, and distinct valid completions per prompt for many-answer tasks."""
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
            scores[kind] = score_records(records)
    return scores
