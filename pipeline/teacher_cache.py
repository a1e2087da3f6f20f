"""The teacher cache: top-k sparse teacher log-probs on sampled noisy inputs, in zstd Arrow shards.

This format is a user-facing contract (stage one writes it on spare GPUs, stage two reads it).

Directory::

    manifest.json          header (format, version, teacher fingerprint, tokenizer hash, data
                           fingerprint, params hash and params, layout, vocab size, top_k,
                           num_shards); once every shard is written also "complete": true and
                           "shards": {index: {rows, sha256, bytes, masked_positions}}
    shard-00000.arrow      Arrow IPC *file* format, zstd-compressed buffers, record batches of
    shard-00000.json       ``record_batch_rows`` rows; the .json sidecar (same fields as the
    ...                    manifest's shard entry) is written after the shard, so a shard counts
                           as complete only when both exist. Writers use a temporary name and
                           rename, so a killed run never leaves a file that reads as a shard.

One row per (example, sample); L = prompt_length + gen_length, k = top_k:

    example_index     int64                      row of the training split
    sample_index      int32                      which of samples_per_example draws
    t                 float32                    mask ratio the row was drawn with
    input_ids         fixed_size_list<int32>[L]  x_t (masked positions hold the mask id)
    attention_mask    fixed_size_list<int8>[L]   0 on the prompt's left padding
    x0                fixed_size_list<int32>[L]  the clean sequence
    masked_positions  list<int32>                positions masked in x_t (answer region only)
    topk_ids          list<fixed_size_list<int32>[k]>    per masked position, descending
    topk_logprobs     list<fixed_size_list<float16>[k]>  log-softmax over the full vocabulary

Read with ``open_cache(dir)`` (pyarrow, memory-mapped; Hugging Face ``datasets`` would upcast fp16 and
int32 and reads only the stream format).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import CacheError, CheckpointError
from pipeline.files import atomic_write_text, file_sha256

FORMAT = "llada-meanflow-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def cache_schema(length: int, top_k: int) -> pa.Schema:
    return pa.schema(
        [
            ("example_index", pa.int64()),
            ("sample_index", pa.int32()),
            ("t", pa.float32()),
            ("input_ids", pa.list_(pa.int32(), length)),
            ("attention_mask", pa.list_(pa.int8(), length)),
            ("x0", pa.list_(pa.int32(), length)),
            ("masked_positions", pa.list_(pa.int32())),
            ("topk_ids", pa.list_(pa.list_(pa.int32(), top_k))),
            ("topk_logprobs", pa.list_(pa.list_(pa.float16(), top_k))),
        ],
        metadata={"format": FORMAT, "version": str(VERSION)},
    )


@dataclasses.dataclass
class CacheRows:
    """A block of rows as flat numpy arrays (N rows, M masked positions in all)."""

    example_index: np.ndarray  # (N,) int64
    sample_index: np.ndarray  # (N,) int32
    t: np.ndarray  # (N,) float32
    input_ids: np.ndarray  # (N, L) int32
    attention_mask: np.ndarray  # (N, L) int8
    x0: np.ndarray  # (N, L) int32
    num_masked: np.ndarray  # (N,) int64
    masked_positions: np.ndarray  # (M,) int32, row-major
    topk_ids: np.ndarray  # (M, k) int32
    topk_logprobs: np.ndarray  # (M, k) float16

    def __len__(self) -> int:
        return len(self.t)

    def to_record_batch(self, schema: pa.Schema) -> pa.RecordBatch:
        offsets = np.concatenate(([0], np.cumsum(self.num_masked))).astype(np.int32)

        def fixed(values: np.ndarray) -> pa.FixedSizeListArray:
            return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])

        def ragged(values: pa.Array) -> pa.ListArray:
            return pa.ListArray.from_arrays(pa.array(offsets), values)

        columns = [
            pa.array(self.example_index, pa.int64()),
            pa.array(self.sample_index, pa.int32()),
            pa.array(self.t, pa.float32()),
            fixed(self.input_ids.astype(np.int32)),
            fixed(self.attention_mask.astype(np.int8)),
            fixed(self.x0.astype(np.int32)),
            ragged(pa.array(self.masked_positions.astype(np.int32))),
            ragged(fixed(self.topk_ids.astype(np.int32))),
            ragged(fixed(self.topk_logprobs.astype(np.float16))),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=schema)

    def slice(self, start: int, stop: int) -> "CacheRows":
        offsets = np.concatenate(([0], np.cumsum(self.num_masked)))
        a, b = offsets[start], offsets[stop]
        return CacheRows(
            self.example_index[start:stop], self.sample_index[start:stop], self.t[start:stop],
            self.input_ids[start:stop], self.attention_mask[start:stop], self.x0[start:stop],
            self.num_masked[start:stop], self.masked_positions[a:b], self.topk_ids[a:b], self.topk_logprobs[a:b],
        )


def record_batch_arrays(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """Columns of a (possibly sliced) record batch as numpy arrays: per-row columns (n,) or (n, L),
    ``offsets`` (n + 1,) into the per-position columns ``masked_positions`` (M,), ``topk_ids`` and
    ``topk_logprobs`` (M, k)."""
    n = batch.num_rows

    def fixed(name: str) -> np.ndarray:
        column = batch.column(name)
        return column.flatten().to_numpy(zero_copy_only=False).reshape(n, column.type.list_size)

    def per_position(name: str) -> np.ndarray:
        values = batch.column(name).flatten()  # respects slicing, unlike .values
        if pa.types.is_fixed_size_list(values.type):
            return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), values.type.list_size)
        return values.to_numpy(zero_copy_only=False)

    offsets = batch.column("masked_positions").offsets.to_numpy()
    return {
        "example_index": batch.column("example_index").to_numpy(),
        "sample_index": batch.column("sample_index").to_numpy(),
        "t": batch.column("t").to_numpy(),
        "input_ids": fixed("input_ids"),
        "attention_mask": fixed("attention_mask"),
        "x0": fixed("x0"),
        "offsets": offsets - offsets[0],
        "masked_positions": per_position("masked_positions"),
        "topk_ids": per_position("topk_ids"),
        "topk_logprobs": per_position("topk_logprobs"),
    }


def decode_record_batch(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """Rows of a record batch as dicts of numpy arrays (``topk_*`` shaped (n_masked, k))."""
    arrays = record_batch_arrays(batch)
    offsets = arrays["offsets"]
    rows = []
    for i in range(batch.num_rows):
        a, b = offsets[i], offsets[i + 1]
        row = {key: arrays[key][i] for key in ("input_ids", "attention_mask", "x0")}
        row.update(example_index=int(arrays["example_index"][i]), sample_index=int(arrays["sample_index"][i]),
                   t=float(arrays["t"][i]))
        row.update({key: arrays[key][a:b] for key in ("masked_positions", "topk_ids", "topk_logprobs")})
        rows.append(row)
    return rows


def write_json_atomic(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class ShardWriter:
    """Writes one shard under a temporary name; ``close()`` renames it into place and writes its
    sidecar. Leaving the ``with`` block by an exception removes the temporary file."""

    def __init__(self, directory: Path, index: int, schema: pa.Schema, record_batch_rows: int):
        self.directory, self.index, self.schema = Path(directory), index, schema
        self.record_batch_rows = record_batch_rows
        self.path = self.directory / shard_name(index)
        self.tmp = self.directory / f".{shard_name(index)}.tmp-{os.getpid()}"
        self.sink = pa.OSFile(str(self.tmp), "wb")
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        self.writer = pa.ipc.new_file(self.sink, schema, options=options)
        self.pending: list[CacheRows] = []
        self.pending_rows = 0
        self.rows = 0
        self.masked = 0

    def write(self, rows: CacheRows) -> None:
        self.pending.append(rows)
        self.pending_rows += len(rows)
        while self.pending_rows >= self.record_batch_rows:
            self._flush(self.record_batch_rows)

    def _flush(self, count: int) -> None:
        merged = concat_rows(self.pending)
        self.writer.write_batch(merged.slice(0, count).to_record_batch(self.schema))
        self.rows += count
        self.masked += int(merged.num_masked[:count].sum())
        rest = merged.slice(count, len(merged))
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)

    def close(self) -> dict:
        if self.pending_rows:
            self._flush(self.pending_rows)
        self.writer.close()
        self.sink.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        info = {"rows": self.rows, "masked_positions": self.masked, "bytes": self.tmp.stat().st_size,
                "sha256": file_sha256(self.tmp)}
        os.replace(self.tmp, self.path)
        write_json_atomic(self.directory / sidecar_name(self.index), info)
        return info

    def abort(self) -> None:
        try:
            self.writer.close()
            self.sink.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def concat_rows(blocks: list[CacheRows]) -> CacheRows:
    if len(blocks) == 1:
        return blocks[0]
    return CacheRows(*(np.concatenate([getattr(b, f.name) for b in blocks]) for f in dataclasses.fields(CacheRows)))


# ---------------------------------------------------------------------- manifest


def read_manifest(directory: Path) -> dict:
    from pipeline.checkpoint_io import read_json

    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{path}: not found (not a teacher cache, or stage one never started)")
    try:
        manifest = read_json(path)
    except CheckpointError as err:
        raise CacheError(str(err)) from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    return manifest


HEADER_CHECKS = ("teacher_fingerprint", "tokenizer_sha256", "data_fingerprint", "params_hash")


def ensure_manifest(directory: Path, header: dict) -> None:
    """Create the manifest header, or check that an existing one describes the same cache (same
    teacher, tokenizer, data and params); refuse with a clear error otherwise."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST
    if path.exists():
        existing = read_manifest(directory)
        for key in HEADER_CHECKS:
            if existing.get(key) != header[key]:
                raise CacheError(
                    f"{path}: this cache was built with {key} {existing.get(key)}, the current run has "
                    f"{header[key]}; delete {directory} or point the stage at another directory"
                )
        return
    write_json_atomic(path, {"format": FORMAT, "version": VERSION, **header, "complete": False})


def completed_shards(directory: Path, num_shards: int) -> dict[int, dict]:
    """Sidecars of the shards written so far (a shard without its sidecar is incomplete)."""
    done = {}
    for index in range(num_shards):
        sidecar = Path(directory) / sidecar_name(index)
        if sidecar.is_file() and (Path(directory) / shard_name(index)).is_file():
            done[index] = json.loads(sidecar.read_text())
    return done


def finalize_manifest(directory: Path) -> bool:
    """Record every shard in the manifest once all exist. Idempotent: concurrent workers that
    finish together write identical content. Returns whether the cache is complete."""
    manifest = read_manifest(directory)
    done = completed_shards(directory, manifest["num_shards"])
    if len(done) < manifest["num_shards"]:
        return False
    manifest["shards"] = {f"{i:05d}": done[i] for i in sorted(done)}
    manifest["rows"] = sum(s["rows"] for s in done.values())
    manifest["masked_positions"] = sum(s["masked_positions"] for s in done.values())
    manifest["bytes"] = sum(s["bytes"] for s in done.values())
    manifest["complete"] = True
    write_json_atomic(Path(directory) / MANIFEST, manifest)
    return True


# ---------------------------------------------------------------------- reader


class TeacherCache(Sequence):
    """Map-style view of a complete cache: ``len(cache)`` rows, ``cache[i]`` a dict (see module doc).

    Shards are memory-mapped; a row access decompresses its record batch (kept in a small LRU), so
    for throughput read whole record batches (``num_batches``, ``batch(j)``) in random order rather
    than rows in random order."""

    def __init__(self, directory: str | Path, verify: bool = True):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if not self.manifest.get("complete"):
            done = len(completed_shards(self.directory, self.manifest["num_shards"]))
            raise CacheError(f"{self.directory}: incomplete cache ({done} of {self.manifest['num_shards']} shards)")
        self.schema = cache_schema(self.manifest["layout"]["length"], self.manifest["top_k"])
        self.readers = []
        batch_rows: list[tuple[int, int, int]] = []  # (shard, batch, rows)
        for index in range(self.manifest["num_shards"]):
            path = self.directory / shard_name(index)
            entry = self.manifest["shards"][f"{index:05d}"]
            if not path.is_file():
                raise CacheError(f"{path}: missing shard")
            if path.stat().st_size != entry["bytes"]:
                raise CacheError(f"{path}: size {path.stat().st_size} != {entry['bytes']} recorded (truncated?)")
            if verify and file_sha256(path) != entry["sha256"]:
                raise CacheError(f"{path}: checksum mismatch (the shard is damaged)")
            try:
                reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            except (pa.ArrowInvalid, OSError) as err:
                raise CacheError(f"{path}: not a readable Arrow file ({err})") from err
            if not reader.schema.equals(self.schema, check_metadata=False):
                raise CacheError(f"{path}: schema differs from the manifest's (layout/top_k)")
            # Writers emit full record batches of ``record_batch_rows`` and one shorter last one.
            per_batch = self.manifest["record_batch_rows"]
            expected = -(-entry["rows"] // per_batch)
            if reader.num_record_batches != expected:
                raise CacheError(f"{path}: {reader.num_record_batches} record batches, expected {expected}")
            for b in range(expected):
                batch_rows.append((index, b, min(per_batch, entry["rows"] - b * per_batch)))
            self.readers.append(reader)
        self.batch_index = batch_rows
        self.starts = np.cumsum([0] + [n for _, _, n in batch_rows])
        self._decoded = lru_cache(maxsize=8)(self._decode)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_batches(self) -> int:
        return len(self.batch_index)

    def record_batch(self, j: int) -> pa.RecordBatch:
        shard, b, _ = self.batch_index[j]
        return self.readers[shard].get_batch(b)

    def _decode(self, j: int) -> list[dict]:
        return decode_record_batch(self.record_batch(j))

    def batch(self, j: int) -> list[dict]:
        """Rows of record batch ``j`` (0 <= j < num_batches)."""
        return self._decoded(j)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        j = int(np.searchsorted(self.starts, i, side="right") - 1)
        return self._decoded(j)[i - int(self.starts[j])]


def open_cache(directory: str | Path, verify: bool = True) -> TeacherCache:
    """Open a complete teacher cache; ``verify`` checks every shard's sha256 (reads every byte)."""
    return TeacherCache(directory, verify=verify)


def cache_statistics(directory: str | Path) -> dict:
    """Size accounting of a complete cache: rows, masked positions, and bytes per masked position
    on disk and raw (uncompressed Arrow buffers), against LLaDA-style dense bf16 rows."""
    manifest = read_manifest(Path(directory))
    if not manifest.get("complete"):
        raise CacheError(f"{directory}: incomplete cache")
    rows, masked, k = manifest["rows"], manifest["masked_positions"], manifest["top_k"]
    length = manifest["layout"]["length"]
    per_row = 8 + 4 + 4 + length * (4 + 1 + 4) + 3 * 4  # scalars, three fixed lists, three offsets
    per_position = 4 + k * (4 + 2)  # position, ids, log-probs
    raw = rows * per_row + masked * per_position
    return {
        "rows": rows,
        "masked_positions": masked,
        "top_k": k,
        "bytes_on_disk": manifest["bytes"],
        "bytes_per_masked_position_disk": round(manifest["bytes"] / masked, 2),
        "bytes_per_masked_position_raw": round(raw / masked, 2),
        "topk_bytes_per_masked_position_raw": per_position,
        "dense_bf16_bytes_per_position": 2 * manifest["vocab_size"],
    }
