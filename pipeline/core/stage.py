"""What every stage script shares: reproducible CPU arithmetic (``pipeline.core.cpu_numerics``), the
paths of the artifacts that pass between stages, as command-line options, and expected errors as
one line.

``dvc.yaml`` passes every path on each stage's command line; the defaults here are those same paths,
so ``python stages/x.py`` and ``dvc repro x`` do the same thing (a test checks it), with one
exception: ``dvc.yaml`` passes ``cache_teacher --replace-other``, because the cache directory is
DVC's output (it persists between runs, and a cache of other params there is DVC's to replace). Expected errors
(``pipeline.core.errors``), and a full disk or a read-only output, become one ``error:`` line on stderr
and exit code 2; SIGTERM and Ctrl-C
end the stage with one line and 128 + the signal's number (never 0: Lightning answers SIGTERM with
a SystemExit that carries no code), and the artifact writers' atomic renames mean nothing is left
half written.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from pipeline.core.cpu_numerics import pin_cpu_numerics
from pipeline.core.errors import PipelineError
from pipeline.core.files import storage_errno

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


class Terminated(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    swallows it; Lightning tears the trainer down and re-raises it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


def run_stage(main: Callable[[], None]) -> None:
    pin_cpu_numerics()
    for signum in (signal.SIGTERM, signal.SIGINT):  # Lightning's own SIGTERM handler calls this one too
        signal.signal(signum, raise_terminated)
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # a full disk or a denied path that no writer named (e.g. a logger's file)
        code = storage_errno(err)
        if code is None:
            raise
        print(f"error: {getattr(err, 'filename', None) or err}: {os.strerror(code)}; no artifact was published",
              file=sys.stderr)
        sys.exit(2)
    except Terminated as stop:
        print(f"error: stopped by {stop} before the stage finished; no artifact was published", file=sys.stderr)
        sys.exit(128 + stop.signum)
