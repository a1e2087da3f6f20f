"""The machinery stage one's shard families share: atomic shard writing, the manifest, verified reads.

A cache directory holds one ``manifest.json`` and shard families, each a run of
``{family}-{index:05d}.arrow`` files with ``.json`` sidecars (``shard-*`` the top-k rows of
``pipeline.cache.topk``, ``rollouts-*`` the rollouts of ``pipeline.cache.rollouts``); a sidecar
holds the shard's rows, bytes and sha256 and, under ``cache``, the identity of the cache it was
written for (``HEADER_CHECKS`` and the manifest header's digest), which a rerun checks along with the
shard's checksum. The manifest records the sha256 of its own header (``header_sha256``: everything
stage one wrote before the first shard), and every reader checks it, so an edited manifest (another
sampler, another shard count) is refused rather than read. A family's
bookkeeping (``num_shards``, ``record_batch_rows`` and, once complete, ``shards``) lives in the
manifest's top level for ``shard`` and under the manifest's ``rollouts`` key for ``rollouts``; the
cache is ``complete`` when every shard of every family has its sidecar.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from pipeline.core.errors import CacheError, CheckpointError
from pipeline.core.files import atomic_write_text, file_sha256, remove_stale_temporaries, writing
from pipeline.core.params import differences

FORMAT = "llada-meanflow-teacher-cache"
VERSION = 2
MANIFEST = "manifest.json"
TOPK, ROLLOUTS = "shard", "rollouts"
FAMILIES = (TOPK, ROLLOUTS)


def shard_name(index: int, family: str = TOPK) -> str:
    return f"{family}-{index:05d}.arrow"


def sidecar_name(index: int, family: str = TOPK) -> str:
    return f"{family}-{index:05d}.json"


def write_json_atomic(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class Rows(Protocol):
    """A block of rows a ``ShardWriter`` accepts (``CacheRows``, ``RolloutRows``)."""

    def __len__(self) -> int: ...
    def slice(self, start: int, stop: int) -> "Rows": ...
    def to_record_batch(self, schema: pa.Schema) -> pa.RecordBatch: ...
    def counts(self) -> dict[str, int]: ...
    @classmethod
    def concat(cls, blocks: list) -> "Rows": ...


class ShardWriter:
    """Writes one shard under a temporary name in record batches of ``record_batch_rows`` rows;
    ``close()`` renames it into place and writes its sidecar (rows, bytes, sha256 and the rows'
    ``counts()`` summed). Leaving the ``with`` block by an exception removes the temporary file."""

    def __init__(self, directory: Path, index: int, schema: pa.Schema, record_batch_rows: int, family: str = TOPK):
        self.directory, self.index, self.schema, self.family = Path(directory), index, schema, family
        self.record_batch_rows = record_batch_rows
        self.identity = cache_identity(read_manifest(self.directory))
        self.path = self.directory / shard_name(index, family)
        self.tmp = self.directory / f".{shard_name(index, family)}.tmp-{os.getpid()}"
        try:
            with writing(self.path):
                self.sink = pa.OSFile(str(self.tmp), "wb")
                self.writer = pa.ipc.new_file(self.sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd"))
        except BaseException:
            with contextlib.suppress(OSError):  # a read-only file system refuses even this
                self.tmp.unlink(missing_ok=True)
            raise
        self.pending: list[Rows] = []
        self.pending_rows = 0
        self.rows = 0
        self.counts: dict[str, int] = {}

    def write(self, rows: Rows) -> None:
        self.pending.append(rows)
        self.pending_rows += len(rows)
        while self.pending_rows >= self.record_batch_rows:
            self._flush(self.record_batch_rows)

    def _flush(self, count: int) -> None:
        merged = self.pending[0] if len(self.pending) == 1 else type(self.pending[0]).concat(self.pending)
        written = merged.slice(0, count)
        with writing(self.path):
            self.writer.write_batch(written.to_record_batch(self.schema))
        self.rows += count
        for key, value in written.counts().items():
            self.counts[key] = self.counts.get(key, 0) + int(value)
        rest = merged.slice(count, len(merged))
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)

    def close(self) -> dict:
        if self.pending_rows:
            self._flush(self.pending_rows)
        with writing(self.path):
            self.writer.close()
            self.sink.close()
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
            info = {"rows": self.rows, **self.counts, "bytes": self.tmp.stat().st_size, "sha256": file_sha256(self.tmp)}
            os.replace(self.tmp, self.path)
        write_json_atomic(self.directory / sidecar_name(self.index, self.family), {**info, IDENTITY: self.identity})
        return info

    def abort(self) -> None:
        """Delete the temporary file; errors closing it (a full disk again) do not matter then."""
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(Exception):
            self.sink.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def my_shards(total: int, shard_index: int, num_shards: int, block: int = 1) -> list[int]:
    """The shards of a family process ``shard_index`` of ``num_shards`` fills: those of the blocks of
    ``block`` consecutive shards (computed together) numbered b with b % num_shards == shard_index."""
    return [j for j in range(total) if j // block % num_shards == shard_index]


def pending_shards(directory: Path, total: int, family: str, shard_index: int, num_shards: int,
                   block: int = 1) -> list[int]:
    """This process's shards of ``family`` that have no sidecar yet, or whose bytes no longer match
    their sidecar (damaged: deleted, to be written again); the temporary files a killed run left for
    them (never complete; their writer's process is gone) are deleted. A sidecar written for another cache (other params,
    data or teacher, e.g. under a deleted manifest) is refused."""
    done = completed_shards(directory, total, family)
    identity = cache_identity(read_manifest(directory))
    mine = my_shards(total, shard_index, num_shards, block)
    for index in [j for j in mine if j in done]:
        check_sidecar_identity(Path(directory) / sidecar_name(index, family), done[index], identity)
        if not shard_matches_sidecar(Path(directory) / shard_name(index, family), done[index]):
            print(f"{Path(directory) / shard_name(index, family)}: damaged (size or checksum differs from its "
                  "sidecar); writing it again", file=sys.stderr)
            (Path(directory) / sidecar_name(index, family)).unlink()
            del done[index]
    todo = [j for j in mine if j not in done]
    for index in todo:  # a live writer's (another process on the same shards) are its own: kept
        remove_stale_temporaries(Path(directory) / shard_name(index, family))
    return todo


def shard_matches_sidecar(path: Path, sidecar: dict) -> bool:
    return path.stat().st_size == sidecar.get("bytes") and file_sha256(path) == sidecar.get("sha256")


def check_sidecar_identity(path: Path, sidecar: dict, identity: dict) -> None:
    """Refuse a shard's sidecar that belongs to another cache than the manifest describes."""
    found = sidecar.get(IDENTITY)
    if found is None:
        raise CacheError(f"{path}: written by an older stage one, which recorded no identity; delete "
                         f"{path.parent} and rerun cache_teacher")
    for key in (*HEADER_CHECKS, HEADER_DIGEST):
        if found.get(key) != identity[key]:
            raise CacheError(f"{path}: this shard was written with {key} {found.get(key)}, the manifest has "
                             f"{identity[key]} (another cache's shard); delete {path.parent} and rerun cache_teacher")


def shard_rows(shards: list[int], examples_per_shard: int, num_examples: int, per_example: int) -> int:
    """Rows in ``shards`` when shard j holds examples [j E, (j + 1) E) of ``num_examples``, with
    ``per_example`` rows each."""
    return sum((min((j + 1) * examples_per_shard, num_examples) - j * examples_per_shard) * per_example
               for j in shards)


# ---------------------------------------------------------------------- manifest


def family_entry(manifest: dict, family: str) -> dict | None:
    """The manifest's bookkeeping of one family (None: the cache has no such family)."""
    return manifest if family == TOPK else manifest.get(family)


def read_manifest(directory: Path) -> dict:
    from pipeline.models.checkpoint_io import read_json

    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{path}: not found (not a teacher cache, or stage one never started)")
    try:
        manifest = read_json(path)
    except CheckpointError as err:
        raise CacheError(str(err)) from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    missing = [key for key in HEADER_CHECKS if key not in manifest]
    if missing:
        raise CacheError(f"{path}: damaged (no {', '.join(missing)}); rerun cache_teacher")
    if HEADER_DIGEST not in manifest:
        raise CacheError(f"{path}: written by an older stage one (no {HEADER_DIGEST}); delete {path.parent} and "
                         "rerun cache_teacher")
    for family in FAMILIES:
        entry = family_entry(manifest, family)
        if entry is None:
            continue
        count = entry.get("num_shards") if isinstance(entry, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise CacheError(f"{path}: damaged ({family} num_shards {count!r} is not an integer >= 0); "
                             "rerun cache_teacher")
    if header_digest(manifest) != manifest[HEADER_DIGEST]:
        raise CacheError(f"{path}: edited after stage one wrote it (its header no longer matches its "
                         f"{HEADER_DIGEST}); delete {path.parent} and rerun cache_teacher")
    return manifest


def header_digest(manifest: dict) -> str:
    """sha256 of the manifest's header: the manifest without ``complete``, the digest itself, and what
    ``finalize_manifest`` adds to each family (``shards`` and the totals summed from them, which
    share no name with a header key)."""
    def header_of(entry: dict) -> dict:
        shards = entry.get("shards")
        added = {"shards", *(key for shard in shards.values() for key in shard)} if isinstance(shards, dict) else set()
        return {key: value for key, value in entry.items() if key not in added}

    header = header_of({key: value for key, value in manifest.items() if key not in ("complete", HEADER_DIGEST)})
    for family in FAMILIES:
        if family != TOPK and isinstance(header.get(family), dict):
            header[family] = header_of(header[family])
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


HEADER_CHECKS = ("teacher_fingerprint", "tokenizer_sha256", "data_fingerprint", "params_hash")
HEADER_DIGEST = "header_sha256"
IDENTITY = "cache"
"""The sidecar key holding the ``HEADER_CHECKS`` and ``HEADER_DIGEST`` of the cache its shard was written for."""


def cache_identity(manifest: dict) -> dict:
    """What identifies a cache: teacher, tokenizer, data and params (``HEADER_CHECKS``), and its whole
    header (``HEADER_DIGEST``)."""
    return {key: manifest.get(key) for key in (*HEADER_CHECKS, HEADER_DIGEST)}


def header_mismatch(existing: dict, current: dict) -> str | None:
    """How the cache described by manifest header ``existing`` differs from ``current``: the first
    ``HEADER_CHECKS`` key that differs, with the params keys that do (``cache.top_k: 16 -> 8``)."""
    for key in HEADER_CHECKS:
        if existing.get(key) == current[key]:
            continue
        changed = []
        if key == "params_hash":  # a hash alone does not tell the user which key to look at
            changed = (differences(existing.get("params", {}), current.get("params", {}), "cache")
                       + differences(existing.get("layout", {}), current.get("layout", {}), "layout"))
        detail = f" ({'; '.join(changed)})" if changed else ""
        return f"{key} {existing.get(key)}, the current run has {current[key]}{detail}"
    return None


def ensure_manifest(directory: Path, header: dict, replace_other: bool = False) -> None:
    """Create the manifest header, or check that an existing one describes the same cache (same
    teacher, tokenizer, data and params); refuse with a clear error otherwise, or with
    ``replace_other`` delete the other cache (its manifest, shards and sidecars) and start this one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST
    if path.exists():
        try:
            mismatch = header_mismatch(read_manifest(directory), header)
        except CacheError as err:  # damaged, edited, or written by an older stage one
            if not replace_other:
                raise
            mismatch = str(err)
        if mismatch is None:
            return
        if not replace_other:
            raise CacheError(f"{path}: this cache was built with {mismatch}; delete {directory} or point the "
                             "stage at another directory")
        print(f"{directory}: replacing a cache built with {mismatch}", file=sys.stderr)
        for family in FAMILIES:
            for stale in [*directory.glob(f"{family}-*.arrow"), *directory.glob(f"{family}-*.json"),
                          *directory.glob(f".{family}-*.tmp-*")]:
                stale.unlink(missing_ok=True)
        path.unlink()
    manifest = {"format": FORMAT, "version": VERSION, **header}
    write_json_atomic(path, {**manifest, HEADER_DIGEST: header_digest(manifest), "complete": False})


def completed_shards(directory: Path, num_shards: int, family: str = TOPK) -> dict[int, dict]:
    """Sidecars of the shards written so far (a shard without a readable sidecar is incomplete, and
    written again: a sidecar cut short by a full disk or a crash must not block every rerun). Only the
    sidecar files present are read, so the work is bounded by the files, not by ``num_shards``."""
    done = {}
    prefix, suffix = sidecar_name(0, family).split("00000")
    for sidecar in Path(directory).glob(f"{prefix}*{suffix}"):
        number = sidecar.name[len(prefix):len(sidecar.name) - len(suffix)]
        if not (number.isdigit() and len(number) >= 5 and int(number) < num_shards):
            continue
        index = int(number)
        if sidecar_name(index, family) == sidecar.name and (Path(directory) / shard_name(index, family)).is_file():
            try:
                content = json.loads(sidecar.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(content, dict):
                done[index] = content
    return done


def finalize_manifest(directory: Path) -> bool:
    """Record every shard of every family in the manifest once all exist, with the families' totals
    (rows, bytes, and the sidecars' counts). Idempotent: concurrent workers that finish together
    write identical content. Returns whether the cache is complete."""
    manifest = read_manifest(directory)
    entries = [(family, family_entry(manifest, family)) for family in FAMILIES]
    entries = [(family, entry) for family, entry in entries if entry is not None]
    done = {family: completed_shards(directory, entry["num_shards"], family) for family, entry in entries}
    if any(len(done[family]) < entry["num_shards"] for family, entry in entries):
        return False
    for family, entry in entries:
        shards = {i: {k: v for k, v in sidecar.items() if k != IDENTITY} for i, sidecar in done[family].items()}
        entry["shards"] = {f"{i:05d}": shards[i] for i in sorted(shards)}
        for key in sorted({k for s in shards.values() for k in s} - {"sha256"}):
            entry[key] = sum(s.get(key, 0) for s in shards.values())
    manifest["complete"] = True
    write_json_atomic(Path(directory) / MANIFEST, manifest)
    return True


# ---------------------------------------------------------------------- reading


MAX_OPEN_SHARDS = 64
"""Shards a ``ShardSet`` keeps open (memory-mapped) at once; the least recently read is closed first,
so a cache of any number of shards stays far below the usual limit of 1024 open files."""


class ShardSet:
    """The verified, memory-mapped shards of one family of a complete cache, as a sequence of
    record batches: ``num_batches``, ``record_batch(j)``, ``locate(row) -> (j, row in batch)``.

    Every shard is checked against its manifest entry (present, size, sha256 when ``verify``,
    readable Arrow, ``schema``, record batch count) and refused naming the file. At most
    ``MAX_OPEN_SHARDS`` are open at a time; a closed one is mapped again when it is read."""

    def __init__(self, directory: Path, manifest: dict, family: str, schema: pa.Schema, verify: bool = True):
        self.directory = Path(directory)
        if not manifest.get("complete"):
            totals = [(family_entry(manifest, f), f) for f in FAMILIES]
            done = sum(len(completed_shards(self.directory, e["num_shards"], f)) for e, f in totals if e)
            total = sum(e["num_shards"] for e, _ in totals if e)
            raise CacheError(f"{self.directory}: incomplete cache ({done} of {total} shards)")
        entry = family_entry(manifest, family)
        if entry is None:
            raise CacheError(f"{self.directory / MANIFEST}: the cache has no {family} shards")
        self.paths: list[Path] = []
        self.open_readers: OrderedDict[int, pa.ipc.RecordBatchFileReader] = OrderedDict()  # shard -> reader, LRU
        self.batch_index: list[tuple[int, int, int]] = []  # (shard, batch, rows)
        per_batch = entry["record_batch_rows"]
        for index in range(entry["num_shards"]):
            path = self.directory / shard_name(index, family)
            shard = entry["shards"].get(f"{index:05d}")
            if shard is None:
                raise CacheError(f"{self.directory / MANIFEST}: no entry for {path.name} (a damaged manifest); "
                                 "rerun cache_teacher")
            if not path.is_file():
                raise CacheError(f"{path}: missing shard")
            if path.stat().st_size != shard["bytes"]:
                raise CacheError(f"{path}: size {path.stat().st_size} != {shard['bytes']} recorded (truncated?)")
            if verify and file_sha256(path) != shard["sha256"]:
                raise CacheError(f"{path}: checksum mismatch (the shard is damaged)")
            self.paths.append(path)
            try:
                reader = self.reader(index)
            except (pa.ArrowInvalid, OSError) as err:
                raise CacheError(f"{path}: not a readable Arrow file ({err})") from err
            if not reader.schema.equals(schema, check_metadata=False):
                raise CacheError(f"{path}: schema differs from the manifest's")
            # Writers emit full record batches of ``record_batch_rows`` and one shorter last one.
            expected = -(-shard["rows"] // per_batch)
            if reader.num_record_batches != expected:
                raise CacheError(f"{path}: {reader.num_record_batches} record batches, expected {expected}")
            for b in range(expected):
                self.batch_index.append((index, b, min(per_batch, shard["rows"] - b * per_batch)))
        self.starts = np.cumsum([0] + [n for _, _, n in self.batch_index])

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    @property
    def num_batches(self) -> int:
        return len(self.batch_index)

    def reader(self, shard: int) -> pa.ipc.RecordBatchFileReader:
        """Shard ``shard``'s reader, mapping the file again if it was closed."""
        reader = self.open_readers.pop(shard, None)
        if reader is None:
            reader = pa.ipc.open_file(pa.memory_map(str(self.paths[shard]), "r"))
        self.open_readers[shard] = reader
        while len(self.open_readers) > MAX_OPEN_SHARDS:
            self.open_readers.popitem(last=False)  # its batches still in use keep their own mapping
        return reader

    def record_batch(self, j: int) -> pa.RecordBatch:
        shard, b, _ = self.batch_index[j]
        return self.reader(shard).get_batch(b)

    def locate(self, i: int) -> tuple[int, int]:
        """(record batch, row within it) of row ``i`` (negative counts from the end)."""
        if not -self.num_rows <= i < self.num_rows:
            raise IndexError(i)
        i %= self.num_rows
        j = int(np.searchsorted(self.starts, i, side="right") - 1)
        return j, i - int(self.starts[j])
