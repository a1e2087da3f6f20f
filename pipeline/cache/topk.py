"""The teacher cache: top-k sparse teacher log-probs on sampled noisy inputs, in zstd Arrow shards.

This format is a user-facing contract (stage one writes it on spare GPUs, stage two reads it).

Directory (the shard machinery is ``pipeline.cache.shards``)::

    manifest.json          header (format, version, teacher fingerprint, tokenizer hash, data
                           fingerprint, params hash and params, layout, vocab size, mask id, top_k,
                           num_shards, record_batch_rows; ``rollouts``: the rollout family's
                           bookkeeping and sampler settings, see ``pipeline.cache.rollouts``); once
                           every shard of every family is written also "complete": true and, per
                           family, "shards": {index: {rows, sha256, bytes, ...}} and the totals
    shard-00000.arrow      top-k rows: Arrow IPC *file* format, zstd-compressed buffers, record
    shard-00000.json       batches of ``record_batch_rows`` rows; the .json sidecar (the manifest's
    ...                    shard entry, and ``cache``: the teacher fingerprint, tokenizer hash, data
    rollouts-00000.arrow   fingerprint and params hash it was written for) is written after the
    rollouts-00000.json    shard, so a shard counts as complete only when both exist. Writers use a
    ...                    temporary name and rename, so a killed run never leaves a file that
                           reads as a shard.

Top-k rows: one per (example, sample); L = prompt_length + gen_length, k = top_k:

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
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.cache.shards import FORMAT, TOPK, VERSION, ShardSet, read_manifest
from pipeline.core.errors import CacheError


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

    def counts(self) -> dict[str, int]:
        return {"masked_positions": int(self.num_masked.sum())}

    @classmethod
    def concat(cls, blocks: list["CacheRows"]) -> "CacheRows":
        return cls(*(np.concatenate([getattr(b, f.name) for b in blocks]) for f in dataclasses.fields(cls)))

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


# ---------------------------------------------------------------------- reader


class TeacherCache(Sequence):
    """Map-style view of the top-k rows of a complete cache: ``len(cache)`` rows, ``cache[i]`` a dict
    (see module doc).

    Shards are memory-mapped; a row access decompresses its record batch (kept in a small LRU), so
    for throughput read whole record batches (``num_batches``, ``batch(j)``) in random order rather
    than rows in random order."""

    def __init__(self, directory: str | Path, verify: bool = True):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.schema = cache_schema(self.manifest["layout"]["length"], self.manifest["top_k"])
        self.shards = ShardSet(self.directory, self.manifest, TOPK, self.schema, verify)
        self.batch_index = self.shards.batch_index
        self._decoded = lru_cache(maxsize=8)(self._decode)

    def __len__(self) -> int:
        return self.shards.num_rows

    @property
    def num_batches(self) -> int:
        return self.shards.num_batches

    def record_batch(self, j: int) -> pa.RecordBatch:
        return self.shards.record_batch(j)

    def _decode(self, j: int) -> list[dict]:
        return decode_record_batch(self.record_batch(j))

    def batch(self, j: int) -> list[dict]:
        """Rows of record batch ``j`` (0 <= j < num_batches)."""
        return self._decoded(j)

    def __getitem__(self, i: int) -> dict:
        j, row = self.shards.locate(i)
        return self._decoded(j)[row]


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
