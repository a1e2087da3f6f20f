"""Stage ``prepare_data``: tokenized train/val/test splits under ``data/`` (params: ``data``).

Built-in default: the task suite with a character-level tokenizer. With ``teacher.checkpoint`` set,
the checkpoint's own tokenizer (and chat template) is used.

    python stages/prepare_data.py --out data --metrics metrics/data.json

``metrics/data.json``: rows per split, and rows dropped as too long (``data.too_long: drop``).
"""

from pathlib import Path

from pipeline.core.files import require_writable, write_json
from pipeline.core.params import load_section
from pipeline.core.stage import run_stage, stage_parser
from pipeline.data.params import DataParams
from pipeline.data.prepare import prepare_data
from pipeline.data.tasks import ALPHABET
from pipeline.data.tokenizer import build_char_tokenizer, load_tokenizer
from pipeline.teacher.params import TeacherParams


def parse_args(argv=None):
    parser = stage_parser(__doc__, writes="data")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/data.json"), help="rows per split")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    require_writable(args.out, args.metrics)
    params = load_section(DataParams, "data")
    teacher = load_section(TeacherParams, "teacher")
    if teacher.checkpoint is None:
        tokenizer = build_char_tokenizer(ALPHABET)
    else:
        from pipeline.models.checkpoint_io import resolve_checkpoint

        tokenizer = load_tokenizer(resolve_checkpoint(teacher.checkpoint))
    counts = prepare_data(params, tokenizer, args.out)
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.metrics, counts)
    print(f"wrote {args.out}/: " + ", ".join(f"{name} {c['rows']} rows" + (
        f" ({c['dropped_too_long']} dropped as too long)" if c["dropped_too_long"] else "") for name, c in counts.items()))


if __name__ == "__main__":
    run_stage(main)
