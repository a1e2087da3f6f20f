"""``python -m pipeline.generate_cli`` end to end on tiny checkpoints with a char tokenizer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data.tokenizer import EOT_TOKEN
from pipeline.generate_cli import main
from pipeline.models.llada import LLaDA
from pipeline.student.model import Student
from tests.conftest import ALPHABET, make_checkpoint

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


class CountingGenerate:
    """``generate`` as the CLI calls it, recording each call's (left-padded prompt ids, options, keyword
    arguments); ``fail_at`` = n raises on the n-th call instead."""

    def __init__(self, real, fail_at=None):
        self.real, self.fail_at, self.calls = real, fail_at, []

    def __call__(self, predictor, prompt, options, **kwargs):
        self.calls.append((prompt, options, kwargs))
        if len(self.calls) == self.fail_at:
            raise RuntimeError("the device went away")
        return self.real(predictor, prompt, options, **kwargs)

    @property
    def rows(self):
        return sum(prompt.shape[0] for prompt, _, _ in self.calls)


def no_weights(monkeypatch):
    """Make loading any weights fail the test: what is checked here must be refused before that."""
    import pipeline.generate_cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(cli, "load_model", refuse)
    monkeypatch.setattr(cli.Student, "from_pretrained", refuse)


SEVEN = ["add:1+2=", "sort:cba", "word:3", "perm:abc", "add:12+9=", "sort:zyx", "word:1"]


def test_output_is_appended_chunk_by_chunk_and_a_rerun_carries_on(tiny_checkpoint, tmp_path, monkeypatch):
    """The output used to be held until the end (100k prompts: nothing written for minutes), then in a
    temporary that a failure deleted. Each chunk of the input is appended to --out as it finishes; a
    failure keeps the finished chunks, and a rerun decodes only the rest: the same file as one run."""
    import pipeline.generate_cli as cli

    prompts = write_prompts(tmp_path / "in.jsonl", SEVEN)
    options = ["--model", str(tiny_checkpoint), "--prompts", str(prompts), "--gen-length", "6", "--steps", "3",
               "--samples", "2", "--batch-size", "3"]
    assert main([*options, "--out", str(tmp_path / "whole.jsonl")]) == 0
    monkeypatch.setattr(cli, "CHUNK_BATCHES", 1)  # 1 prompt (3 // 2 completions) per chunk, one batch each
    assert main([*options, "--out", str(tmp_path / "chunked.jsonl")]) == 0
    whole = read_completions(tmp_path / "whole.jsonl")
    assert read_completions(tmp_path / "chunked.jsonl") == whole

    failing = CountingGenerate(cli.generate, fail_at=3)
    monkeypatch.setattr(cli, "generate", failing)
    with pytest.raises(RuntimeError, match="went away"):
        main([*options, "--out", str(tmp_path / "failed.jsonl")])
    assert read_completions(tmp_path / "failed.jsonl") == whole[:2]  # the two chunks finished before
    again = CountingGenerate(failing.real)
    monkeypatch.setattr(cli, "generate", again)
    assert main([*options, "--out", str(tmp_path / "failed.jsonl")]) == 0
    assert again.rows == 5 * 2 and read_completions(tmp_path / "failed.jsonl") == whole


def test_a_rerun_redoes_a_cut_short_last_line_and_skips_the_done_prompts(tiny_checkpoint, tmp_path, monkeypatch,
                                                                          capsys):
    import pipeline.generate_cli as cli

    prompts = write_prompts(tmp_path / "in.jsonl", SEVEN)
    options = ["--model", str(tiny_checkpoint), "--prompts", str(prompts), "--gen-length", "6", "--steps", "3"]
    assert main([*options, "--out", str(tmp_path / "whole.jsonl")]) == 0
    whole = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(whole[:3]) + whole[3][:20])  # a kill during the fourth line's write
    counting = CountingGenerate(cli.generate)
    monkeypatch.setattr(cli, "generate", counting)
    assert main([*options, "--out", str(out)]) == 0
    assert out.read_text() == "".join(whole) and counting.rows == 4
    assert "holds the first 3 of 7 prompts" in capsys.readouterr().err

    no_weights(monkeypatch)  # all done: nothing is decoded, nothing loaded, the file untouched
    assert main([*options, "--out", str(out)]) == 0
    assert out.read_text() == "".join(whole) and "nothing to do" in capsys.readouterr().err


def test_a_full_disk_keeps_the_finished_chunks_whole(tiny_checkpoint, tmp_path):
    """A write that fails part way (here the file size limit, as a full disk) is cut back to the last
    finished chunk, so --out holds whole lines only; the rerun carries on and gives one run's file."""
    import resource
    import signal

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    prompts = write_prompts(tmp_path / "in.jsonl", [f"word:{i}" for i in range(80)])
    options = ["--model", tiny_checkpoint, "--prompts", prompts, "--gen-length", 4, "--steps", 1, "--batch-size", 2]
    out = tmp_path / "out.jsonl"  # chunks of 32 prompts, about 1.5 kB each
    result = subprocess.run([sys.executable, "-m", "pipeline.generate_cli", *map(str, options), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {out}: cannot write (File too large); the "
                                                               "prompts completed before stay there")
    assert out.read_text().endswith("\n") and len(read_completions(out)) == 32
    assert main([*map(str, options), "--out", str(out)]) == 0
    assert main([*map(str, options), "--out", str(tmp_path / "whole.jsonl")]) == 0
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


@pytest.mark.parametrize("case", ["another_prompt", "another_samples", "not_an_output", "too_many_lines"])
def test_a_rerun_refuses_another_runs_output_unless_overwrite(case, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Output line k belongs to input line k: an --out holding other prompts (or another --samples, or
    no completions at all) is refused before any weights load, and left as it was; --overwrite replaces it."""
    prompts = write_prompts(tmp_path / "in.jsonl", SEVEN[:3])
    options = ["--model", str(tiny_checkpoint), "--prompts", str(prompts), "--gen-length", "6", "--steps", "3"]
    assert main([*options, "--out", str(tmp_path / "whole.jsonl")]) == 0
    records = read_completions(tmp_path / "whole.jsonl")
    content, expected = {
        "another_prompt": ([records[0], {**records[1], "prompt": "word:9"}], "o.jsonl:2: holds another prompt than"),
        "another_samples": ([{**records[0], "completions": ["a", "b"]}],
                            "o.jsonl:1: holds 2 completions, not --samples 1"),
        "not_an_output": ([{"prompt": p} for p in SEVEN[:3]], "o.jsonl:1: not an output line of this command"),
        "too_many_lines": (records + records[:1], "holds 4 lines for the 3 prompts of"),
    }[case]
    out = tmp_path / "o.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in content))
    before = out.read_text()
    with monkeypatch.context() as patched:
        no_weights(patched)
        assert main([*options, "--out", str(out)]) == 2
    assert expected in one_error_line(capsys) and out.read_text() == before
    assert main([*options, "--out", str(out), "--overwrite"]) == 0
    assert read_completions(out) == records


def test_output_lines_carry_the_input_fields_and_prompt_field_picks_the_prompt(tiny_checkpoint, tmp_path):
    rows = [{"question": p, "answer": str(n), "task": p.split(":")[0]} for n, p in enumerate(SEVEN[:3])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = ["--model", str(tiny_checkpoint), "--gen-length", "6", "--steps", "3", "--samples", "2",
               "--temperature", "1"]
    assert main([*options, "--prompts", str(tmp_path / "in.jsonl"), "--prompt-field", "question",
                 "--out", str(tmp_path / "o.jsonl")]) == 0
    plain = write_prompts(tmp_path / "plain.jsonl", SEVEN[:3])
    assert main([*options, "--prompts", str(plain), "--out", str(tmp_path / "plain_out.jsonl")]) == 0
    records, reference = read_completions(tmp_path / "o.jsonl"), read_completions(tmp_path / "plain_out.jsonl")
    # the input's fields in their order, the prompt under "prompt" too (score_cli reads it), then the completions
    assert [list(r) for r in records] == [["question", "answer", "task", "prompt", "completions"]] * 3
    assert [{k: r[k] for k in ("question", "answer", "task")} for r in records] == rows
    assert [(r["prompt"], r["completions"]) for r in records] == [(r["prompt"], r["completions"]) for r in reference]


def eos_biased_checkpoint(path):
    """A tiny LLaDA that predicts EOS (id 0) everywhere: every residual stream carries a large constant
    component, which the head turns into a large EOS logit (and a low BOS and UNK one, ids 1 and 3,
    which decode to nothing)."""
    make_checkpoint(path)
    model = LLaDA.from_pretrained(path)
    with torch.no_grad():
        model.embedding_weight[:, 0] = 30.0
        model.head_weight[0, 0] = 5.0
        model.head_weight[[1, 3], 0] = -5.0
    model.save_pretrained(path)
    return path


def test_logits_eos_inf_keeps_every_answer_from_ending_early(tmp_path):
    model = eos_biased_checkpoint(tmp_path / "model")
    prompts = write_prompts(tmp_path / "in.jsonl", SEVEN[:4])
    options = ["--model", str(model), "--prompts", str(prompts), "--gen-length", "8", "--steps", "4", "--samples", "2",
               "--temperature", "1"]
    assert main([*options, "--out", str(tmp_path / "plain.jsonl")]) == 0
    assert all(c == "" for r in read_completions(tmp_path / "plain.jsonl") for c in r["completions"])
    assert main([*options, "--out", str(tmp_path / "no_eos.jsonl"), "--logits-eos-inf"]) == 0
    assert all(len(c) == 8 for r in read_completions(tmp_path / "no_eos.jsonl") for c in r["completions"])


def chat_checkpoint(path, template="{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}={% endfor %}"):
    """A tiny LLaDA whose char tokenizer also has ``<|eot_id|>`` and, with ``template``, a chat template
    (by default ``s:SYSTEM=u:USER=``, in characters the tokenizer knows)."""
    from pipeline.data.tasks import ALPHABET
    from pipeline.data.tokenizer import MASK, build_char_tokenizer
    from tests.conftest import tiny_config

    tokenizer = build_char_tokenizer(ALPHABET)
    tokenizer.add_special_tokens({"additional_special_tokens": [EOT_TOKEN]})
    if template:
        tokenizer.chat_template = template
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids(MASK))
    LLaDA(config).init_weights(std=0.2, generator=torch.Generator().manual_seed(0)).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path, tokenizer


def test_eos_options_and_the_tokenizers_eos_and_eot_ids_reach_the_sampler(tmp_path, monkeypatch):
    import pipeline.generate_cli as cli

    model, tokenizer = chat_checkpoint(tmp_path / "model", template=None)
    prompts = write_prompts(tmp_path / "in.jsonl", SEVEN[:2])
    counting = CountingGenerate(cli.generate)
    monkeypatch.setattr(cli, "generate", counting)
    assert main(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                 "--gen-length", "6", "--steps", "3", "--logits-eos-inf", "--confidence-eos-eot-inf"]) == 0
    (_, options, kwargs), = counting.calls
    assert options.logits_eos_inf and options.confidence_eos_eot_inf
    assert (kwargs["eos_id"], kwargs["eot_id"]) == (0, len(tokenizer) - 1)  # the char tokenizer's EOS; the added EOT
    assert tokenizer.convert_ids_to_tokens([0, len(tokenizer) - 1]) == ["<|endoftext|>", EOT_TOKEN]
    assert main(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "m.jsonl"),
                 "--gen-length", "6", "--steps", "3", "--mask-id", "41"]) == 0
    assert counting.calls[-1][2]["mask_id"] == 41


def test_system_prompt_goes_before_the_user_message_in_the_chat_template(tmp_path, monkeypatch):
    import pipeline.generate_cli as cli

    model, tokenizer = chat_checkpoint(tmp_path / "model")
    prompts = write_prompts(tmp_path / "in.jsonl", ["word:3", "sort:cba"])
    counting = CountingGenerate(cli.generate)
    monkeypatch.setattr(cli, "generate", counting)
    options = ["--model", str(model), "--prompts", str(prompts), "--gen-length", "6", "--steps", "3"]
    assert main([*options, "--out", str(tmp_path / "o.jsonl"), "--system-prompt", "bebrief"]) == 0
    assert main([*options, "--out", str(tmp_path / "p.jsonl")]) == 0
    (with_system, _, kwargs), (plain, _, _) = counting.calls
    texts = [tokenizer.decode(row[mask.bool()].tolist()) for row, mask in zip(with_system, kwargs["attention_mask"])]
    assert sorted(texts) == ["s:bebrief=u:sort:cba=", "s:bebrief=u:word:3="]
    assert sorted(tokenizer.decode(row[row != 0].tolist()) for row in plain) == ["u:sort:cba=", "u:word:3="]


def test_stdin_to_stdout(tiny_checkpoint, tmp_path):
    """With ``-`` the prompts come from stdin and the records go to stdout, which holds nothing else."""
    text = "".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in SEVEN[:3])
    options = ["--model", tiny_checkpoint, "--gen-length", "6", "--steps", "3"]
    result = subprocess.run([sys.executable, "-m", "pipeline.generate_cli", *map(str, options), "--prompts", "-",
                             "--out", "-"], input=text, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 prompts" in result.stderr
    (tmp_path / "in.jsonl").write_text(text)
    assert main([*map(str, options), "--prompts", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 0
    assert result.stdout == (tmp_path / "o.jsonl").read_text()


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
                                  "absent_accelerator", "damaged_student", "unknown_character_no_tokenizer_config",
                                  "missing_prompt_field", "system_prompt_without_template", "system_prompt_chat_off",
                                  "system_prompt_unknown_character", "mask_id_outside", "mask_id_is_eos",
                                  "confidence_with_random_remasking", "out_is_the_prompts"])
def test_bad_input_gets_one_clear_line(case, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """One ``error:`` line, before any weights load (seconds, not minutes on LLaDA-8B), and no output."""
    no_weights(monkeypatch)
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
                "damaged_student": "student_config.json: damaged (no base",
                "unknown_character_no_tokenizer_config": "in.jsonl:3: the tokenizer has no token for 'É'",
                "missing_prompt_field": "in.jsonl:2: expected an object with a string field 'question'",
                "system_prompt_without_template": "--system-prompt: the tokenizer has no chat template",
                "system_prompt_chat_off": "--system-prompt: goes into the chat template, which --chat-template off",
                "system_prompt_unknown_character": "--system-prompt: the tokenizer has no token for 'É'",
                "mask_id_outside": "--mask-id 99: outside the model's embedding (size 43)",
                "mask_id_is_eos": "--mask-id 0: is the EOS or BOS token",
                "confidence_with_random_remasking": "--confidence-eos-eot-inf: changes the low-confidence score only",
                "out_is_the_prompts": "is the --prompts file"}[case]
    extra = {"blocks": ["--block-length", "3"], "zero_length": ["--gen-length", "0"],
             "temperature": ["--temperature", "-1"], "no_chat_template": ["--chat-template", "on"],
             "nan_temperature": ["--temperature", "nan"], "inf_cfg_scale": ["--cfg-scale", "inf"],
             "huge_seed": ["--seed", str(2**70), "--temperature", "1"], "negative_seed": ["--seed", "-1"],
             "bogus_device": ["--device", "bogus"], "absent_accelerator": ["--device", "meta"],
             "missing_prompt_field": ["--prompt-field", "question"],
             "system_prompt_without_template": ["--system-prompt", "be brief"],
             "system_prompt_chat_off": ["--system-prompt", "be brief", "--chat-template", "off"],
             "system_prompt_unknown_character": ["--system-prompt", "É"], "mask_id_outside": ["--mask-id", "99"],
             "mask_id_is_eos": ["--mask-id", "0"],
             "confidence_with_random_remasking": ["--confidence-eos-eot-inf", "--remasking", "random"]}.get(case, [])
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
    elif case == "missing_prompt_field":
        prompts.write_text('{"question": "a"}\n{"prompt": "b"}\n')
    elif case == "system_prompt_unknown_character":
        model = chat_checkpoint(tmp_path / "chat")[0]
        write_prompts(prompts, ["a"])
    elif case != "missing":
        write_prompts(prompts, ["a"])
    if case == "out_is_a_directory":
        (tmp_path / "o.jsonl").mkdir()
    if case == "damaged_student":
        model = tmp_path / "student"
        model.mkdir()
        (model / "student_config.json").write_text('{"format": "llada-meanflow-student"}')
    out = prompts if case == "out_is_the_prompts" else tmp_path / "o.jsonl"
    before = prompts.read_bytes() if prompts.exists() else None
    code = main(["--model", str(model), "--prompts", str(prompts), "--out", str(out), "--gen-length", "8", *extra])
    assert code == 2
    assert expected in one_error_line(capsys)
    assert (tmp_path / "o.jsonl").is_dir() if case == "out_is_a_directory" else not (tmp_path / "o.jsonl").exists()
    assert (prompts.read_bytes() if prompts.exists() else None) == before


def test_cli_reports_error_on_stderr_as_a_process(tmp_path):
    result = run_cli("--model", tmp_path, "--prompts", tmp_path / "absent.jsonl", "--out", tmp_path / "o.jsonl")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "not found" in result.stderr


def test_a_student_decodes_what_it_was_trained_for_and_base_finds_a_moved_base(tiny_checkpoint, tmp_path, capsys):
    """A student records its layout: without --gen-length it decodes 5 tokens (the default 128 would
    exceed the tiny model's 64 positions); its base moved away, --base points at it; and a student
    decoding another length than it was trained for warns once."""
    import shutil

    Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2).save_pretrained(
        tmp_path / "student", trained_for={"prompt_length": 14, "gen_length": 5, "block_length": 5})
    prompts = write_prompts(tmp_path / "p.jsonl", ["sort:cab", "word:3"])
    options = ["--model", str(tmp_path / "student"), "--prompts", str(prompts), "--overwrite"]
    assert main([*options, "--out", str(tmp_path / "out.jsonl")]) == 0
    assert "wrote 2 prompts" in capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.move(str(tiny_checkpoint), str(moved))
    assert main([*options, "--out", str(tmp_path / "out.jsonl")]) == 2
    assert "the student's base checkpoint is not found" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="trained for gen_length 5; decoding with gen_length 6"):
        assert main([*options, "--out", str(tmp_path / "six.jsonl"), "--base", str(moved), "--gen-length", "6"]) == 0
    assert read_completions(tmp_path / "out.jsonl") != read_completions(tmp_path / "six.jsonl")
    assert main(["--model", str(moved), "--prompts", str(prompts), "--out", str(tmp_path / "t.jsonl"),
                 "--base", str(moved)]) == 2
    assert "--base: only a student has a base" in capsys.readouterr().err
