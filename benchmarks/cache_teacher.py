"""Stage one's cost: the whole cache-filling work against a bare teacher forward over the same
batches, for the top-k rows and for the rollouts, and the cache's bytes per masked position for
several k.

    python benchmarks/cache_teacher.py                  # needs data/ and artifacts/teacher/ (dvc repro teacher)
    python benchmarks/cache_teacher.py --examples 2000 --rollout-examples 500  # quicker

Ratio goal: <= 1.10 (what the stage adds on top of the forward passes it cannot avoid). For the
rollouts the bare forwards are the sampler's own inputs, the state after k steps of every rollout
(k = 0 .. steps - 1, rebuilt from the written shard's reveal steps), in the sampler's batches. Bytes are
reported for the built-in teacher (vocabulary 43, so k <= 43) and for a random LLaDA with LLaDA-8B's
vocabulary (126464) and tiny layers, whose flat distributions compress worst.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.cache import fill_rollouts as rollout_fill
from pipeline.cache.fill import (cache_header, draw_noisy_inputs, examples_per_shard, fill_cache, load_train_split,
                                 num_shards_for, shard_generator)
from pipeline.cache.params import CacheParams
from pipeline.cache.rollouts import RolloutRows, rollout_arrays, state_after
from pipeline.cache.shards import ROLLOUTS, shard_name
from pipeline.cache.topk import cache_statistics
from pipeline.core.cpu_numerics import pin_cpu_numerics
from pipeline.core.params import from_mapping
from pipeline.data.layout import Layout
from pipeline.models.llada import LLaDA, LLaDAConfig
from pipeline.teacher.artifact import load_teacher


def time_fill(model, train, layout, params, header) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        fill_cache(model, train, layout, params, Path(tmp) / "cache", header)
        return time.perf_counter() - started


@torch.inference_mode()
def time_bare_forward(model, train, layout, params) -> float:
    """The same (x_t, attention_mask) batches through the teacher, nothing else."""
    per_shard = examples_per_shard(params)
    batches = []
    for shard in range(num_shards_for(len(train), params)):
        rows = train[shard * per_shard : (shard + 1) * per_shard]
        x0 = torch.as_tensor(rows["input_ids"]).long().repeat_interleave(params.samples_per_example, dim=0)
        mask = torch.as_tensor(rows["attention_mask"]).long().repeat_interleave(params.samples_per_example, dim=0)
        _, x_t, _ = draw_noisy_inputs(x0, layout, params, model.config.mask_token_id, shard_generator(params.seed, shard))
        batches += [(x_t[i : i + params.batch_size], mask[i : i + params.batch_size])
                    for i in range(0, len(x_t), params.batch_size)]
    started = time.perf_counter()
    for x_t, mask in batches:
        model(x_t, attention_mask=mask)
    return time.perf_counter() - started


def time_rollouts(model, train, layout, params) -> tuple[float, float, int]:
    """Seconds to fill and write rollout shard 0 (all of ``params.rollouts.max_examples``), seconds of
    the bare forwards over the same sampler inputs, and the number of rollouts."""
    sampler = rollout_fill.sampler_settings(params, layout, model.config.mask_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        rollout_fill.fill_rollout_block(model, train, range(1), {0}, layout, params, sampler, Path(tmp))
        fill_seconds = time.perf_counter() - started
        with pa.memory_map(str(Path(tmp) / shard_name(0, ROLLOUTS))) as source:
            reader = pa.ipc.open_file(source)  # concat copies out of the memory map
            rows = RolloutRows.concat([rollout_arrays(reader.get_batch(i)) for i in range(reader.num_record_batches)])
    attention = np.concatenate((rows.prompt_mask, np.ones((len(rows), layout.gen_length), np.int8)), axis=1)
    batches = []
    for temperature in sorted(set(rows.temperature.tolist())):  # the sampler's batches
        group = np.flatnonzero(rows.temperature == temperature)
        for start in range(0, len(group), params.batch_size):
            part = group[start : start + params.batch_size]
            for k in range(sampler["steps"]):
                state = state_after(rows.prompt_ids[part], rows.tokens[part], rows.reveal_step[part], k,
                                    model.config.mask_token_id)
                batches.append((torch.from_numpy(state).long(), torch.from_numpy(attention[part]).long()))
    started = time.perf_counter()
    with torch.inference_mode():
        for x, mask in batches:
            model(x, attention_mask=mask)
    return fill_seconds, time.perf_counter() - started, len(rows)


def bytes_per_position(model, train, layout, params, header, k: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        params = CacheParams(**{**vars(params), "top_k": k, "batch_size": batch_size})
        header = {**header, "params_hash": f"k{k}", "vocab_size": model.config.embedding_size}
        fill_cache(model, train, layout, params, Path(tmp) / "cache", header)
        return cache_statistics(Path(tmp) / "cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--rollout-examples", type=int, default=1000, help="prompts with rollouts (4 each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("metrics/benchmarks/cache_teacher.json"))
    args = parser.parse_args()
    pin_cpu_numerics()
    torch.manual_seed(0)
    model, _, record = load_teacher("artifacts/teacher")
    layout = Layout.load(Path("data"))
    params = from_mapping(CacheParams, {"max_examples": args.examples, "top_k": 16, "rows_per_shard": 4096,
                                        "rollouts": {"per_example": 0}}, "cache")
    train = load_train_split(Path("data"), params.max_examples)
    header = cache_header(record, layout, params, Path("data"), model)

    stage, bare = [], []
    for _ in range(args.repeats):  # interleaved, best of n: the least disturbed run of each
        stage.append(time_fill(model, train, layout, params, header))
        bare.append(time_bare_forward(model, train, layout, params))
    rows = len(train) * params.samples_per_example
    timing = {"rows": rows, "stage_seconds": round(min(stage), 3), "bare_forward_seconds": round(min(bare), 3),
              "ratio": round(min(stage) / min(bare), 3), "stage_rows_per_second": round(rows / min(stage), 1)}

    rollout_params = from_mapping(CacheParams, {"rollouts": {"max_examples": args.rollout_examples,
                                                             "rollouts_per_shard": 1 << 30}}, "cache")
    rollout_train = load_train_split(Path("data"), args.rollout_examples)
    fills, bares = [], []
    for _ in range(args.repeats):
        fill_seconds, bare_seconds, count = time_rollouts(model, rollout_train, layout, rollout_params)
        fills.append(fill_seconds)
        bares.append(bare_seconds)
    rollout_timing = {"rollouts": count, "stage_seconds": round(min(fills), 3), "bare_forward_seconds": round(min(bares), 3),
                      "ratio": round(min(fills) / min(bares), 3), "rollouts_per_second": round(count / min(fills), 1)}

    storage = {"builtin_teacher": {}, "random_llada_vocab": {}}
    small = load_train_split(Path("data"), 1000)
    for k in (8, 32, 43):
        storage["builtin_teacher"][k] = bytes_per_position(model, small, layout, params, header, k, 256)
    # Large random weights: peaked, position-dependent distributions over 126464 ids, so the top-k
    # ids and log-probs are close to incompressible (a pessimistic stand-in for LLaDA-8B).
    wide = LLaDA(LLaDAConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=128,
                             max_sequence_length=layout.length)).init_weights(std=1.0)
    wide_train = load_train_split(Path("data"), 250)
    for k in (8, 32, 64):
        storage["random_llada_vocab"][k] = bytes_per_position(wide, wide_train, layout, params, header, k, 16)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"timing": timing, "rollout_timing": rollout_timing, "storage": storage},
                                   indent=2) + "\n")
    print(f"top-k rows: stage {timing['stage_seconds']} s vs bare forward {timing['bare_forward_seconds']} s over "
          f"{rows} rows: ratio {timing['ratio']}")
    print(f"rollouts: stage {rollout_timing['stage_seconds']} s vs the sampler's bare forwards "
          f"{rollout_timing['bare_forward_seconds']} s over {count} rollouts: ratio {rollout_timing['ratio']}, "
          f"{rollout_timing['rollouts_per_second']} rollouts/s")
    print("| teacher | k | bytes/masked position raw | on disk | dense bf16 row |")
    print("|---|---|---|---|---|")
    for name, by_k in storage.items():
        for k, s in by_k.items():
            print(f"| {name} | {k} | {s['bytes_per_masked_position_raw']} | {s['bytes_per_masked_position_disk']} | "
                  f"{s['dense_bf16_bytes_per_position']} |")


if __name__ == "__main__":
    main()
