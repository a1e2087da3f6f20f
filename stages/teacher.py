"""Stage ``teacher``: the LLaDA checkpoint to distil, recorded under ``artifacts/teacher/``
(params: ``teacher``).

With ``teacher.checkpoint`` set, validate it (config, weights, tokenizer, mask id; the tokenizer
must be the one ``prepare_data`` used) and record its fingerprint, without copying weights.
Otherwise pretrain the built-in tiny LLaDA on ``data/`` with LLaDA's SFT objective.

    python stages/teacher.py --data data --out artifacts/teacher --metrics metrics/teacher
"""

import json
from pathlib import Path

from pipeline.core.files import atomic_directory, require_writable, write_json
from pipeline.core.params import load_section
from pipeline.core.stage import run_stage, stage_parser
from pipeline.models.checkpoint_io import resolve_checkpoint
from pipeline.teacher.artifact import check_data_tokenizer, validate_checkpoint
from pipeline.teacher.params import TeacherParams


def parse_args(argv=None):
    parser = stage_parser(__doc__, reads=["data"], writes="teacher")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/teacher"), help="summary and curves")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    require_writable(args.out, args.metrics)
    params = load_section(TeacherParams, "teacher")
    args.metrics.mkdir(parents=True, exist_ok=True)
    if params.checkpoint is not None:
        record = validate_checkpoint(resolve_checkpoint(params.checkpoint), params.mask_token_id,
                                     full_fingerprint=params.fingerprint == "full")
        record.checkpoint = params.checkpoint
        check_data_tokenizer(record, args.data)
        with atomic_directory(args.out) as tmp:
            record.save(tmp)
        summary = {"checkpoint": params.checkpoint, "fingerprint": record.fingerprint}
        # No pretraining, so no curve; the files exist because dvc.yaml declares them.
        (args.metrics / "training" / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
        summary["curve"] = []
    else:
        from pipeline.teacher.pretraining import pretrain_teacher

        summary = pretrain_teacher(params, args.data, args.out, args.metrics / "training")
    write_json(args.metrics / "accuracy_curve.json", summary.pop("curve"))
    write_json(args.metrics / "summary.json", summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run_stage(main)
