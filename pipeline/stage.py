"""What every stage entry point shares: reproducible CPU arithmetic (``pipeline.cpu_numerics``), and
expected errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from pipeline.checkpoint_io import CheckpointError
from pipeline.config import ParamsError
from pipeline.cpu_numerics import pin_cpu_numerics
from pipeline.data import DataError
from pipeline.teacher_cache import CacheError

EXPECTED_ERRORS = (CheckpointError, ParamsError, DataError, CacheError)


def run_stage(main: Callable[[], None]) -> None:
    pin_cpu_numerics()
    try:
        main()
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
