"""Stage ``prepare_data``: tokenized train/val/test splits under ``data/`` (params: ``data``).

Built-in default: the task suite with a character-level tokenizer. With ``teacher.checkpoint`` set,
the checkpoint's own tokenizer (and chat template) is used.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import DataParams, TeacherParams, load_section  # noqa: E402
from pipeline.data import prepare_data  # noqa: E402
from pipeline.stage import run_stage  # noqa: E402
from pipeline.tasks import ALPHABET  # noqa: E402
from pipeline.tokenizer import build_char_tokenizer, load_tokenizer  # noqa: E402

OUT = Path("data")


def main() -> None:
    params = load_section(DataParams, "data")
    teacher = load_section(TeacherParams, "teacher")
    if teacher.checkpoint is None:
        tokenizer = build_char_tokenizer(ALPHABET)
    else:
        from pipeline.checkpoint_io import resolve_checkpoint

        tokenizer = load_tokenizer(resolve_checkpoint(teacher.checkpoint))
    sizes = prepare_data(params, tokenizer, OUT)
    print(f"wrote {OUT}/: " + ", ".join(f"{name} {n} rows" for name, n in sizes.items()))


if __name__ == "__main__":
    run_stage(main)
