"""Files of a Hugging Face style checkpoint directory: weights, index, fingerprint, hub resolution."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipeline.core.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def resolve_weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, single-file or sharded via the index."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if (path / INDEX_FILE).is_file():
        index = read_json(path / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path / INDEX_FILE}: no 'weight_map'")
        if not all(isinstance(name, str) for name in weight_map.values()):
            raise CheckpointError(f"{path / INDEX_FILE}: every 'weight_map' value must be a weight file name")
        names = sorted(set(weight_map.values()))
        for name in names:  # shard names, never paths: an index must not reach outside its directory
            if Path(name).name != name or name in (".", "..") or "\\" in name:
                raise CheckpointError(f"{path / INDEX_FILE}: names the weight file {name!r}, which is not a file "
                                      "name in the checkpoint directory")
        files = [path / name for name in names]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{path / INDEX_FILE}: lists {file.name}, which does not exist")
        return files
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def write_sharded_safetensors(state: dict[str, torch.Tensor], path: Path, max_shard_bytes: int) -> None:
    """Write ``state`` as ``model.safetensors``, or as ``model-0000i-of-0000n.safetensors`` shards with
    an index when it exceeds ``max_shard_bytes`` (the Hugging Face layout)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def checkpoint_fingerprint(path: str | Path, full: bool = False, window: int = 1 << 20, windows: int = 16) -> str:
    """A content fingerprint of a checkpoint: sha256 over ``config.json``, and for each weight file its
    name, size, safetensors header and ``windows`` evenly spaced ``window``-byte slices; with ``full``,
    every byte of every weight file instead of the slices.

    Sampling keeps this fast on a 16 GB checkpoint while any retraining (which changes every tensor),
    a different architecture, a truncation or a header change changes it; a flipped byte outside the
    slices does not: ``full`` catches that, at the price of reading every weight file (about a minute
    for LLaDA-8B at 300 MB/s).
    """
    path = Path(path)
    digest = hashlib.sha256(b"full" if full else b"")
    digest.update((path / "config.json").read_bytes())
    for file in resolve_weight_files(path):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            if full:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
                continue
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, size)))
            for i in range(windows):
                f.seek(i * max(size - window, 0) // max(windows - 1, 1))
                digest.update(f.read(window))
    return digest.hexdigest()[:16]


def looks_like_hub_id(name: str) -> bool:
    """``owner/name``, not a path (``./x``, ``/x``, ``~/x``)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def hub_revision(path: Path) -> str | None:
    """The commit of a hub snapshot directory (``.../snapshots/<commit>``), else None."""
    return path.name if path.parent.name == "snapshots" else None


def resolve_checkpoint(name: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a Hugging Face id downloaded (config, tokenizer, weights)
    into the local hub cache, at ``revision`` (a branch, tag or commit; None: the default branch).
    A name that is neither is a clear error."""
    path = Path(name)
    if path.is_dir():
        return path
    text = str(name)
    if looks_like_hub_id(text):
        try:
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
        except Exception as err:  # network, auth, missing repo: one message naming the id
            raise CheckpointError(f"{text}: not a local directory, and the hub download failed ({err})") from err
    raise CheckpointError(f"{text}: checkpoint directory not found")


def generation_hints(checkpoint: Path) -> dict:
    """Defaults a checkpoint may suggest in ``generation_config.json`` (e.g. our built-in teacher's
    ``gen_length``); real LLaDA checkpoints suggest none."""
    path = Path(checkpoint) / "generation_config.json"
    if not path.is_file():
        return {}
    data = read_json(path)
    return {k: data[k] for k in ("gen_length",) if isinstance(data.get(k), int)}
