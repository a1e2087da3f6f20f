"""A student training run's identity, and the checks that keep one run from training on, resuming or
publishing what belongs to another.

A run is identified by what determines its result: the ``student`` params (less the speed-only
keys), the cache it trains on (teacher fingerprint, the cache's params hash and data fingerprint)
and the code. Its Lightning checkpoints live in ``checkpoints/student/<run hash>/`` and record the
identity, so a rerun (``dvc repro`` after a preemption, say) continues this run from its
``last.ckpt``, and an explicit checkpoint of another run is refused, naming the keys that differ. Everything here runs before training touches an output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pickle
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from pipeline.cache.params import CacheParams
from pipeline.core.errors import CacheError, CheckpointError
from pipeline.core.files import writing
from pipeline.core.params import differences, params_hash
from pipeline.data.layout import Layout, split_fingerprint
from pipeline.student.params import StudentParams

RUN_KEY = "run_identity"
"""The key of a Lightning checkpoint holding the identity of the run that wrote it."""
SPEED_ONLY = ("max_minutes", "num_workers", "eval_every", "logger", "log_every_n_steps")
"""``student`` keys that change how fast or how often things happen, not the trained weights."""
LAST = "last.ckpt"


class Resume:
    """``--resume`` without a path (the stage's default): this run's last checkpoint when there is one."""


def run_identity(params: StudentParams, manifest: dict) -> dict:
    """What determines a run's result: the student params, the cache (``manifest``) it trains on, and
    the code that trains it."""
    student = {k: v for k, v in dataclasses.asdict(params).items() if k not in SPEED_ONLY}
    return {"student": student, "teacher_fingerprint": manifest["teacher_fingerprint"],
            "cache_params_hash": manifest["params_hash"], "cache_data_fingerprint": manifest["data_fingerprint"],
            "code": code_fingerprint()}


def code_fingerprint() -> str:
    """sha256 of the ``pipeline`` package's sources: a run continued by other code would be neither
    run, so resuming is only ever into the code that wrote the checkpoint."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_directory(root: Path, identity: dict) -> Path:
    """This run's checkpoint directory: ``root/<hash of its identity>``."""
    return Path(root) / params_hash(identity)


def check_cache_is_current(cache_dir: Path, manifest: dict, params: CacheParams, layout: Layout, data_dir: Path) -> None:
    """Refuse a cache that stage one built with other ``cache`` params, layout or training data than
    the current ones (a changed params.yaml or ``data/`` without a rerun of cache_teacher), naming
    what differs."""
    changed = differences(manifest.get("params", {}), params.content(), "cache") + differences(
        manifest.get("layout", {}), {**dataclasses.asdict(layout), "length": layout.length}, "layout")
    if changed:
        raise CacheError(f"{cache_dir}: built with other params than params.yaml ({'; '.join(changed)}); "
                         "rerun cache_teacher")
    found = split_fingerprint(Path(data_dir) / "train")
    if manifest.get("data_fingerprint") != found:
        raise CacheError(f"{cache_dir}: built from other training data (fingerprint {manifest.get('data_fingerprint')}) "
                         f"than {Path(data_dir) / 'train'} ({found}); rerun cache_teacher")


def resume_checkpoint(resume: Path | type[Resume] | None, run_dir: Path, identity: dict) -> Path | None:
    """The checkpoint to continue from: ``Resume``, this run's last one (None when it has none yet);
    a path, that checkpoint. Either is read first, and refused unless it loads (a truncated file,
    say after a full disk) and was written by a run with this identity."""
    if resume is None:
        return None
    if resume is Resume:
        path = run_dir / LAST
        if not path.is_file():
            return None
        fresh = f"; --fresh trains this run afresh (or delete {run_dir})"
    else:
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: file not found (without a path, --resume continues this "
                                  f"run's {run_dir / LAST})")
        fresh = ""
    try:  # tensors and plain data only: unpickling anything else would run code the file names
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"--resume {path}: holds objects other than tensors and plain data, which loading "
                              f"would run as code; refused (train_student's checkpoints hold none)") from err
    except Exception as err:  # a truncated or foreign file
        raise CheckpointError(f"--resume {path}: not a readable Lightning checkpoint ({err}){fresh}") from err
    found = checkpoint.get(RUN_KEY) if isinstance(checkpoint, dict) else None
    if found is None:
        raise CheckpointError(f"--resume {path}: records no run identity (not written by this version of "
                              "train_student); train afresh with --fresh")
    changed = differences(found, identity, "")
    if changed:
        raise CheckpointError(f"--resume {path}: written by another run ({'; '.join(changed[:5])}); resume "
                              f"with the params it was trained with, or train afresh")
    return path


class WriteErrors:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write, which torch reports only
    as a ``RuntimeError`` without the errno."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as err:
            self.error = err
            raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary sibling, synced, then renamed over their name: a full disk
    or a kill leaves the previous checkpoint, never a truncated file under the final name."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with writing(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                with tmp.open("wb") as file:
                    sink = WriteErrors(file)
                    try:
                        torch.save(checkpoint, sink)
                    except RuntimeError:  # torch's zip writer hides a full disk as "unexpected pos"
                        if sink.error is not None:
                            raise sink.error
                        raise
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a read-only file system refuses even this
                tmp.unlink(missing_ok=True)
            raise


def clear_run_directory(run_dir: Path) -> None:
    """A fresh run replaces the checkpoints an earlier run with the same identity left."""
    for stale in Path(run_dir).glob("*.ckpt"):
        stale.unlink(missing_ok=True)


class RecordRunIdentity(L.Callback):
    """Writes the run's identity into every checkpoint, for ``resume_checkpoint`` to check."""

    def __init__(self, identity: dict):
        self.identity = identity

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[RUN_KEY] = self.identity
