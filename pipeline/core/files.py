"""File helpers every module shares: a file's sha256, writes that are never seen half done, and a full
disk or a read-only output reported as one line naming the path."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import OutputError

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
"""Write failures that the machine causes (full disk or quota, file size limit, read-only file system, no
permission), not the code: reported as one line naming the path."""


def storage_errno(err: BaseException) -> int | None:
    """The storage errno behind ``err``: an ``OSError``'s (Python, pyarrow), or the ``os error N`` that
    safetensors' Rust writer puts in its message; None for anything else."""
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found and int(found.group(1)) in STORAGE_ERRNOS:
        return int(found.group(1))
    return None


def output_error(path: str | Path, code: int) -> OutputError:
    return OutputError(f"{path}: cannot write ({os.strerror(code)}); nothing was published there: free space or "
                       "choose a writable path, then rerun")


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a storage failure while writing ``path`` (``STORAGE_ERRNOS``) into an ``OutputError`` naming
    the file the error names, else ``path``."""
    try:
        yield
    except Exception as err:
        code = storage_errno(err)
        if code is None:
            raise
        named = getattr(err, "filename", None)  # the file the error names, unless it is a temporary of ours
        raise output_error(named if named and ".tmp-" not in Path(named).name else path, code) from err


def require_writable(*paths: str | Path) -> None:
    """Refuse an output that cannot be written before any work (a stage can train for hours first).
    Each path (an artifact written by a rename in its parent, or a directory written into) needs its
    nearest existing ancestor to be a writable directory, and itself to be writable if it exists."""
    for path in map(Path, paths):
        ancestor = next((p for p in path.parents if p.exists()), Path("."))
        if not ancestor.is_dir():
            raise OutputError(f"{path}: cannot be created ({ancestor} is not a directory)")
        for target in (ancestor, path):  # a file is replaced by a rename: its directory is what must be writable
            if target.is_dir() and not os.access(target, os.W_OK):
                raise output_error(path, errno.EROFS if read_only(target) else errno.EACCES)


def read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename it over ``path``: readers see the old file
    or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            tmp.write_bytes(data)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only file system refuses even this; the error above is the one
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, data) -> None:
    """``data`` as indented JSON, written atomically (a symlink at ``path`` is replaced, not followed)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary siblings ``.{name}.tmp-{pid}-*`` and ``.{name}.old-{pid}`` that a killed
    writer of ``path`` left (its process is gone; a name without a pid is from an older version)."""
    for stale in path.parent.glob(f".{path.name}.*"):
        kind, _, rest = stale.name[len(path.name) + 2:].partition("-")
        if kind not in ("tmp", "old"):
            continue
        pid = rest.split("-")[0]
        if not (pid.isdigit() and process_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename, on failure
    it is removed, so a killed writer never leaves something that reads as complete (and what a
    killed writer did leave, the next one deletes)."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        try:
            yield tmp
            if path.exists():
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
        except BaseException:
            if old.exists() and not path.exists():  # moved aside, never replaced: put it back
                old.rename(path)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
