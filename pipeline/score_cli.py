"""``python -m pipeline.score_cli COMPLETIONS.jsonl``: per-task accuracy of ``python -m pipeline.generate_cli``
output on the built-in tasks (and distinct valid completions for the many-answer ones), as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from pipeline.data.jsonl import read_jsonl
from pipeline.data.tasks import score


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.score_cli", description="Score built-in task completions.")
    parser.add_argument("completions", type=Path, help="a pipeline.generate_cli output file")
    args = parser.parse_args(argv)
    try:
        records = read_jsonl(args.completions, ("prompt",), what="completions file", lists=("completions",))
    except (OSError, ValueError) as err:  # read_jsonl's messages name the file and line
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(score(records), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
