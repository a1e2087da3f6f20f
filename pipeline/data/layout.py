"""The sequence layout every stage shares, and LLaDA's forward (masking) process on it.

Layout of every sequence (LLaDA's SFT data with a fixed-size prompt region)::

    [pad ... pad BOS prompt tokens][answer tokens (suffix) EOS EOS ... EOS]
     <----- prompt_length ------->  <------------- gen_length ----------->

The prompt region is left padded and its padding is excluded by ``attention_mask``; the answer
region is always attended, and its EOS padding is part of the target (the model learns where the
answer ends). Prompt tokens are never masked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from pipeline.core.errors import DataError
from pipeline.core.files import file_sha256

LAYOUT_FILE = "layout.json"


@dataclasses.dataclass(frozen=True)
class Layout:
    prompt_length: int
    gen_length: int
    pad_token_id: int
    """EOS, used for both prompt padding (masked out) and answer padding (a target)."""

    @property
    def length(self) -> int:
        return self.prompt_length + self.gen_length

    def save(self, directory: Path) -> None:
        (Path(directory) / LAYOUT_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "Layout":
        path = Path(directory) / LAYOUT_FILE
        if not path.is_file():
            raise DataError(f"{path}: not found (run the prepare_data stage)")
        try:
            layout = cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise DataError(f"{path}: damaged ({err}); rerun the prepare_data stage") from err
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in dataclasses.astuple(layout)) \
                or min(layout.prompt_length, layout.gen_length) < 1:
            raise DataError(f"{path}: damaged (lengths must be positive integers); rerun the prepare_data stage")
        for split, length in split_sequence_lengths(directory).items():
            if length != layout.length:
                raise DataError(f"{path}: says prompt_length {layout.prompt_length} + gen_length {layout.gen_length} = "
                                f"{layout.length} tokens, but {split}/ holds sequences of {length}; rerun the "
                                "prepare_data stage")
        return layout


def split_sequence_lengths(data_dir: Path) -> dict[str, int]:
    """The sequence length of each split ``prepare_data`` saved under ``data_dir`` (from its
    ``dataset_info.json``; splits without one are left to ``load_split`` to refuse)."""
    lengths = {}
    for info in sorted(Path(data_dir).glob("*/dataset_info.json")):
        try:
            length = json.loads(info.read_text())["features"]["input_ids"]["length"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            continue
        if isinstance(length, int) and length > 0:  # -1: a sequence of any length (not prepare_data's)
            lengths[info.parent.name] = length
    return lengths


def load_split(data_dir: Path, name: str):
    """The tokenized split ``name`` (``train``, ``val``, ``test``) that ``prepare_data`` saved under
    ``data_dir``, as a ``datasets.Dataset``; a missing or damaged one is a ``DataError`` naming it."""
    import datasets

    path = Path(data_dir) / name
    if not path.is_dir():
        raise DataError(f"{path}: not found (run the prepare_data stage)")
    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # pyarrow, datasets and json raise their own types for a damaged split
        raise DataError(f"{path}: a damaged split ({type(err).__name__}: {err}); rerun the prepare_data stage") from err


def split_fingerprint(split_dir: Path) -> str:
    """sha256 over the Arrow files of a split written by ``prepare_data`` (identifies its content)."""
    files = sorted(Path(split_dir).glob("*.arrow"))
    if not files:
        raise DataError(f"{split_dir}: no Arrow files (run the prepare_data stage)")
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- forward process


def sample_mask_ratio(
    batch: int, eps: float, generator: torch.Generator | None = None, device=None, stratified: bool = False
) -> torch.Tensor:
    """LLaDA's t ~ U(eps, 1] (B,). ``stratified`` draws one t from each of B equal slices of the
    interval (in random order): still uniform per sample, but a batch covers all noise levels, which
    lowers the variance of the 1/t-weighted loss."""
    u = torch.rand(batch, generator=generator, device=device)
    if stratified:
        slot = torch.randperm(batch, generator=generator, device=device)
        u = (slot + u) / batch
    return eps + (1.0 - eps) * (1.0 - u)  # 1 - u lies in (0, 1]


def forward_mask(
    x0: torch.Tensor,
    t: torch.Tensor,
    answer_start: int,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each answer token of ``x0`` (B, L) independently with probability ``t`` (B,); positions
    before ``answer_start`` (the prompt) are never masked. Returns (x_t, masked) (B, L)."""
    draws = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = draws < t[:, None]
    masked[:, :answer_start] = False
    return x0.masked_fill(masked, mask_id), masked
