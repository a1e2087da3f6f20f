"""The whole pipeline with a LLaDA-MoE teacher: ``teacher.checkpoint`` points at a checkpoint
directory (config, weights, a ``tokenizers``-built tokenizer), and every stage runs as DVC runs it,
with micro params."""

import json

import pytest

from pipeline.models.llada_moe import LLaDAMoE
from pipeline.student.model import Student
from pipeline.teacher.artifact import TeacherRecord, load_teacher
from tests.conftest import make_moe_checkpoint
from tests.test_pipeline_dvc import MICRO, merged
from tests.test_stages import run_stage

STAGES = ["prepare_data", "teacher", "cache_teacher", "train_student", "evaluate"]


def test_llada_moe_teacher_end_to_end(tmp_path):
    checkpoint = make_moe_checkpoint(tmp_path / "llada_moe")
    params = merged(MICRO, {"teacher": {"checkpoint": str(checkpoint)}})
    work = tmp_path / "work"
    work.mkdir()
    for stage in STAGES:
        result = run_stage(work, stage, params)
        assert result.returncode == 0, f"{stage}:\n{result.stderr[-3000:]}"

    record = TeacherRecord.load(work / "artifacts" / "teacher")
    assert record.architecture == "llada_moe" and record.checkpoint == str(checkpoint)
    teacher, _, _ = load_teacher(work / "artifacts" / "teacher")
    assert isinstance(teacher, LLaDAMoE)
    header = json.loads((work / "artifacts" / "cache" / "manifest.json").read_text())
    assert header["vocab_size"] == teacher.config.vocab_size
    student = Student.from_pretrained(work / "artifacts" / "student")
    assert isinstance(student.base, LLaDAMoE) and student.soft_prompt.prompt_gate.abs().sum() > 0
    summary = json.loads((work / "metrics" / "student" / "summary.json").read_text())
    assert summary["steps"] == MICRO["student"]["max_steps"]
    report = json.loads((work / "metrics" / "eval.json").read_text())
    assert any(name.startswith("student") for name in report["settings"])


@pytest.mark.parametrize("case", ["missing_expert", "mask_outside_vocab"])
def test_bad_llada_moe_teacher_is_one_clear_error(tmp_path, case):
    checkpoint = make_moe_checkpoint(tmp_path / "llada_moe")
    teacher = {"checkpoint": str(checkpoint)}
    if case == "missing_expert":
        from safetensors.torch import load_file, save_file

        weights = load_file(str(checkpoint / "model.safetensors"))
        save_file({k: v for k, v in weights.items() if ".mlp.experts.3." not in k}, str(checkpoint / "model.safetensors"))
        stage, expected = "teacher", "(model.safetensors) lack 3 tensors the config implies"
    else:
        teacher["mask_token_id"] = 500
        stage, expected = "teacher", "mask_token_id 500 is outside the embedding"
    work = tmp_path / "work"
    work.mkdir()
    params = merged(MICRO, {"teacher": teacher})
    for name in STAGES[: STAGES.index(stage) + 1]:
        result = run_stage(work, name, params)
        if name != stage:
            assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and expected in lines[-1] and "Traceback" not in result.stderr, result.stderr
