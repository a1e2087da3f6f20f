"""The teacher artifact (``artifacts/teacher/``): which LLaDA checkpoint later stages distil.

``teacher.json`` records the checkpoint (``.`` for the built-in teacher saved in the same
directory, otherwise the path or hub id the user gave; weights are never copied), its fingerprint,
the mask id and the tokenizer hash. ``load_teacher`` re-resolves it and refuses a checkpoint whose
fingerprint changed since it was recorded; ``check_data_tokenizer`` refuses data tokenized otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.core.errors import CheckpointError, DataError
from pipeline.core.files import file_sha256
from pipeline.data.tokenizer import load_tokenizer
from pipeline.models.checkpoint_check import check_weight_files, meta_shapes
from pipeline.models.checkpoint_io import checkpoint_fingerprint, read_json, resolve_checkpoint, resolve_weight_files
from pipeline.models.mask_predictor import MaskPredictor
from pipeline.models.registry import load_model, model_class

RECORD = "teacher.json"


@dataclasses.dataclass
class TeacherRecord:
    checkpoint: str
    """``.`` (this directory) or the user's path / hub id."""
    fingerprint: str
    mask_token_id: int
    tokenizer_sha256: str
    builtin: bool
    architecture: str = "llada"
    """``llada`` or ``llada_moe`` (``pipeline.models.registry``); records written before LLaDA-MoE: llada."""
    fingerprint_full: bool = False
    """Whether ``fingerprint`` covers every byte of the weights (``teacher.fingerprint: full``) or the
    sampled slices (``checkpoint_fingerprint``)."""

    def save(self, directory: Path) -> None:
        data = dataclasses.asdict(self)
        if not self.fingerprint_full:  # a sampled fingerprint's record keeps its earlier bytes
            del data["fingerprint_full"]
        (Path(directory) / RECORD).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "TeacherRecord":
        data = read_json(Path(directory) / RECORD)
        try:
            return cls(**data)
        except TypeError as err:
            raise CheckpointError(f"{Path(directory) / RECORD}: {err}") from err


def tokenizer_hash(directory: str | Path) -> str:
    """What identifies a tokenizer: the sha256 of the ``tokenizer.json`` in ``directory``."""
    return file_sha256(Path(directory) / "tokenizer.json")


def check_data_tokenizer(record: TeacherRecord, data_dir: str | Path) -> None:
    """Refuse data that ``prepare_data`` tokenized with another tokenizer than the teacher's."""
    if record.tokenizer_sha256 != tokenizer_hash(Path(data_dir) / "tokenizer"):
        raise DataError(f"the teacher's tokenizer differs from {Path(data_dir) / 'tokenizer'}; rerun prepare_data")


def checkpoint_dir(directory: Path, record: TeacherRecord) -> Path:
    return Path(directory) if record.checkpoint == "." else resolve_checkpoint(record.checkpoint)


def validate_checkpoint(path: Path, mask_token_id: int | None = None, full_fingerprint: bool = False) -> TeacherRecord:
    """Check that ``path`` is a usable LLaDA or LLaDA-MoE checkpoint: config, weights (every header and
    shape, without loading them), tokenizer, mask id; record it with its fingerprint (of every byte
    with ``full_fingerprint``)."""
    architecture = model_class(path)
    config = architecture.config_class.from_file(path / "config.json")
    check_weight_files(resolve_weight_files(path), meta_shapes(lambda: architecture(config)))
    tokenizer = load_tokenizer(path)
    mask = config.mask_token_id if mask_token_id is None else mask_token_id
    if len(tokenizer) > config.embedding_size:
        raise CheckpointError(
            f"{path}: tokenizer has {len(tokenizer)} tokens but the model embeds only {config.embedding_size}"
        )
    if not 0 <= mask < config.embedding_size:
        raise CheckpointError(f"{path}: mask_token_id {mask} is outside the embedding ({config.embedding_size})")
    if mask in {tokenizer.eos_token_id, tokenizer.bos_token_id, config.eos_token_id} - {None}:
        raise CheckpointError(f"{path}: mask_token_id {mask} collides with EOS/BOS")
    return TeacherRecord(
        checkpoint=str(path),
        fingerprint=checkpoint_fingerprint(path, full=full_fingerprint),
        mask_token_id=mask,
        tokenizer_sha256=tokenizer_hash(path),
        builtin=False,
        architecture=config.architecture,
        fingerprint_full=full_fingerprint,
    )


def load_teacher(directory: str | Path, dtype=None, device=None) -> tuple[MaskPredictor, object, TeacherRecord]:
    """(model, tokenizer, record) of a teacher artifact; the model's ``mask_token_id`` is the
    recorded one."""
    directory = Path(directory)
    record = TeacherRecord.load(directory)
    path = checkpoint_dir(directory, record)
    found = checkpoint_fingerprint(path, full=record.fingerprint_full)
    if found != record.fingerprint:
        raise CheckpointError(
            f"{directory / RECORD}: checkpoint {path} has fingerprint {found}, recorded {record.fingerprint}; "
            "rerun the teacher stage"
        )
    model = load_model(path, dtype=dtype, device=device)
    model.config.mask_token_id = record.mask_token_id
    return model, load_tokenizer(path), record
