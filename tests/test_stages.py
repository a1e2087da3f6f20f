"""The prepare_data and teacher stages as DVC runs them: scripts in a working directory holding
params.yaml. Tiny params; the full pretraining is not a test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.generate_cli import main as generate_main
from pipeline.teacher import TeacherRecord, load_teacher
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
