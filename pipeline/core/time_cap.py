"""Wall-clock caps that never silently change an artifact: a run the clock stopped before its step
count is an error, not a smaller model (how far a run gets in N minutes depends on the machine and
its load, so a cut run would make the artifact a function of both)."""

from __future__ import annotations

import datetime

from pipeline.core.errors import TrainingError


def time_limit(minutes: float | None) -> datetime.timedelta | None:
    """Lightning's ``max_time`` for a cap in minutes (None: no cap)."""
    return None if minutes is None else datetime.timedelta(minutes=minutes)


def check_not_cut(steps: int, max_steps: int, minutes: float | None, key: str, after: str = "") -> None:
    """Raise when a cap of ``minutes`` (params key ``key``) stopped a run at ``steps`` < ``max_steps``."""
    if minutes is not None and steps < max_steps:
        raise TrainingError(f"{key}: the {minutes:g}-minute cap stopped the run at step {steps} of {max_steps}, so "
                            f"nothing was published (raise the cap or set it to null){after}")
