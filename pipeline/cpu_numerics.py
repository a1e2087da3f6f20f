"""Bit-reproducible CPU arithmetic, whatever the x86 machine and thread count.

Three things change the rounding of float32 CPU arithmetic in PyTorch, and a few hundred training
steps amplify a last-bit difference into a different model:

- ATen picks its vectorized kernels by the CPU it finds (AVX-512 on one machine, AVX2 on another);
- MKL picks its GEMM code path by the CPU too;
- MKL splits a GEMM's reductions by thread count.

``pin_cpu_numerics`` fixes all three through the documented switches: ``ATEN_CPU_CAPABILITY=avx2``
(ATen's kernel choice) and MKL's Conditional Numerical Reproducibility ``MKL_CBWR=AVX2,STRICT``
(the AVX2 code path on any AVX2 processor, and results independent of the thread count). Measured on
this project's teacher (``tests/test_cpu_numerics.py``): without them 1 and 2 threads, or AVX2 and
AVX-512 kernels, give different weights after 20 steps; with them the weights are bit-identical.
The cost is AVX-512 left unused on CPUs that have it. GPU arithmetic is untouched.

Both switches are read when torch first computes, so call this before any tensor work (the stage
entry points do, in ``pipeline.stage.run_stage``). A variable the user has set is left as it is.
This module imports nothing heavy.
"""

from __future__ import annotations

import os

PINNED_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}


def pin_cpu_numerics() -> dict[str, str]:
    """Set the reproducibility switches (unless already set); returns the values in effect."""
    for key, value in PINNED_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in PINNED_ENVIRONMENT}
