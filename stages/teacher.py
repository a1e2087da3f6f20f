"""Stage ``teacher``: the LLaDA checkpoint to distil, recorded under ``artifacts/teacher/``
(params: ``teacher``).

With ``teacher.checkpoint`` set, validate it (config, weights, tokenizer, mask id; the tokenizer
must be the one ``prepare_data`` used) and record its fingerprint, without copying weights.
Otherwise pretrain the built-in tiny LLaDA on ``data/`` with LLaDA's SFT objective.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.checkpoint_io import resolve_checkpoint  # noqa: E402
from pipeline.files import atomic_directory  # noqa: E402
from pipeline.config import TeacherParams, load_section  # noqa: E402
from pipeline.stage import run_stage  # noqa: E402
from pipeline.teacher import check_data_tokenizer, validate_checkpoint  # noqa: E402

DATA = Path("data")
OUT = Path("artifacts/teacher")
METRICS = Path("metrics/teacher")


def main() -> None:
    params = load_section(TeacherParams, "teacher")
    METRICS.mkdir(parents=True, exist_ok=True)
    if params.checkpoint is not None:
        record = validate_checkpoint(resolve_checkpoint(params.checkpoint), params.mask_token_id)
        record.checkpoint = params.checkpoint
        check_data_tokenizer(record, DATA)
        with atomic_directory(OUT) as tmp:
            record.save(tmp)
        summary = {"checkpoint": params.checkpoint, "fingerprint": record.fingerprint}
        # No pretraining, so no curve; the files exist because dvc.yaml declares them.
        (METRICS / "training" / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
        summary["curve"] = []
    else:
        from pipeline.teacher_pretraining import pretrain_teacher

        summary = pretrain_teacher(params, DATA, OUT, METRICS / "training")
    (METRICS / "accuracy_curve.json").write_text(json.dumps(summary.pop("curve"), indent=2) + "\n")
    (METRICS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run_stage(main)
