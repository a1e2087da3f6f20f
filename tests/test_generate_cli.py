"""``python -m pipeline.generate_cli`` end to end on tiny checkpoints with a char tokenizer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.generate_cli import main
from pipeline.models.llada import LLaDA
from pipeline.student.model import Student
from tests.conftest import ALPHABET

ROOT = Path(__file__).resolve().parents[1]


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.generate_cli", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def read_completions(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_teacher_multi_step(tiny_checkpoint, tmp_path):
    prompts = ["add:1+2=", "sort:cba", "word:3"]
    out = tmp_path / "out.jsonl"
    result = run_cli("--model", tiny_checkpoint, "--prompts", write_prompts(tmp_path / "in.jsonl", prompts),
                     "--out", out, "--gen-length", 8, "--block-length", 4, "--steps", 4,
                     "--temperature", 1.0, "--samples", 3, "--seed", 1, "--batch-size", 4)
    assert result.returncode == 0, result.stderr
    records = read_completions(out)
    assert [r["prompt"] for r in records] == prompts
    for r in records:
        assert len(r["completions"]) == 3
        assert all(len(c) <= 8 and set(c) <= set(ALPHABET) for c in r["completions"])


def test_output_is_written_by_chunks_of_input_order_and_appears_whole(tiny_checkpoint, tmp_path, monkeypatch):
    """The output used to be held until the end (100k prompts: nothing written for minutes). Chunks of
    the input are appended to a temporary as they finish, renamed to --out at the end; greedy output
    is the same whatever the chunking, and a failure leaves neither --out nor the temporary."""
    import pipeline.generate_cli as cli

    prompts = write_prompts(tmp_path / "in.jsonl", ["add:1+2=", "sort:cba", "word:3", "perm:abc", "add:12+9=",
                                                     "sort:zyx", "word:1"])
    options = ["--model", str(tiny_checkpoint), "--prompts", str(prompts), "--gen-length", "6", "--steps", "3",
               "--samples", "2", "--batch-size", "3"]
    assert main([*options, "--out", str(tmp_path / "whole.jsonl")]) == 0
    monkeypatch.setattr(cli, "CHUNK_BATCHES", 1)  # 1 prompt (3 // 2 completions) per chunk
    assert main([*options, "--out", str(tmp_path / "chunked.jsonl")]) == 0
    assert read_completions(tmp_path / "chunked.jsonl") == read_completions(tmp_path / "whole.jsonl")
    calls, real = [], cli.generate

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            assert list(tmp_path.glob(".failed.jsonl.tmp-*"))[0].read_text().count("\n") == 2  # two chunks so far
            raise RuntimeError("the device went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "generate", failing)
    with pytest.raises(RuntimeError, match="went away"):
        main([*options, "--out", str(tmp_path / "failed.jsonl")])
    assert not (tmp_path / "failed.jsonl").exists() and not list(tmp_path.glob(".failed.jsonl.tmp-*"))


def test_student_one_step_and_reproducible(tiny_checkpoint, tmp_path):
    Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2).save_pretrained(tmp_path / "student")
    prompts = write_prompts(tmp_path / "in.jsonl", ["perm:abcde", "word:1"])
    outputs = []
    for name in ("a", "b"):
        assert main(["--model", str(tmp_path / "student"), "--prompts", str(prompts),
                     "--out", str(tmp_path / f"{name}.jsonl"), "--gen-length", "6", "--samples", "2"]) == 0
        outputs.append(read_completions(tmp_path / f"{name}.jsonl"))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2
    # an untrained student (zero gate) is exactly the teacher decoding in one step
    assert main(["--model", str(tiny_checkpoint), "--prompts", str(prompts), "--out", str(tmp_path / "t.jsonl"),
                 "--gen-length", "6", "--samples", "2", "--steps", "1"]) == 0
    assert read_completions(tmp_path / "t.jsonl") == outputs[0]
    # --steps on a student: n steps, each at its own interval; untrained, the teacher at n steps
    for name, model in (("s3", tmp_path / "student"), ("t3", tiny_checkpoint)):
        assert main(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / f"{name}.jsonl"),
                     "--gen-length", "6", "--steps", "3"]) == 0
    assert read_completions(tmp_path / "s3.jsonl") == read_completions(tmp_path / "t3.jsonl")


def test_latent_student_draws_one_latent_per_completion(tiny_checkpoint, tmp_path):
    """--samples 4 decodes four latents (one z per completion from --seed, independent of the batch);
    the same --seed gives the same latents, another seed others."""
    student = Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2, latent_dim=4)
    with torch.no_grad():
        student.soft_prompt.prompt_gate.fill_(5.0)
        for p in student.soft_prompt.prompt_mlp.parameters():
            p.normal_(std=3.0, generator=torch.Generator().manual_seed(0))
    student.save_pretrained(tmp_path / "student")
    prompts = write_prompts(tmp_path / "in.jsonl", ["perm:abcde", "word:1", "sort:dcba"])

    def complete(name, *options):
        assert main(["--model", str(tmp_path / "student"), "--prompts", str(prompts), "--out",
                     str(tmp_path / f"{name}.jsonl"), "--gen-length", "6", "--samples", "4", *options]) == 0
        return [r["completions"] for r in read_completions(tmp_path / f"{name}.jsonl")]

    first = complete("a")
    assert complete("b", "--batch-size", "3") == first

    assert any(len(set(c)) > 1 for c in first)  # the latents give different answers
    assert complete("c", "--seed", "1") != first
    # the CLI decodes completion d of prompt i given completion_latents(seed, i, d)
    from pipeline.data.tokenizer import decode_answer, encode_prompts, load_tokenizer, stop_token_ids
    from pipeline.generation.noise import completion_latents
    from pipeline.generation.sampler import SamplerOptions, generate, sampler_network

    tokenizer = load_tokenizer(tiny_checkpoint)
    ids = torch.tensor(encode_prompts(tokenizer, ["word:1"]) * 4)
    z = completion_latents(0, torch.full((4,), 1), torch.arange(4), 4)
    out = generate(sampler_network(Student.from_pretrained(tmp_path / "student"), z), ids, SamplerOptions.one_step(6),
                   mask_id=student.base.config.mask_token_id)
    stops = stop_token_ids(tokenizer, student.base.config, tiny_checkpoint)
    assert [decode_answer(tokenizer, a, stops) for a in out[:, ids.shape[1]:].tolist()] == first[1]
    # one greedy completion decodes with the greedy anchor, at any step count
    assert main(["--model", str(tmp_path / "student"), "--prompts", str(prompts), "--out", str(tmp_path / "g.jsonl"),
                 "--gen-length", "6", "--steps", "2"]) == 0
    ids = torch.tensor(encode_prompts(tokenizer, ["sort:dcba"]))
    out = generate(sampler_network(Student.from_pretrained(tmp_path / "student"), anchor=True), ids,
                   SamplerOptions(gen_length=6, steps=2), mask_id=student.base.config.mask_token_id)
    anchored = decode_answer(tokenizer, out[0, ids.shape[1]:].tolist(), stops)
    assert [r["completions"] for r in read_completions(tmp_path / "g.jsonl")][2] == [anchored]


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("case", ["missing", "empty", "too_long", "not_json", "neither", "blocks", "zero_length",
                                  "temperature", "no_chat_template", "unknown_character", "nan_temperature",
                                  "inf_cfg_scale", "out_is_a_directory", "huge_seed", "negative_seed", "bogus_device",
                                  "absent_accelerator", "damaged_student", "unknown_character_no_tokenizer_config"])
def test_bad_input_gets_one_clear_line(case, tiny_checkpoint, tmp_path, capsys):
    model, prompts = tiny_checkpoint, tmp_path / "in.jsonl"
    expected = {"missing": "not found", "empty": "empty", "too_long": "max_sequence_length",
                "not_json": ":2: not valid JSON", "neither": "neither a LLaDA checkpoint",
                "blocks": "--block-length: gen_length 8 is not a multiple of 3",
                "zero_length": "--gen-length: must be an integer >= 1", "temperature": "--temperature",
                "no_chat_template": "no chat template", "unknown_character": "in.jsonl:3: the tokenizer has no token for 'É'",
                "nan_temperature": "--temperature: must be a finite number", "inf_cfg_scale": "--cfg-scale: must be a finite",
                "out_is_a_directory": "o.jsonl: is a directory", "huge_seed": "--seed must be in [0, 2**63)",
                "negative_seed": "--seed must be in", "bogus_device": "--device bogus: not a device torch knows",
                "absent_accelerator": "--device meta: no meta device is available",
                "damaged_student": "student_config.json: damaged (no base_path)",
                "unknown_character_no_tokenizer_config": "in.jsonl:3: the tokenizer has no token for 'É'"}[case]
    extra = {"blocks": ["--block-length", "3"], "zero_length": ["--gen-length", "0"],
             "temperature": ["--temperature", "-1"], "no_chat_template": ["--chat-template", "on"],
             "nan_temperature": ["--temperature", "nan"], "inf_cfg_scale": ["--cfg-scale", "inf"],
             "huge_seed": ["--seed", str(2**70), "--temperature", "1"], "negative_seed": ["--seed", "-1"],
             "bogus_device": ["--device", "bogus"], "absent_accelerator": ["--device", "meta"]}.get(case, [])
    if case == "empty":
        prompts.write_text("\n")
    elif case == "too_long":
        write_prompts(prompts, ["ok", "x" * 70])
    elif case == "not_json":
        prompts.write_text('{"prompt": "a"}\n{prompt\n')
    elif case == "neither":
        write_prompts(prompts, ["a"])
        model = tmp_path / "empty_dir"
        model.mkdir()
    elif case.startswith("unknown_character"):  # the built-in tokenizer knows lower-case letters, digits and +=:
        prompts.write_text('{"prompt": "word:1"}\n\n{"prompt": "word:É"}\n')
        if case.endswith("no_tokenizer_config"):  # the unknown token is then named by tokenizer.json alone
            (model / "tokenizer_config.json").unlink()
    elif case != "missing":
        write_prompts(prompts, ["a"])
    if case == "out_is_a_directory":
        (tmp_path / "o.jsonl").mkdir()
    if case == "damaged_student":
        model = tmp_path / "student"
        model.mkdir()
        (model / "student_config.json").write_text('{"format": "llada-meanflow-student"}')
    code = main(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                 "--gen-length", "8", *extra])
    assert code == 2
    assert expected in one_error_line(capsys)
    assert (tmp_path / "o.jsonl").is_dir() if case == "out_is_a_directory" else not (tmp_path / "o.jsonl").exists()
    assert not list(tmp_path.glob("*tmp*"))


def test_cli_reports_error_on_stderr_as_a_process(tmp_path):
    result = run_cli("--model", tmp_path, "--prompts", tmp_path / "absent.jsonl", "--out", tmp_path / "o.jsonl")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "not found" in result.stderr
