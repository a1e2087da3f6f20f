"""``python -m pipeline.score_cli COMPLETIONS.jsonl``: accuracy of ``python -m pipeline.generate_cli``
output, as JSON. The default scorer, ``builtin``, judges prompts of the built-in tasks by their task
(with distinct valid completions for the many-answer ones) and needs no reference; any other scorer
of ``pipeline.data.scoring`` (``exact``, ``gsm8k``, ``gsm8k_flexible``, ``math_boxed``,
``regex:<pattern>``) compares each completion with the line's reference (``--reference-field``, which
generate_cli carries over from its input)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from pipeline.data.jsonl import read_jsonl
from pipeline.data.scoring import parse_scorer
from pipeline.data.tasks import TASKS, task_of


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.score_cli", description="Score generate_cli output.")
    parser.add_argument("completions", type=Path, help="a pipeline.generate_cli output file")
    parser.add_argument("--scorer", default="builtin", help="builtin, exact, gsm8k, gsm8k_flexible, math_boxed or "
                        "regex:<pattern> (default: builtin)")
    parser.add_argument("--reference-field", default="answer", help="the field holding the reference answer "
                        "(every scorer but builtin; default: answer)")
    args = parser.parse_args(argv)
    try:
        scorer = parse_scorer(args.scorer)
        needed = ("prompt",) if scorer.name == "builtin" else ("prompt", args.reference_field)
        records = read_jsonl(args.completions, needed, what="completions file", lists=("completions",))
    except ValueError as err:  # read_jsonl's messages name the file and line; parse_scorer's the scorer
        print(f"error: {'--scorer ' if 'scorer' in str(err) else ''}{err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for number, record in enumerate(records, start=1):
        if scorer.name == "builtin" and record["prompt"].split(":", 1)[0] in TASKS:
            record["task"] = task_of(record["prompt"]).name
        elif args.reference_field not in record:
            print(f"error: {args.completions}: record {number} is not a built-in task prompt and has no "
                  f"{args.reference_field!r} field to compare with (--reference-field)", file=sys.stderr)
            return 2
        record["answer"] = str(record.get(args.reference_field, ""))
    print(json.dumps(scorer.score_records(records), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
