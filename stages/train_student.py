"""Stage ``train_student`` (stage two): MeanFlow distillation of the soft prompt from
``artifacts/cache/``, saved to ``artifacts/student/`` (params: ``student``).

    python stages/train_student.py                                  # what dvc repro runs
    python stages/train_student.py --resume checkpoints/student/last.ckpt
    torchrun --nproc-per-node 8 stages/train_student.py             # with student.strategy=ddp, devices=8
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import StudentParams, load_section  # noqa: E402
from pipeline.distillation import train_student  # noqa: E402
from pipeline.stage import run_stage  # noqa: E402

DATA = Path("data")
TEACHER = Path("artifacts/teacher")
CACHE = Path("artifacts/cache")
OUT = Path("artifacts/student")
METRICS = Path("metrics/student")
CHECKPOINTS = Path("checkpoints/student")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", type=Path, help="a Lightning checkpoint to continue from")
    args = parser.parse_args()
    params = load_section(StudentParams, "student")
    METRICS.mkdir(parents=True, exist_ok=True)
    summary = train_student(params, TEACHER, CACHE, DATA, OUT, METRICS, CHECKPOINTS, args.resume)
    if summary is None:  # not global rank 0: rank 0 writes the student and the metrics
        return
    (METRICS / "accuracy_curve.json").write_text(json.dumps(summary.pop("curve"), indent=2) + "\n")
    (METRICS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run_stage(main)
