"""Crafted safetensors headers: each is refused naming the file, before safetensors reads it."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from pipeline.core.errors import CheckpointError
from pipeline.models.checkpoint_check import read_safetensors_header


def crafted(path, header: dict | str, data: bytes):
    text = header if isinstance(header, str) else json.dumps(header)
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    return path


def test_a_file_written_by_safetensors_passes(tmp_path):
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.int64)}, str(tmp_path / "ok.safetensors"))
    header = read_safetensors_header(tmp_path / "ok.safetensors")
    assert set(header) == {"a", "b"} and header["a"]["shape"] == [2, 3]


@pytest.mark.parametrize("case,offsets,message", [
    ("overlap", ([0, 8], [4, 12]), "starts at byte 4 of the data, not at 8"),
    ("hole", ([0, 8], [12, 20]), "starts at byte 12 of the data, not at 8"),
    ("float", ([0, 8.0], [8, 16]), "must be non-negative integers"),
    ("negative", ([-8, 0], [0, 8]), "must be non-negative integers"),
    ("string", (["0", "8"], [8, 16]), "must be non-negative integers"),
    ("boolean", ([False, 8], [8, 16]), "must be non-negative integers"),
])
def test_crafted_offsets_are_refused(tmp_path, case, offsets, message):
    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": list(extent)}
              for name, extent in zip(("a", "b"), offsets)}
    with pytest.raises(CheckpointError, match=f"{case}.safetensors: .*{message}"):
        read_safetensors_header(crafted(tmp_path / f"{case}.safetensors", header, bytes(16)))


def test_a_deeply_nested_header_is_refused(tmp_path):
    path = crafted(tmp_path / "deep.safetensors", "[" * 200_000 + "]" * 200_000, b"")
    with pytest.raises(CheckpointError, match="deep.safetensors: unreadable safetensors header"):
        read_safetensors_header(path)
