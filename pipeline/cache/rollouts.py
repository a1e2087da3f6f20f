"""The teacher's own rollouts, cached beside the top-k rows (stage one).

This format is a user-facing contract, like ``pipeline.cache.topk`` (whose directory layout it
shares): shards ``rollouts-00000.arrow`` (Arrow IPC file format, zstd) with ``.json`` sidecars, and
the manifest's ``rollouts`` entry::

    num_shards, record_batch_rows   the family's bookkeeping (``pipeline.cache.shards``)
    examples, per_example           rollouts of the first ``examples`` training rows, per_example each
    sampler                         steps, gen_length, block_length, remasking, cfg_scale,
                                    temperature, noise, num_fields, greedy_first, mask_token_id
    top_k                           reveal-step log-probs kept per position (0: none stored)
    shards, rows, bytes             once complete

Shard j holds examples ``[j * E, (j + 1) * E)``, E = max(1, rollouts_per_shard // per_example),
example-major: ``per_example`` rows per example, rollout 0 greedy when ``greedy_first``. One row per
rollout; G = gen_length, Lp = prompt_length, k = top_k:

    example_index         int64                     row of the training split
    rollout_index         int32                     0 .. per_example - 1
    temperature           float32                   0 for a greedy rollout
    seed                  uint64                    the rollout's noise seed (see below)
    field                 int32                     noise ``shared``: the Gumbel field's index; else -1
    prompt_ids            fixed_size_list<int32>[Lp]  the prompt, left padded
    prompt_mask           fixed_size_list<int8>[Lp]   0 on the left padding
    tokens                fixed_size_list<int32>[G]   the final answer tokens
    reveal_step           fixed_size_list<int16>[G]   the step (0-based, over all blocks) that
                                                      committed each answer position
    reveal_topk_ids       fixed_size_list<fixed_size_list<int32>[k]>[G]    only when k > 0: the
    reveal_topk_logprobs  fixed_size_list<fixed_size_list<float16>[k]>[G]  teacher's top-k
                          log-softmax (full vocabulary, guided when cfg_scale > 0) at each
                          position's reveal step, descending

The sampler never re-masks a committed token, so the state after step k (k = 0 .. steps) is the
prompt plus the answer positions with ``reveal_step < k``, the rest masked (``state_after``).

Noise. A rollout's randomness is a pure function of its ``seed`` (``pipeline.core.counter_random``): the
Gumbel uniform of answer position p and token id v at step s is ``counter_uniform(seed, s, p, v)``
(``per_step``), or ``counter_uniform(seed, p, v)`` at every step (``fixed`` and ``shared``: one field,
never stored, regenerable on any device). Seeds: ``counter_hash(cache.seed, 1, example, rollout)``;
with ``shared`` the seed of field f, ``counter_hash(cache.seed, 2, f)``, field f = the sampled
rollout's number (greedy ones not counted) modulo ``num_fields``, so every prompt sees the fields in
the same order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.cache.shards import FORMAT, ROLLOUTS, VERSION, ShardSet, family_entry, read_manifest
from pipeline.core.errors import CacheError


def rollout_schema(prompt_length: int, gen_length: int, top_k: int) -> pa.Schema:
    fields = [
        ("example_index", pa.int64()),
        ("rollout_index", pa.int32()),
        ("temperature", pa.float32()),
        ("seed", pa.uint64()),
        ("field", pa.int32()),
        ("prompt_ids", pa.list_(pa.int32(), prompt_length)),
        ("prompt_mask", pa.list_(pa.int8(), prompt_length)),
        ("tokens", pa.list_(pa.int32(), gen_length)),
        ("reveal_step", pa.list_(pa.int16(), gen_length)),
    ]
    if top_k:
        fields += [("reveal_topk_ids", pa.list_(pa.list_(pa.int32(), top_k), gen_length)),
                   ("reveal_topk_logprobs", pa.list_(pa.list_(pa.float16(), top_k), gen_length))]
    return pa.schema(fields, metadata={"format": FORMAT, "version": str(VERSION)})


@dataclasses.dataclass
class RolloutRows:
    """A block of N rollouts as numpy arrays (see the module doc for the columns)."""

    example_index: np.ndarray  # (N,) int64
    rollout_index: np.ndarray  # (N,) int32
    temperature: np.ndarray  # (N,) float32
    seed: np.ndarray  # (N,) uint64
    field: np.ndarray  # (N,) int32
    prompt_ids: np.ndarray  # (N, Lp) int32
    prompt_mask: np.ndarray  # (N, Lp) int8
    tokens: np.ndarray  # (N, G) int32
    reveal_step: np.ndarray  # (N, G) int16
    reveal_topk_ids: np.ndarray | None = None  # (N, G, k) int32
    reveal_topk_logprobs: np.ndarray | None = None  # (N, G, k) float16

    def __len__(self) -> int:
        return len(self.example_index)

    def counts(self) -> dict[str, int]:
        return {}

    def _map(self, fn) -> "RolloutRows":
        return RolloutRows(*(None if getattr(self, f.name) is None else fn(f.name) for f in dataclasses.fields(self)))

    def slice(self, start: int, stop: int) -> "RolloutRows":
        return self._map(lambda name: getattr(self, name)[start:stop])

    def take(self, index: np.ndarray) -> "RolloutRows":
        return self._map(lambda name: getattr(self, name)[index])

    @classmethod
    def concat(cls, blocks: list["RolloutRows"]) -> "RolloutRows":
        return blocks[0]._map(lambda name: np.concatenate([getattr(b, name) for b in blocks]))

    def to_record_batch(self, schema: pa.Schema) -> pa.RecordBatch:
        def fixed(values: np.ndarray, dtype) -> pa.FixedSizeListArray:
            array = pa.array(values.reshape(-1).astype(dtype))
            for size in reversed(values.shape[1:]):
                array = pa.FixedSizeListArray.from_arrays(array, size)
            return array

        columns = [
            pa.array(self.example_index, pa.int64()),
            pa.array(self.rollout_index, pa.int32()),
            pa.array(self.temperature, pa.float32()),
            pa.array(self.seed, pa.uint64()),
            pa.array(self.field, pa.int32()),
            fixed(self.prompt_ids, np.int32),
            fixed(self.prompt_mask, np.int8),
            fixed(self.tokens, np.int32),
            fixed(self.reveal_step, np.int16),
        ]
        if "reveal_topk_ids" in schema.names:
            columns += [fixed(self.reveal_topk_ids, np.int32), fixed(self.reveal_topk_logprobs, np.float16)]
        return pa.RecordBatch.from_arrays(columns, schema=schema)


def rollout_arrays(batch: pa.RecordBatch) -> RolloutRows:
    """A (possibly sliced) record batch of rollouts as ``RolloutRows``."""
    n = batch.num_rows

    def column(name: str) -> np.ndarray | None:
        if name not in batch.schema.names:
            return None
        array, shape = batch.column(name), [n]
        while pa.types.is_fixed_size_list(array.type):
            shape.append(array.type.list_size)
            array = array.flatten()  # respects slicing, unlike .values
        return array.to_numpy(zero_copy_only=False).reshape(shape)

    return RolloutRows(*(column(f.name) for f in dataclasses.fields(RolloutRows)))


def state_after(prompt_ids: np.ndarray, tokens: np.ndarray, reveal_step: np.ndarray, k: int, mask_id: int):
    """The sampler's state after ``k`` steps, (..., Lp + G): the prompt, then the answer tokens
    committed in steps 0 .. k-1 (``reveal_step < k``), the mask id elsewhere. k = 0 is the fully
    masked start, k = steps the final sequence."""
    answer = np.where(reveal_step < k, tokens, mask_id)
    return np.concatenate([prompt_ids, answer.astype(prompt_ids.dtype)], axis=-1)


class RolloutCache:
    """The rollouts of a complete cache: ``len()`` rollouts, ``[i]`` one as a dict, ``batch(j)``
    record batch j as ``RolloutRows`` (the unit of decompression; read these for throughput)."""

    def __init__(self, directory: str | Path, verify: bool = True):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        entry = family_entry(self.manifest, ROLLOUTS)
        if entry is None:
            raise CacheError(f"{self.directory}: the cache has no rollouts (cache.rollouts.per_example was 0)")
        self.entry = entry
        self.sampler = entry["sampler"]
        layout = self.manifest["layout"]
        self.schema = rollout_schema(layout["prompt_length"], layout["gen_length"], entry["top_k"])
        self.shards = ShardSet(self.directory, self.manifest, ROLLOUTS, self.schema, verify)

    def __len__(self) -> int:
        return self.shards.num_rows

    @property
    def num_batches(self) -> int:
        return self.shards.num_batches

    def batch(self, j: int) -> RolloutRows:
        return rollout_arrays(self.shards.record_batch(j))

    def __getitem__(self, i: int) -> dict:
        j, row = self.shards.locate(i)
        rows = rollout_arrays(self.shards.record_batch(j).slice(row, 1))
        return {f.name: (None if v is None else (v[0].item() if v.ndim == 1 else v[0]))
                for f in dataclasses.fields(rows) for v in [getattr(rows, f.name)]}

    def state_after(self, rollout: dict, k: int) -> np.ndarray:
        """``state_after`` for one rollout (a ``self[i]`` dict), with the cache's mask id."""
        return state_after(rollout["prompt_ids"], rollout["tokens"], rollout["reveal_step"], k,
                           self.manifest["mask_token_id"])


def open_rollouts(directory: str | Path, verify: bool = True) -> RolloutCache:
    """The rollouts of a complete cache; ``verify`` checks every rollout shard's sha256."""
    return RolloutCache(directory, verify=verify)


def rollout_statistics(directory: str | Path) -> dict:
    """Size accounting of the rollouts of a complete cache."""
    manifest = read_manifest(Path(directory))
    entry = family_entry(manifest, ROLLOUTS)
    if not manifest.get("complete") or entry is None:
        raise CacheError(f"{directory}: incomplete cache, or one without rollouts")
    layout, k = manifest["layout"], entry["top_k"]
    raw = 8 + 4 + 4 + 8 + 4 + layout["prompt_length"] * 5 + layout["gen_length"] * (4 + 2 + k * 6)
    return {
        "rollouts": entry["rows"],
        "examples": entry["examples"],
        "per_example": entry["per_example"],
        "bytes_on_disk": entry["bytes"],
        "bytes_per_rollout_disk": round(entry["bytes"] / max(entry["rows"], 1), 2),
        "bytes_per_rollout_raw": raw,
        "sampler": entry["sampler"],
    }
