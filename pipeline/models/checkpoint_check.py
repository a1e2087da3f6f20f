"""Checking a checkpoint's weights before any stage relies on them: every safetensors header read
and its tensors' shapes compared with the model's (without loading a weight), and non-finite
weights found in a loaded model.

The expected shapes are a dict ``{tensor name: shape}``, which ``meta_shapes`` computes from any
model class instantiated on the meta device (no memory), so the check serves every architecture.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from pipeline.core.errors import CheckpointError

HEADER_LIMIT = 100 * 2**20
"""The largest header safetensors itself accepts (bytes)."""

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
"""Bytes per element of each safetensors dtype."""


def meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the state dict of ``build()``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build()
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def read_safetensors_header(file: Path) -> dict[str, dict]:
    """The tensor entries (dtype, shape, data_offsets) of a safetensors file, checked for consistency
    with the file: a header that parses, integer shapes and offsets, each tensor's byte extent equal
    to its shape times its dtype size, the extents tiling the data region without overlap or hole (as
    the format requires), and the data ending exactly at the end of the file (so a truncated copy is
    caught)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{file}: not a complete safetensors file (header length {length}, file size {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise CheckpointError(f"{file}: unreadable safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: unreadable safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    extents = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, stop) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            if not all(is_count(n) for n in (*shape, begin, stop)):
                raise ValueError("shape and data_offsets must be non-negative integers")
            nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        except (TypeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{file}: malformed header entry for tensor {name!r} ({err!r})") from err
        if stop - begin != nbytes:
            raise CheckpointError(f"{file}: tensor {name!r} spans {stop - begin} bytes, its shape needs {nbytes}")
        extents.append((begin, stop, name))
    end = 0
    for begin, stop, name in sorted(extents):
        if begin != end:
            raise CheckpointError(f"{file}: tensor {name!r} starts at byte {begin} of the data, not at {end} "
                                  "(tensors overlap or leave a hole)")
        end = stop
    if 8 + length + end != size:
        raise CheckpointError(f"{file}: {size} bytes, but its header describes {8 + length + end} (a truncated "
                              "or damaged copy?)")
    return header


def is_count(value) -> bool:
    """A non-negative int (JSON true/false and floats are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_weight_files(files: list[Path], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse weight files whose tensors are not exactly ``expected`` (``{name: shape}``, e.g. from
    ``meta_shapes``): a damaged header, an unexpected, duplicated or missing tensor, or a shape the
    config does not imply. Errors name the file."""
    found: dict[str, Path] = {}
    for file in files:
        for name, entry in read_safetensors_header(file).items():
            if name not in expected:
                raise CheckpointError(f"{file}: unexpected tensor {name!r} for a model with this config")
            if name in found:
                raise CheckpointError(f"{file}: tensor {name!r} is also in {found[name].name}")
            if tuple(entry["shape"]) != expected[name]:
                raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(entry['shape'])}, config.json "
                                      f"implies {expected[name]} (config and weights disagree)")
            found[name] = file
    missing = sorted(set(expected) - set(found))
    if missing:
        names = ", ".join(f.name for f in files)
        raise CheckpointError(f"{files[0].parent}: the weights ({names}) lack {len(missing)} tensors the config "
                              f"implies, e.g. {missing[:3]}")


def first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first floating-point tensor of ``model`` holding a NaN or an infinity."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None
