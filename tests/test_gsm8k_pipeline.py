"""The whole pipeline as a real LLaDA user runs it on GSM8K, on stand-ins: a LLaDA checkpoint with a
chat template (``teacher.checkpoint``), a dataset folder shaped like ``openai/gsm8k`` (config
``main``, train and test splits, ``question``/``answer`` with ``#### N``), a prompt template and
system prompt, rows too long dropped, the rollouts cached with the evaluated sampler (blocks), and
the ``gsm8k`` scorer judging the evaluation, validation and the rollout report."""

import json

import torch

from pipeline.data.tasks import ALPHABET
from pipeline.data.tokenizer import MASK, build_char_tokenizer
from pipeline.models.llada import LLaDA
from pipeline.score_cli import main as score_main
from pipeline.student.model import Student
from tests.conftest import tiny_config
from tests.test_data_sources import gsm8k_row
from tests.test_pipeline_dvc import MICRO, merged
from tests.test_stages import run_stage

STAGES = ["prepare_data", "teacher", "cache_teacher", "train_student", "evaluate"]


def instruct_checkpoint(path):
    """A tiny random LLaDA whose tokenizer has a chat template with a system role."""
    tokenizer = build_char_tokenizer(ALPHABET + "#\n <>|QA")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'][0] }}|{{ m['content'] }}>{% endfor %}"
                               "{% if add_generation_prompt %}|{% endif %}")
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids(MASK), max_sequence_length=64)
    LLaDA(config).init_weights(std=0.2, generator=torch.Generator().manual_seed(0)).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


def gsm8k_folder(root):
    root.mkdir()
    for split, numbers in (("train", range(60)), ("test", range(60, 72))):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(gsm8k_row(i)) + "\n" for i in numbers))
    (root / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
                                    "    path: train.jsonl\n  - split: test\n    path: test.jsonl\n---\n")
    return root


def test_a_gsm8k_shaped_dataset_through_every_stage(tmp_path, capsys):
    params = merged(MICRO, {
        "data": {"source": str(gsm8k_folder(tmp_path / "gsm8k")), "hf_config": "main", "prompt_template": "Q {question}",
                 "response_field": "answer", "system_prompt": "A", "too_long": "drop", "prompt_length": 24,
                 "gen_length": 14, "val_fraction": 0.1},
        "teacher": {"checkpoint": str(instruct_checkpoint(tmp_path / "instruct"))},
        "evaluate": {"scorer": "gsm8k", "block_length": 7, "teacher_steps": [2, 14], "student_steps": [2]},
    })
    params["cache"]["rollouts"] = {"per_example": 2, "block_length": 7, "steps": 4}  # the evaluated sampler
    work = tmp_path / "work"
    work.mkdir()
    for stage in STAGES:
        result = run_stage(work, stage, params)
        assert result.returncode == 0, f"{stage}:\n{result.stderr[-3000:]}"

    # The official test split, whole (answers 'i+i\n#### 2i' fit 14 tokens up to i = 99: nothing dropped
    # there); training rows with the system prompt in the chat template.
    counts = json.loads((work / "metrics" / "data.json").read_text())
    assert counts["test"] == {"rows": 12, "dropped_too_long": 0} and counts["train"]["rows"] + counts["val"]["rows"] == 60
    report = json.loads((work / "metrics" / "eval.json").read_text())
    assert report["scorer"] == "gsm8k" and report["prompts"] == 12
    assert set(report["settings"]["teacher_steps2_greedy"]["accuracy"]) == {"gsm8k", "mean"}
    cache = json.loads((work / "metrics" / "cache.json").read_text())
    assert set(cache["rollouts"]["accuracy"]["greedy"]) == {"gsm8k", "mean"}
    assert cache["rollouts"]["sampler"]["block_length"] == 7
    curve = json.loads((work / "metrics" / "student" / "accuracy_curve.json").read_text())
    assert "gsm8k" in curve[-1]
    meta = json.loads((work / "artifacts" / "student" / "student_config.json").read_text())
    assert meta["trained_for"] == {"prompt_length": 24, "gen_length": 14, "block_length": 7}
    assert meta["base"] == params["teacher"]["checkpoint"]
    assert Student.from_pretrained(work / "artifacts" / "student").trained_for["block_length"] == 7

    # Every completion of the evaluation is there with its judgment; a known right answer scores 1.
    lines = [json.loads(line) for line in (work / "metrics" / "eval" / "completions.jsonl").read_text().splitlines()]
    assert len([line for line in lines if line["setting"] == "teacher_steps14_greedy"]) == 12
    first = lines[0]
    assert first["reference"] == "60+60\n#### 120" and first["prompt"] == "Q add:60+60="
    known = tmp_path / "known.jsonl"
    known.write_text(json.dumps({"prompt": first["prompt"], "answer": first["reference"],
                                 "completions": ["60+60 is 120\n#### 120"]}) + "\n")
    capsys.readouterr()
    assert score_main([str(known), "--scorer", "gsm8k"]) == 0
    assert json.loads(capsys.readouterr().out)["gsm8k"]["accuracy"] == 1.0
    judged = [ok for line in lines if line["setting"] == "teacher_steps14_greedy" for ok in line["correct"]]
    accuracy = report["settings"]["teacher_steps14_greedy"]["accuracy"]["gsm8k"]
    assert abs(sum(judged) / len(judged) - accuracy) < 1e-4
