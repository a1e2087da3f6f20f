"""Accuracy of a teacher checkpoint on the held-out test prompts, through ``python -m pipeline.generate_cli``.

Greedy accuracy per task at 1, 2, 4, ... and gen_length steps, and distinct valid completions for
``perm``/``word`` at temperature 1 with 8 samples. Prints a markdown table and writes JSON.

    python benchmarks/teacher_accuracy.py --model artifacts/teacher --prompts data/prompts/test.jsonl
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.data.tasks import score
from pipeline.models.checkpoint_io import generation_hints

ROOT = Path(__file__).resolve().parents[1]


def run_generate(model: Path, prompts: Path, out: Path, *options: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.generate_cli", "--model", str(model), "--prompts", str(prompts),
                    "--out", str(out), *options], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/teacher"))
    parser.add_argument("--prompts", type=Path, default=Path("data/prompts/test.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("metrics/benchmarks/teacher_accuracy.json"))
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    gen_length = generation_hints(args.model).get("gen_length", 128)
    steps = sorted({min(2**i, gen_length) for i in range(gen_length.bit_length() + 1)})
    results = {"greedy": {}, "sampled": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in steps:
            out = Path(tmp) / f"greedy-{n}.jsonl"
            seconds = run_generate(args.model.resolve(), args.prompts.resolve(), out, "--steps", str(n))
            records = [json.loads(line) for line in out.read_text().splitlines()]
            results["greedy"][n] = {**score(records), "seconds": round(seconds, 2)}
        out = Path(tmp) / "sampled.jsonl"
        run_generate(args.model.resolve(), args.prompts.resolve(), out, "--temperature", "1.0",
                     "--samples", str(args.samples), "--seed", "0")
        results["sampled"] = score(json.loads(line) for line in out.read_text().splitlines())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    tasks = [t for t in results["greedy"][steps[0]] if t != "seconds"]
    print("| steps | " + " | ".join(tasks) + " |")
    print("|---" * (len(tasks) + 1) + "|")
    for n in steps:
        print(f"| {n} | " + " | ".join(f"{results['greedy'][n][t]['accuracy']:.3f}" for t in tasks) + " |")
    sampled = results["sampled"]
    print(f"\ntemperature 1, {args.samples} samples, {gen_length} steps: " + ", ".join(
        f"{t} accuracy {sampled[t]['accuracy']:.3f}"
        + (f", distinct valid {sampled[t]['distinct_valid']:.2f}" if "distinct_valid" in sampled[t] else "")
        for t in tasks if t in sampled))


if __name__ == "__main__":
    main()
