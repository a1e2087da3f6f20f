"""Stage ``prepare_data``: tokenized train/val/test splits under ``data/`` (params: ``data``).

Built-in default: the task suite with a character-level tokenizer. With ``teacher.checkpoint`` set,
the checkpoint's own tokenizer (and chat template) is used.

    python stages/prepare_data.py --out data
"""

from pipeline.core.files import require_writable
from pipeline.core.params import load_section
from pipeline.core.stage import run_stage, stage_parser
from pipeline.data.params import DataParams
from pipeline.data.prepare import prepare_data
from pipeline.data.tasks import ALPHABET
from pipeline.data.tokenizer import build_char_tokenizer, load_tokenizer
from pipeline.teacher.params import TeacherParams


def parse_args(argv=None):
    return stage_parser(__doc__, writes="data").parse_args(argv)


def main() -> None:
    args = parse_args()
    require_writable(args.out)
    params = load_section(DataParams, "data")
    teacher = load_section(TeacherParams, "teacher")
    if teacher.checkpoint is None:
        tokenizer = build_char_tokenizer(ALPHABET)
    else:
        from pipeline.models.checkpoint_io import resolve_checkpoint

        tokenizer = load_tokenizer(resolve_checkpoint(teacher.checkpoint))
    sizes = prepare_data(params, tokenizer, args.out)
    print(f"wrote {args.out}/: " + ", ".join(f"{name} {n} rows" for name, n in sizes.items()))


if __name__ == "__main__":
    run_stage(main)
