"""Bit-reproducible CPU arithmetic across thread counts and x86 machines with AVX2.

Three things change the rounding of float32 CPU arithmetic in PyTorch, and a few hundred training
steps amplify a last-bit difference into a different model:

- ATen picks its vectorized kernels by the CPU it finds (AVX-512 on one machine, AVX2 on another);
- MKL picks its GEMM code path by the CPU too;
- MKL splits a GEMM's reductions by thread count.

``pin_cpu_numerics`` fixes all three through the documented switches: ``ATEN_CPU_CAPABILITY=avx2``
(ATen's kernel choice) and MKL's Conditional Numerical Reproducibility ``MKL_CBWR=AVX2,STRICT``
(MKL's AVX2 code path, and results independent of the thread count; MKL guarantees identical
results across Intel processors that support that branch). ``benchmarks/cpu_numerics.py`` measures
it on the default teacher: unpinned, 1 and 2 threads give different weights after 30 steps; pinned,
the same bits (``tests/test_cpu_numerics.py`` checks the pinned case). The cost is AVX-512 left
unused on CPUs that have it (1.31x per teacher step here). GPU arithmetic is untouched.

The pin applies only on x86-64 CPUs that report AVX2 and FMA (ATen would run AVX2 kernels on a CPU
without them and crash; other architectures ignore the switch). Both switches are read when torch
first computes, so call this before any tensor work (the stage entry points do, in
``pipeline.core.stage.run_stage``). A variable the user has set is left as it is. This module imports
nothing heavy.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

PINNED_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}


def cpu_has_avx2() -> bool:
    """Whether this is an x86-64 CPU that reports AVX2 and FMA (Linux ``/proc/cpuinfo``)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"avx2", "fma"} <= set(flags)


def pin_cpu_numerics() -> dict[str, str]:
    """Set the reproducibility switches (unless already set) where the CPU supports them; returns
    the values in effect ({} where the pin does not apply)."""
    if not cpu_has_avx2():
        return {}
    for key, value in PINNED_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in PINNED_ENVIRONMENT}
