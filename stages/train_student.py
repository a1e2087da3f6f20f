"""Stage ``train_student`` (stage two): MeanFlow distillation of the soft prompt from
``artifacts/cache/``, saved to ``artifacts/student/`` (params: ``student``).

    python stages/train_student.py              # what dvc repro runs; continues this run if it has a checkpoint
    python stages/train_student.py --fresh      # this run from step 0
    torchrun --nproc-per-node 8 stages/train_student.py     # student.strategy=ddp, devices=auto (or 8)
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank $R --master-addr $HOST stages/train_student.py
                                                # and student.num_nodes=2; srun --nodes 2 --ntasks-per-node 8 too
"""

import json
from pathlib import Path

from pipeline.cache.params import CacheParams
from pipeline.core.files import require_writable, write_json
from pipeline.core.params import load_section
from pipeline.core.stage import run_stage, stage_parser
from pipeline.data.scoring import configured_scorer
from pipeline.student.distillation import train_student
from pipeline.student.params import StudentParams
from pipeline.student.run import Resume


def parse_args(argv=None):
    parser = stage_parser(__doc__, reads=["data", "teacher", "cache"], writes="student")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/student"), help="summary and curves")
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints/student"),
                        help="Lightning checkpoints (soft prompt and optimizer state), one directory per run "
                             "(a hash of the params that determine it)")
    parser.add_argument("--logs", type=Path, default=Path("logs/student"),
                        help="where a student.logger besides DVCLive writes (csv, tensorboard, wandb)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", type=Path, nargs="?", const=Resume, default=Resume,
                       help="continue this run (the same params, cache and code) from its last checkpoint, when it "
                            "has one (the default); or from the checkpoint PATH, which must be this run's")
    start.add_argument("--fresh", dest="resume", action="store_const", const=None,
                       help="discard this run's checkpoints and train from step 0")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    require_writable(args.out, args.metrics, args.checkpoints, args.logs)
    params = load_section(StudentParams, "student")
    cache_params = load_section(CacheParams, "cache")  # to refuse a cache built with other params
    summary = train_student(params, args.teacher, args.cache, args.data, args.out, args.metrics, args.checkpoints,
                            args.resume, cache_params, args.logs, configured_scorer())
    if summary is None:  # not global rank 0: rank 0 writes the student and the metrics
        return
    args.metrics.mkdir(parents=True, exist_ok=True)
    write_json(args.metrics / "accuracy_curve.json", summary.pop("curve"))
    write_json(args.metrics / "summary.json", summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run_stage(main)
