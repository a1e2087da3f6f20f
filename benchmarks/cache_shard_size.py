"""Stage one with one-example shards against the default shard sizes: the whole fill (top-k rows and
rollouts) on the same examples, interleaved, best of n, in one process.

    python benchmarks/cache_shard_size.py          # needs data/ and artifacts/teacher/ (dvc repro teacher)

Small shards make resuming fine-grained (a preempted GPU loses at most one shard); consecutive small
shards share the teacher's forward batches (``shards_per_block``), so the ratio goal is <= 1.25
(what remains is per-file work: a sidecar, an fsync and a checksum per shard).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pipeline.cache.fill import cache_header, fill_cache, load_train_split
from pipeline.cache.params import CacheParams
from pipeline.core.cpu_numerics import pin_cpu_numerics
from pipeline.core.params import from_mapping
from pipeline.data.layout import Layout
from pipeline.teacher.artifact import load_teacher


def time_fill(model, record, train, layout, params: CacheParams) -> tuple[float, int]:
    """Seconds to fill a fresh cache, and the files it holds."""
    header = cache_header(record, layout, params, Path("data"), model)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        fill_cache(model, train, layout, params, Path(tmp) / "cache", header)
        seconds = time.perf_counter() - started
        return seconds, len(list((Path(tmp) / "cache").iterdir()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=800, help="training examples (4 top-k rows each)")
    parser.add_argument("--rollout-examples", type=int, default=200, help="examples with rollouts (4 each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("metrics/benchmarks/cache_shard_size.json"))
    args = parser.parse_args()
    pin_cpu_numerics()
    model, _, record = load_teacher("artifacts/teacher")
    layout = Layout.load(Path("data"))
    base = {"max_examples": args.examples, "rollouts": {"max_examples": args.rollout_examples}}
    defaults = from_mapping(CacheParams, base, "cache")
    one_example = from_mapping(CacheParams, {**base, "rows_per_shard": defaults.samples_per_example,
                                             "rollouts": {**base["rollouts"],
                                                          "rollouts_per_shard": defaults.rollouts.per_example}}, "cache")
    train = load_train_split(Path("data"), args.examples)
    runs = {"default": [], "one_example": []}
    files = {}
    for _ in range(args.repeats):
        for name, params in (("default", defaults), ("one_example", one_example)):
            seconds, files[name] = time_fill(model, record, train, layout, params)
            runs[name].append(seconds)
    best = {name: min(times) for name, times in runs.items()}
    result = {"examples": args.examples, "rollout_examples": args.rollout_examples, "threads": torch.get_num_threads(),
              "seconds": {name: round(s, 2) for name, s in best.items()}, "files": files,
              "ratio": round(best["one_example"] / best["default"], 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))

if __name__ == "__main__":
    main()
