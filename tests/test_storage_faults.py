"""A full disk, a file-size limit or a read-only output: one ``error:`` line naming the path, exit 2,
nothing half written, and a rerun with room gives the artifact an uninterrupted run gives.

The stages run as subprocesses under ``RLIMIT_FSIZE`` (the kernel answers a write past the limit
with EFBIG, as a full disk answers ENOSPC): no root, no mounts, the same on any machine.
"""

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import OutputError
from pipeline.core.files import atomic_write_text, require_writable, storage_errno, writing
from tests.conftest import make_workdir

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"train_per_task": 40, "val_per_task": 3, "test_per_task": 3},
    "teacher": {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "mlp_hidden_size": 48},
                "train": {"max_steps": 2, "batch_size": 16, "warmup_steps": 1}},
    "cache": {"samples_per_example": 1, "top_k": 6, "rows_per_shard": 32, "record_batch_rows": 16,
              "rollouts": {"per_example": 0}},
    "student": {"soft_prompt": {"prompt_length": 2, "hidden_size": 8, "latent_dim": 0}, "batch_size": 8,
                "max_steps": 2, "eval_every": 1, "warmup_steps": 1, "meanflow_weight": 1.0, "rollout_weight": 0.0},
}
LIMIT = 8 * 1024
"""Bytes a file may grow to: above every metrics file, below every artifact's largest file."""


def file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal's core dump
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run(workdir: Path, stage: str, *args: str, limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args], cwd=workdir,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=file_size_limit(limit) if limit else None)


def refused_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*tmp-*"))


def test_storage_errors_are_recognized_from_python_pyarrow_and_safetensors():
    assert storage_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert storage_errno(OSError(errno.EROFS, "Read-only file system")) == errno.EROFS
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert storage_errno(rust) == errno.ENOSPC
    assert storage_errno(FileNotFoundError(errno.ENOENT, "missing")) is None  # a bug or a missing input
    assert storage_errno(ValueError("os error 28 is not in parentheses")) is None


def test_writing_names_the_path_or_the_file_the_error_names(tmp_path):
    with pytest.raises(OutputError, match=r"^out/dir: cannot write \(No space left on device\)"):
        with writing("out/dir"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OutputError, match=r"^out/dir/f.json: cannot write \(File too large\)"):
        with writing("out/dir"):
            raise OSError(errno.EFBIG, "File too large", "out/dir/f.json")
    with pytest.raises(KeyError):  # not a storage failure: left as it is
        with writing("out/dir"):
            raise KeyError("x")


def test_an_output_under_a_file_or_in_a_read_only_directory_is_refused_up_front(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputError, match="a_file is not a directory"):
        require_writable(tmp_path / "a_file" / "teacher")
    require_writable(tmp_path / "new" / "deeper" / "student", tmp_path)  # creatable: fine
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(OutputError, match=r"metrics: cannot write \((Permission denied|Read-only file system)\)"):
        require_writable(tmp_path / "metrics")


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    code = ("import sys; from pipeline.core.files import atomic_write_text; "
            f"atomic_write_text({str(target)!r}, 'x' * {4 * LIMIT})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            preexec_fn=file_size_limit(LIMIT))
    assert "OutputError" in result.stderr and f"{target}: cannot write (File too large)" in result.stderr
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_prepare_data_and_teacher_under_a_full_disk(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    line = refused_line(run(tmp_path, "prepare_data", limit=LIMIT))
    assert line.startswith("error: data") and "cannot write (File too large)" in line
    assert not (tmp_path / "data").exists() and leftovers(tmp_path) == []
    assert run(tmp_path, "prepare_data").returncode == 0
    line = refused_line(run(tmp_path, "teacher", limit=LIMIT))
    assert line.startswith("error: artifacts/teacher") and "cannot write (File too large)" in line
    assert not (tmp_path / "artifacts" / "teacher").exists() and leftovers(tmp_path) == []
    line = refused_line(run(tmp_path, "teacher", "--out", "data/layout.json/teacher"))
    assert line == "error: data/layout.json/teacher: cannot be created (data/layout.json is not a directory)"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """data/, a random teacher and a stage-one cache built without limits."""
    work = make_workdir(tmp_path_factory.mktemp("storage"), train_per_task=8)
    (work / "params.yaml").write_text(yaml.safe_dump(TINY))
    assert run(work, "cache_teacher").returncode == 0
    return work


def test_stage_one_under_a_full_disk_resumes_to_the_uninterrupted_cache(workdir, tmp_path):
    cut = ["--out", str(tmp_path / "cache"), "--metrics", str(tmp_path / "cache.json")]
    line = refused_line(run(workdir, "cache_teacher", *cut, limit=4 * 1024))
    assert line.startswith(f"error: {tmp_path / 'cache'}/shard-") and "cannot write (File too large)" in line
    assert leftovers(tmp_path) == [] and not (tmp_path / "cache.json").exists()
    assert run(workdir, "cache_teacher", *cut).returncode == 0
    clean = workdir / "artifacts" / "cache"
    files = sorted(p.name for p in clean.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "cache").iterdir())
    for name in files:
        assert (tmp_path / "cache" / name).read_bytes() == (clean / name).read_bytes(), name


def test_train_student_under_a_full_disk_keeps_no_partial_checkpoint(workdir, tmp_path):
    paths = ["--out", str(tmp_path / "s"), "--metrics", str(tmp_path / "m"), "--checkpoints", str(tmp_path / "ckpt")]
    line = refused_line(run(workdir, "train_student", *paths, limit=LIMIT))
    assert line.startswith(f"error: {tmp_path / 'ckpt'}") and "cannot write (File too large)" in line
    assert not (tmp_path / "s").exists() and leftovers(tmp_path) == [] and not list((tmp_path / "ckpt").rglob("*.ckpt"))
    resumed = run(workdir, "train_student", *paths, "--resume")
    assert resumed.returncode == 0 and (tmp_path / "s" / "soft_prompt.safetensors").is_file(), resumed.stderr[-3000:]


def test_the_generate_cli_under_a_full_disk(tmp_path):
    """The output used to end in an ENOSPC traceback after generating everything."""
    from tests.conftest import make_checkpoint

    model = make_checkpoint(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "word:{i}"}}\n' for i in range(400)))
    out = tmp_path / "out" / "completions.jsonl"
    result = subprocess.run([sys.executable, "-m", "pipeline.generate_cli", "--model", str(model), "--prompts",
                             str(prompts), "--out", str(out), "--gen-length", "4", "--steps", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=file_size_limit(LIMIT))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (f"error: {out}: cannot write (File too large); nothing was "
                                                      "published there: free space or choose a writable path, then rerun")
    assert not out.exists() and leftovers(tmp_path) == []
