"""Stage ``cache_teacher`` (stage one): the teacher's top-k log-probs on sampled (x_t, t) pairs and
the teacher's own rollouts (its sampler on training prompts), in zstd Arrow shards under
``artifacts/cache/`` (params: ``cache``; formats: ``pipeline/cache/topk.py``,
``pipeline/cache/rollouts.py``).

    python stages/cache_teacher.py --data data --teacher artifacts/teacher --out artifacts/cache \\
        --metrics metrics/cache.json

Spare GPUs fill one cache together: each process takes a disjoint, deterministic set of shards,

    python stages/cache_teacher.py --shard-index i --num-shards n

(defaults from RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS when set). Rerunning skips complete
shards; a cache built with other params, data or teacher is refused. The last process to finish
completes the manifest and writes the metrics.
"""

import json
import os
from pathlib import Path

import torch

from pipeline.cache.fill import cache_header, fill_cache, load_train_split
from pipeline.cache.params import CacheParams
from pipeline.cache.rollouts import open_rollouts, rollout_statistics
from pipeline.cache.topk import cache_statistics
from pipeline.core.errors import CheckpointError
from pipeline.core.files import require_writable, write_json
from pipeline.core.params import load_section
from pipeline.core.stage import run_stage, stage_parser
from pipeline.data.layout import Layout
from pipeline.data.scoring import configured_scorer, score_rollouts
from pipeline.data.tokenizer import stop_token_ids
from pipeline.models.checkpoint_check import first_non_finite
from pipeline.teacher.artifact import check_data_tokenizer, checkpoint_dir, load_teacher


def default_rank() -> tuple[int, int]:
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def parse_args(argv=None):
    rank, world = default_rank()
    parser = stage_parser(__doc__, reads=["data", "teacher"], writes="cache")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/cache.json"), help="size accounting, seconds")
    parser.add_argument("--shard-index", type=int, default=rank, help="this process's index (default: rank)")
    parser.add_argument("--num-shards", type=int, default=world, help="processes sharing the work (default: world size)")
    local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))
    default_device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--replace-other", action="store_true",
                        help="a cache in --out built with other params, teacher or data (or damaged) is deleted and "
                             "this one built, instead of refused (dvc.yaml passes it: the directory is DVC's "
                             "output, which it keeps between runs so that a rerun resumes)")
    args = parser.parse_args(argv)
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index must be in [0, --num-shards={args.num_shards}), got {args.shard_index}")
    return args


def main() -> None:
    args = parse_args()
    require_writable(args.out, args.metrics)
    params = load_section(CacheParams, "cache")
    scorer = configured_scorer()  # the rollout report's judge
    on_gpu = args.device.startswith("cuda")
    model, tokenizer, record = load_teacher(args.teacher, dtype=torch.bfloat16 if on_gpu else torch.float32, device=args.device)
    broken = first_non_finite(model)
    if broken is not None:
        raise CheckpointError(f"{args.teacher}: the teacher's {broken} is not finite (a diverged teacher?); "
                              "rerun the teacher stage")
    layout = Layout.load(args.data)
    check_data_tokenizer(record, args.data)
    train = load_train_split(args.data, params.max_examples)
    header = cache_header(record, layout, params, args.data, model)
    summary = fill_cache(model, train, layout, params, args.out, header, args.shard_index, args.num_shards,
                         args.replace_other)
    if summary["complete"]:
        metrics = {**cache_statistics(args.out), "seconds": summary["seconds"],
                   "total_seconds": round(summary["seconds"] + summary["rollout_seconds"], 2)}
        if params.rollouts.per_example:
            metrics["rollouts"] = rollout_metrics(args, summary, tokenizer, stop_token_ids(
                tokenizer, model.config, checkpoint_dir(args.teacher, record)), scorer)
        if summary["shards_written"] + summary["rollout_shards_written"] == 0:
            keep_timings(metrics, args.metrics)
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.metrics, metrics)
    print(json.dumps(summary, indent=2))


def keep_timings(metrics: dict, previous: Path) -> None:
    """A rerun that found every shard complete (``dvc repro`` after another stage's change, or after
    a kill at the very end) computed nothing: its seconds would be zeros, so the throughput of the
    run that wrote the shards is kept from that run's metrics."""
    try:
        before = json.loads(previous.read_text())
    except (OSError, ValueError):
        return
    for key in ("seconds", "total_seconds"):
        if key in before:
            metrics[key] = before[key]
    for key in ("seconds", "rollouts_per_second"):
        if key in before.get("rollouts", {}) and "rollouts" in metrics:
            metrics["rollouts"][key] = before["rollouts"][key]


def rollout_metrics(args, summary: dict, tokenizer, stops: set[int], scorer) -> dict:
    """Size, throughput (this process's) and the teacher's accuracy on its own rollouts."""
    stats = rollout_statistics(args.out)
    seconds = summary["rollout_seconds"]
    rollouts = open_rollouts(args.out, verify=False)
    train = load_train_split(args.data, stats["examples"], tokens_only=False)
    return {**stats, "seconds": seconds,
            "rollouts_per_second": round(summary["rollouts_written"] / seconds, 1) if seconds else None,
            "forward_passes_per_rollout": stats["sampler"]["steps"] * (2 if stats["sampler"]["cfg_scale"] > 0 else 1),
            "accuracy": score_rollouts(rollouts, train, tokenizer, stops, scorer)}


if __name__ == "__main__":
    run_stage(main)
