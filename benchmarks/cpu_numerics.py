"""What pinned CPU numerics (``pipeline.core.cpu_numerics``) cost: seconds per teacher pretraining step
with and without the pin, each in a fresh process, at 1 and 2 threads; the weights' digest after
the steps shows which runs agree bit for bit.

    python benchmarks/cpu_numerics.py --steps 30
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# A training step of the default teacher's shape (d_model 128, 4 layers, batch 256, 21 tokens).
STEP = """
import hashlib, sys, time, torch
from pipeline.core.cpu_numerics import pin_cpu_numerics
from pipeline.models.llada import LLaDA, LLaDAConfig
if sys.argv[3] == "pinned":
    pin_cpu_numerics()
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
config = LLaDAConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384, vocab_size=43,
                     mask_token_id=42, eos_token_id=0, pad_token_id=0, max_sequence_length=21)
model = LLaDA(config).init_weights(std=0.02)
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
ids = torch.randint(0, 42, (int(sys.argv[2]) + 3, 256, 21))
for step, batch in enumerate(ids):
    if step == 3:
        started = time.perf_counter()  # after warm-up
    loss = torch.nn.functional.cross_entropy(model(input_ids=batch).flatten(0, 1), batch.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
seconds = (time.perf_counter() - started) / int(sys.argv[2])
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:12]
print(torch.backends.cpu.get_cpu_capability(), seconds, digest)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("metrics/benchmarks/cpu_numerics.json"))
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    rows = []
    for mode in ("default", "pinned"):
        for threads in (1, 2):
            out = subprocess.run([sys.executable, "-c", STEP, str(threads), str(args.steps), mode], env=env,
                                 check=True, capture_output=True, text=True).stdout.split()
            rows.append({"mode": mode, "threads": threads, "kernels": out[0], "seconds_per_step": float(out[1]),
                         "weights_sha256": out[2]})
    base = {r["threads"]: r["seconds_per_step"] for r in rows if r["mode"] == "default"}
    print("| numerics | threads | kernels | s / step | x default | weights digest |\n|---|---|---|---|---|---|")
    for r in rows:
        r["ratio"] = round(r["seconds_per_step"] / base[r["threads"]], 3)
        print(f"| {r['mode']} | {r['threads']} | {r['kernels']} | {r['seconds_per_step']:.3f} | {r['ratio']:.2f} "
              f"| {r['weights_sha256']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
