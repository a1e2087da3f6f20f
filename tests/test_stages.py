"""The prepare_data and teacher stages as DVC runs them: scripts in a working directory holding
params.yaml. Tiny params; the full pretraining is not a test."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.generate_cli import main as generate_main
from pipeline.teacher.artifact import TeacherRecord, load_teacher
from tests.conftest import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"train_per_task": 40, "val_per_task": 3, "test_per_task": 3},
    "teacher": {
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "mlp_hidden_size": 48},
        "train": {"max_steps": 4, "batch_size": 16, "warmup_steps": 1, "max_minutes": 5.0},
    },
}


def run_stage(workdir: Path, name: str, params: dict):
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py")], cwd=workdir,
                          capture_output=True, text=True, timeout=600)


def test_builtin_teacher_is_pretrained_and_usable(tmp_path):
    for stage in ("prepare_data", "teacher"):
        result = run_stage(tmp_path, stage, TINY)
        assert result.returncode == 0, result.stderr[-3000:]
    teacher_dir = tmp_path / "artifacts" / "teacher"
    names = {p.name for p in teacher_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "teacher.json", "generation_config.json"} <= names
    model, tokenizer, record = load_teacher(teacher_dir)
    assert record.builtin and record.checkpoint == "." and model.config.n_kv_heads == 1
    assert model.config.mask_token_id == tokenizer.mask_token_id and len(tokenizer) == model.config.vocab_size
    summary = json.loads((tmp_path / "metrics" / "teacher" / "summary.json").read_text())
    assert summary["steps"] == 4 and set(summary["val_accuracy"]) >= {"add", "sort", "perm", "word", "mean"}
    assert json.loads((tmp_path / "metrics" / "teacher" / "accuracy_curve.json").read_text())[-1]["step"] == 4
    # the teacher directory is a checkpoint the generate CLI takes as is (gen length from its hints)
    out = tmp_path / "out.jsonl"
    code = generate_main(["--model", str(teacher_dir), "--prompts", str(tmp_path / "data" / "prompts" / "test.jsonl"),
                          "--out", str(out), "--steps", "2"])
    assert code == 0 and len(out.read_text().splitlines()) == 12


def test_external_checkpoint_is_recorded_not_copied(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "llada")
    params = {**TINY, "teacher": {"checkpoint": str(checkpoint)}}
    (tmp_path / "work").mkdir()
    for stage in ("prepare_data", "teacher"):
        result = run_stage(tmp_path / "work", stage, params)
        assert result.returncode == 0, result.stderr[-3000:]
    teacher_dir = tmp_path / "work" / "artifacts" / "teacher"
    assert [p.name for p in teacher_dir.iterdir()] == ["teacher.json"]
    record = TeacherRecord.load(teacher_dir)
    assert record.checkpoint == str(checkpoint) and not record.builtin
    model, _, _ = load_teacher(teacher_dir)
    assert model.config.d_model == 32
    # the recorded fingerprint guards against the checkpoint changing underneath
    make_checkpoint(checkpoint, seed=5)
    with pytest.raises(ValueError, match="fingerprint"):
        load_teacher(teacher_dir)


@pytest.mark.parametrize("case", ["unknown_key", "missing_checkpoint", "tokenizer_mismatch"])
def test_stage_errors_are_one_clear_line(tmp_path, case):
    if case == "unknown_key":
        stage, params, expected = "prepare_data", {**TINY, "data": {"gen_lenght": 3}}, "data.gen_lenght: unknown key"
    elif case == "missing_checkpoint":
        stage, params, expected = "prepare_data", {**TINY, "teacher": {"checkpoint": str(tmp_path / "nope")}}, "not found"
    else:
        assert run_stage(tmp_path, "prepare_data", TINY).returncode == 0  # builtin tokenizer
        checkpoint = make_checkpoint(tmp_path / "llada")
        tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, different ids
        (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer))
        stage, params, expected = "teacher", {**TINY, "teacher": {"checkpoint": str(checkpoint)}}, "tokenizer differs"
    result = run_stage(tmp_path, stage, params)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and expected in last
    assert not (tmp_path / "artifacts" / "teacher").exists()


def last_error_line(result) -> str:
    """The stage failed with exit code 2 and one ``error:`` line (no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:")
    return last


def test_a_diverging_teacher_is_refused_not_saved(tmp_path):
    """lr 1e30: the teacher stage used to save NaN weights and exit 0."""
    params = {**TINY, "teacher": {**TINY["teacher"], "train": {**TINY["teacher"]["train"], "lr": 1.0e30}}}
    assert run_stage(tmp_path, "prepare_data", params).returncode == 0
    last = last_error_line(run_stage(tmp_path, "teacher", params))
    assert "teacher.train.lr" in last and "non-finite" in last
    assert not (tmp_path / "artifacts" / "teacher").exists()


def test_a_time_cap_that_binds_fails_the_stage_and_keeps_the_last_teacher(tmp_path):
    """A cap used to stop pretraining early with exit 0, publishing a teacher that depends on the
    machine's load; now the stage fails naming the key and the step, and the last teacher stays."""
    assert run_stage(tmp_path, "prepare_data", TINY).returncode == 0
    assert run_stage(tmp_path, "teacher", TINY).returncode == 0
    before = (tmp_path / "artifacts" / "teacher" / "model.safetensors").read_bytes()
    train = {**TINY["teacher"]["train"], "max_steps": 400, "max_minutes": 1.0e-6}
    last = last_error_line(run_stage(tmp_path, "teacher", {**TINY, "teacher": {**TINY["teacher"], "train": train}}))
    assert "teacher.train.max_minutes" in last and "of 400" in last and "nothing was published" in last
    assert (tmp_path / "artifacts" / "teacher" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_pretraining_exits_non_zero_and_keeps_the_last_teacher(tmp_path, signum):
    """SIGTERM mid-training used to end the stage with exit 0 (Lightning's SystemExit without a code)
    and no teacher; Ctrl-C ended in a traceback. Now: one error line, 128 + the signal, and the
    previous teacher untouched."""
    assert run_stage(tmp_path, "prepare_data", TINY).returncode == 0
    assert run_stage(tmp_path, "teacher", TINY).returncode == 0
    before = (tmp_path / "artifacts" / "teacher" / "model.safetensors").read_bytes()
    params = {**TINY, "teacher": {**TINY["teacher"], "train": {**TINY["teacher"]["train"], "max_steps": 100000}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    process = subprocess.Popen([sys.executable, str(ROOT / "stages" / "teacher.py")], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    loss = tmp_path / "metrics" / "teacher" / "training" / "plots" / "metrics" / "train" / "loss.tsv"
    deadline = time.monotonic() + 120
    while not (loss.is_file() and loss.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)  # until a few training steps are logged
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)  # teardown can be slow on a loaded machine
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by {signal.Signals(signum).name}") and "no artifact was published" in last
    assert (tmp_path / "artifacts" / "teacher" / "model.safetensors").read_bytes() == before


def test_a_batch_larger_than_the_data_is_refused_not_a_zero_step_teacher(tmp_path):
    """A teacher that trained 0 steps used to replace artifacts/teacher (exit 0)."""
    assert run_stage(tmp_path, "prepare_data", TINY).returncode == 0
    train = {**TINY["teacher"]["train"], "batch_size": 100000}
    last = last_error_line(run_stage(tmp_path, "teacher", {**TINY, "teacher": {**TINY["teacher"], "train": train}}))
    assert "teacher.train.batch_size: 100000 is more than the 160 training examples" in last
    assert not (tmp_path / "artifacts" / "teacher").exists()


def test_a_symlink_at_a_metrics_file_is_replaced_not_followed(tmp_path):
    """The stages write their metrics as the artifact writers do (a temporary, then a rename): a link
    someone left at ``metrics/teacher/summary.json`` used to have its target overwritten."""
    outside = tmp_path / "outside.json"
    outside.write_text("keep me\n")
    (tmp_path / "work" / "metrics" / "teacher").mkdir(parents=True)
    (tmp_path / "work" / "metrics" / "teacher" / "summary.json").symlink_to(outside)
    for stage in ("prepare_data", "teacher"):
        assert run_stage(tmp_path / "work", stage, TINY).returncode == 0
    summary = tmp_path / "work" / "metrics" / "teacher" / "summary.json"
    assert not summary.is_symlink() and json.loads(summary.read_text())["steps"] == 4
    assert outside.read_text() == "keep me\n"


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_a_time_cap_must_be_finite_and_positive(tmp_path, value):
    train = {**TINY["teacher"]["train"], "max_minutes": value}
    last = last_error_line(run_stage(tmp_path, "teacher", {**TINY, "teacher": {**TINY["teacher"], "train": train}}))
    assert "teacher.train.max_minutes: must be a finite number" in last


def test_stage_one_refuses_a_teacher_with_non_finite_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from pipeline.models.checkpoint_io import checkpoint_fingerprint
    from tests.conftest import make_workdir

    work = make_workdir(tmp_path, train_per_task=4)
    teacher = work / "artifacts" / "teacher"
    weights = load_file(str(teacher / "model.safetensors"))
    weights["model.transformer.ln_f.weight"][0] = float("nan")
    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    record = TeacherRecord.load(teacher)
    record.fingerprint = checkpoint_fingerprint(teacher)  # recorded as if the teacher stage had saved it
    record.save(teacher)
    last = last_error_line(run_stage(work, "cache_teacher", {"cache": {"rows_per_shard": 64, "rollouts": {"per_example": 0}}}))
    assert "artifacts/teacher" in last and "model.transformer.ln_f.weight is not finite" in last
    assert not (work / "artifacts" / "cache" / "manifest.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "vocab_size_above_the_weights", "header"])
def test_broken_external_checkpoints_are_refused_naming_the_file(tmp_path, damage):
    """A safetensors file cut in half or with a garbled header, or a config whose vocab_size exceeds
    the embedding rows, used to pass the teacher stage (exit 0) and fail later with no file named."""
    checkpoint = make_checkpoint(tmp_path / "llada")
    weights = checkpoint / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = "model.safetensors: "
    elif damage == "header":
        data = bytearray(weights.read_bytes())
        data[8:20] = b"#" * 12
        weights.write_bytes(bytes(data))
        expected = "model.safetensors: unreadable safetensors header"
    else:
        config = json.loads((checkpoint / "config.json").read_text())
        config["vocab_size"] = config["embedding_size"] = config["vocab_size"] + 5
        (checkpoint / "config.json").write_text(json.dumps(config))
        expected = "has shape (43, 32), config.json implies (48, 32)"
    last = last_error_line(run_stage(tmp_path, "teacher", {"teacher": {"checkpoint": str(checkpoint)}}))
    assert expected in last
    assert not (tmp_path / "artifacts" / "teacher").exists()
