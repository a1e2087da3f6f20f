"""What the step-timing benchmarks share: each variant is timed in its own child process (so its peak
memory is its own), relaunching the calling script with ``--child VARIANT``."""

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable


def time_variants(script: str, description: str, variants, measure: Callable[[str, int, int], dict],
                  default_out: Path, default_steps: int) -> tuple[argparse.Namespace, dict | None]:
    """Parse ``--steps``, ``--batch-size``, ``--out``; in a child, print ``measure(variant, steps,
    batch_size)`` as JSON and return None results; in the parent, run every variant's child and return
    their results by variant."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", choices=list(variants), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.batch_size)))
        return args, None
    results = {}
    for variant in variants:
        child = subprocess.run([sys.executable, script, "--child", variant, "--steps", str(args.steps),
                                "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    return args, results
