"""Stage processes pin CPU arithmetic (``pipeline.core.cpu_numerics``): the kernels chosen are AVX2 even on
an AVX-512 machine, and a training step's result does not depend on the thread count."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs in a fresh process, as a stage does: heavy imports first, then run_stage, then the work.
TRAIN = """
import hashlib, sys
import torch
import lightning  # noqa: F401  (as the stages import it before run_stage)
from pipeline.models.llada import LLaDA, LLaDAConfig
from pipeline.core.stage import run_stage

def main():
    torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    config = LLaDAConfig(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=384, vocab_size=43,
                         mask_token_id=42, eos_token_id=0, pad_token_id=0, max_sequence_length=21)
    model = LLaDA(config).init_weights(std=0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(5):
        ids = torch.randint(0, 42, (64, 21))
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).flatten(0, 1), ids.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(weights).hexdigest())

run_stage(main)
"""


def run_training(threads: int) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    result = subprocess.run([sys.executable, "-c", TRAIN, str(threads)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    capability, digest = result.stdout.split()
    return capability, digest


from pipeline.core.cpu_numerics import cpu_has_avx2

ROOT = Path(__file__).resolve().parents[1]
# A stage script's imports, then run_stage: the pin works only if nothing computed at import time.
IMPORT_THEN_PIN = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("stage_script", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
from pipeline.core.stage import run_stage
run_stage(lambda: print(torch.backends.cpu.get_cpu_capability()))
"""
needs_avx2 = pytest.mark.skipif(not cpu_has_avx2(), reason="pinning targets x86-64 CPUs with AVX2")


@needs_avx2
@pytest.mark.parametrize("stage", sorted(p.name for p in (ROOT / "stages").glob("*.py")))
def test_no_stage_computes_before_the_pin(stage):
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    result = subprocess.run([sys.executable, "-c", IMPORT_THEN_PIN, str(ROOT / "stages" / stage)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "AVX2"


@needs_avx2
def test_stage_processes_compute_the_same_bits_with_any_thread_count():
    one, two = run_training(1), run_training(2)
    assert one[0] == two[0] == "AVX2"  # AVX-512 kernels are not used even where the CPU has them
    assert one[1] == two[1]
