"""What every stage entry point shares: expected errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from pipeline.errors import PipelineError


def run_stage(main: Callable[[], None]) -> None:
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
