"""Stage processes pin CPU arithmetic (``pipeline.cpu_numerics``): the kernels chosen are AVX2 even on
an AVX-512 machine, and a training step's result does not depend on the thread count."""

import os
import subprocess
import sys

import pytest
import torch

# Runs in a fresh process, as a stage does: heavy imports first, then run_stage, then the work.
TRAIN = """
import hashlib, sys
import torch
import lightning  # noqa: F401  (as the stages import it before run_stage)
from pipeline.llada import LLaDA, LLaDAConfig
from pipeline.stage import run_stage

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


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="pinning targets x86 CPUs with AVX2")
def test_stage_processes_compute_the_same_bits_with_any_thread_count():
    one, two = run_training(1), run_training(2)
    assert one[0] == two[0] == "AVX2"  # AVX-512 kernels are not used even where the CPU has them
    assert one[1] == two[1]
