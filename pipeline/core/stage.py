"""What every stage script shares: reproducible CPU arithmetic (``pipeline.core.cpu_numerics``), the
paths of the artifacts that pass between stages, as command-line options, and expected errors as
one line.

``dvc.yaml`` passes every path on each stage's command line; the defaults here are those same paths,
so ``python stages/x.py`` and ``dvc repro x`` do the same thing (a test checks it). Expected errors
(``pipeline.core.errors``) become one ``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from pipeline.core.cpu_numerics import pin_cpu_numerics
from pipeline.core.errors import PipelineError

ARTIFACTS = {
    "data": ("data", "tokenized splits, prompts, tokenizer and layout (prepare_data)"),
    "teacher": ("artifacts/teacher", "the teacher artifact (teacher)"),
    "cache": ("artifacts/cache", "the teacher cache (cache_teacher)"),
    "student": ("artifacts/student", "the student (train_student)"),
}
"""Each artifact's default path and what it holds (the stage that writes it)."""


def stage_parser(doc: str, reads: Sequence[str] = (), writes: str | None = None) -> argparse.ArgumentParser:
    """A stage's command line: ``--NAME PATH`` for each artifact it ``reads`` and ``--out PATH`` for the
    one it ``writes`` (names of ``ARTIFACTS``). The script adds its other options."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    for name in reads:
        path, what = ARTIFACTS[name]
        parser.add_argument(f"--{name}", type=Path, default=Path(path), help=f"{what} (default: %(default)s)")
    if writes is not None:
        path, what = ARTIFACTS[writes]
        parser.add_argument("--out", type=Path, default=Path(path), help=f"where to write {what} (default: %(default)s)")
    return parser


def run_stage(main: Callable[[], None]) -> None:
    pin_cpu_numerics()
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
