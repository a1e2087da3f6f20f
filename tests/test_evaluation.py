"""The evaluation: settings grid, scoring, decoding of a split, timing bookkeeping, the stage's errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from pipeline.core.ranks import Ranks
from pipeline.data.layout import Layout
from pipeline.data.scoring import score_records
from pipeline.data.tokenizer import decode_answer
from pipeline.evaluation.grid import completions_to_decode, evaluate_settings, settings_for
from pipeline.evaluation.report import summarize
from pipeline.generation.decode import complete_split, decode_completions, default_step_counts, records_of
from pipeline.generation.sampler import SamplerOptions, generate
from pipeline.student.model import Student
from pipeline.teacher.artifact import load_teacher
from tests.conftest import free_port, make_workdir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("eval"), train_per_task=4)


class CountingLLaDA(torch.nn.Module):
    """A teacher that counts the rows it is run on."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.rows = inner, inner.config, 0

    def forward(self, input_ids, attention_mask=None):
        self.rows += input_ids.shape[0]
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_default_step_counts_double_up_to_gen_length():
    assert default_step_counts(7) == [1, 2, 4, 7]
    assert default_step_counts(8) == [1, 2, 4, 8]
    assert default_step_counts(1) == [1]
    assert default_step_counts(256, num_blocks=8) == [8, 16, 32, 64, 128, 256]


def test_settings_grid():
    grid = settings_for([1, 2, 7], cfg_scale=0.5, temperature=1.0, samples=4, gen_length=7)
    assert len(grid) == 4 * 2 * 2  # (3 teacher step counts + student) x (no CFG, CFG) x (greedy, sampled)
    passes = {s.name: s.forward_passes for s in grid}
    assert passes["teacher_steps7_greedy"] == 7 and passes["teacher_steps7_greedy_cfg0.5"] == 14
    assert passes["student_steps1_sampled_t1x4"] == 1 and passes["student_steps1_sampled_t1x4_cfg0.5"] == 2
    assert all(s.cfg_scale == 0 for s in settings_for([1], cfg_scale=0.0, temperature=1.0, samples=2, gen_length=7))
    blocks = settings_for([8, 16], 0.0, 1.0, 2, gen_length=16, block_length=4)
    assert {(s.model, s.block_length) for s in blocks} == {("teacher", 4), ("student", 16)}
    coupled = settings_for([1, 7], 0.0, 1.0, 4, gen_length=7, noise_variants=["fixed", "shared"])[-2:]
    assert [s.name for s in coupled] == ["teacher_steps7_sampled_t1x4_fixed_noise", "teacher_steps7_sampled_t1x4_shared_noise"]
    latents = settings_for([1, 7], 0.0, 1.0, 4, gen_length=7, student_latents=True)[-1]
    assert latents.name == "student_steps1_greedyx4" and latents.samples == 4 and latents.forward_passes == 1
    curve = settings_for([1, 2, 4, 7], 0.0, 1.0, 4, gen_length=7, student_latents=True, student_steps=[1, 2, 4, 7])
    names = {s.name for s in curve if s.model == "student"}
    assert {f"student_steps{n}_{d}" for n in (1, 2, 4, 7) for d in ("greedy", "sampled_t1x4", "greedyx4")} == names
    blocked = settings_for([4, 8], 0.0, 1.0, 2, gen_length=8, block_length=2, student_steps=[1, 4, 8])
    assert {(s.steps, s.block_length) for s in blocked if s.model == "student"} == {(1, 8), (4, 2), (8, 2)}


def test_latent_student_decodes_each_completion_given_its_latent(workdir):
    """Completion i of row n is the one-step greedy answer given completion_latents(seed, n, i),
    whatever the batch; the report puts the 4-latent row in the several-completions table."""
    from pipeline.evaluation.report import results_markdown
    from pipeline.generation.noise import completion_latents
    from pipeline.generation.sampler import sampler_network

    teacher, tokenizer, _ = load_teacher(workdir / "artifacts" / "teacher")
    student = Student(teacher, prompt_length=2, hidden_size=8, latent_dim=3).eval()
    with torch.no_grad():
        student.soft_prompt.prompt_gate.fill_(5.0)
        for p in student.soft_prompt.prompt_mlp.parameters():
            p.normal_(std=3.0, generator=torch.Generator().manual_seed(0))
    layout = Layout.load(workdir / "data")
    rows = datasets.load_from_disk(str(workdir / "data" / "test"))
    runs = [complete_split(student, rows, tokenizer, {0}, layout, steps=1, samples=4, batch_size=b, seed=7)[0]
            for b in (5, 8)]
    assert runs[0] == runs[1]
    P, n = layout.prompt_length, len(rows)
    ids, mask = (torch.as_tensor(rows[c])[:, :P].long().repeat_interleave(4, dim=0)
                 for c in ("input_ids", "attention_mask"))
    z = completion_latents(7, torch.arange(n).repeat_interleave(4), torch.arange(4).repeat(n), 3)
    with torch.inference_mode():
        out = generate(sampler_network(student, z), ids, SamplerOptions.one_step(layout.gen_length), mask_id=2,
                       attention_mask=mask)
    answers = [decode_answer(tokenizer, a, {0}) for a in out[:, P:].tolist()]
    assert [c for r in runs[0] for c in r["completions"]] == answers
    assert any(len(set(r["completions"])) > 1 for r in runs[0])
    # one greedy completion decodes with the greedy anchor (at any step count)
    greedy, _ = complete_split(student, rows, tokenizer, {0}, layout, steps=2, batch_size=5)
    with torch.inference_mode():
        out = generate(sampler_network(student, anchor=True), ids[::4], SamplerOptions(steps=2, gen_length=layout.gen_length),
                       mask_id=2, attention_mask=mask[::4])
    assert [r["completions"] for r in greedy] == [[decode_answer(tokenizer, a, {0})] for a in out[:, P:].tolist()]

    grid = settings_for([1], 0.0, 1.0, 4, gen_length=layout.gen_length, student_latents=True)
    results = evaluate_settings({"teacher": teacher, "student": student}, grid, rows, tokenizer, {0}, layout,
                                batch_size=8, seed=7)
    summary = {"prompts": n, "device": "cpu", **summarize(results, layout.gen_length)}
    greedy, several = results_markdown(results, summary, 1.0, 4, layout.gen_length).split("completions per prompt")
    assert "| student | 1 | 0 | 0 | latents |" in several and "latents" not in greedy


def test_coupled_noise_completions(workdir):
    """``fixed``: a completion is a function of (seed, prompt row, sample), whatever the batch;
    ``shared``: sample i of every prompt draws field i, so a network that ignores the prompt gives
    every prompt the same i-th completion."""
    teacher, tokenizer, _ = load_teacher(workdir / "artifacts" / "teacher")
    layout = Layout.load(workdir / "data")
    rows = datasets.load_from_disk(str(workdir / "data" / "test"))
    decode = lambda model, batch, noise, seed=0: complete_split(  # noqa: E731
        model, rows, tokenizer, {0}, layout, layout.gen_length, temperature=1.0, samples=3, batch_size=batch,
        noise=noise, seed=seed, num_fields=2)[0]
    fixed = decode(teacher, 5, "fixed")
    assert decode(teacher, 2, "fixed") == fixed and decode(teacher, 5, "fixed", seed=1) != fixed

    class PromptBlind(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.bias = teacher.config, torch.nn.Parameter(torch.randn(layout.length, len(tokenizer)))

        def forward(self, input_ids, attention_mask=None):
            return self.bias[None].expand(len(input_ids), -1, -1).clone()

    shared = decode(PromptBlind(), 4, "shared")
    assert len({tuple(r["completions"]) for r in shared}) == 1  # the same fields for every prompt
    first, second, third = shared[0]["completions"]
    assert first == third and first != second  # 2 fields: samples 0 and 2 share one


@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
def test_forward_passes_are_the_network_evaluations_per_completion(workdir, steps, cfg_scale):
    teacher, tokenizer, _ = load_teacher(workdir / "artifacts" / "teacher")
    counting = CountingLLaDA(teacher)
    layout = Layout.load(workdir / "data")
    rows = datasets.load_from_disk(str(workdir / "data" / "test"))
    (setting,) = [s for s in settings_for([steps], cfg_scale, 1.0, 3, layout.gen_length)
                  if s.model == "teacher" and s.temperature > 0 and s.cfg_scale == cfg_scale]
    complete_split(counting, rows, tokenizer, {0}, layout, setting.steps, cfg_scale=cfg_scale, temperature=1.0,
                   samples=3, batch_size=5)
    assert counting.rows == setting.forward_passes * len(rows) * 3


def test_scoring_mixes_task_rows_and_exact_match():
    records = [
        {"task": "sort", "prompt": "sort:cab", "answer": "abc", "completions": ["abc", "acb"]},
        {"task": "perm", "prompt": "perm:abc", "answer": "abc", "completions": ["bca", "bca"]},
        {"prompt": "What is 2+2?", "answer": "4", "completions": ["4", "5"]},
        {"prompt": "Capital of France?", "answer": "Paris", "completions": ["Paris ", "Paris"]},
        {"prompt": "word: a word with a colon", "answer": "yes", "completions": ["yes", "no"]},
    ]
    metrics = score_records(records)
    assert metrics["sort"]["accuracy"] == 0.5 and metrics["perm"]["accuracy"] == 1.0
    assert metrics["perm"]["distinct_valid"] == 1.0
    assert metrics["exact_match"]["accuracy"] == 4 / 6  # external prompts that look like task prompts too
    assert metrics["mean"]["accuracy"] == pytest.approx((0.5 + 1.0 + 4 / 6) / 3)


def test_complete_split_decodes_every_row_like_generate(workdir):
    teacher, tokenizer, _ = load_teacher(workdir / "artifacts" / "teacher")
    layout = Layout.load(workdir / "data")
    rows = datasets.load_from_disk(str(workdir / "data" / "test"))
    records, seconds = complete_split(teacher, rows, tokenizer, {0}, layout, steps=2, batch_size=3)
    assert [r["prompt"] for r in records] == rows["prompt"] and seconds > 0
    P = layout.prompt_length
    ids = torch.as_tensor(rows["input_ids"])[:, :P].long()
    mask = torch.as_tensor(rows["attention_mask"])[:, :P].long()
    out = generate(lambda x, m: teacher(input_ids=x, attention_mask=m), ids, SamplerOptions(steps=2,
                   gen_length=layout.gen_length), mask_id=2, attention_mask=mask)
    assert [r["completions"] for r in records] == [[decode_answer(tokenizer, a, {0})] for a in out[:, P:].tolist()]

    sampled = [complete_split(teacher, rows, tokenizer, {0}, layout, steps=1, temperature=1.0, samples=3,
                              batch_size=batch, seed=seed)[0] for batch, seed in ((5, 0), (5, 0), (4, 0), (5, 1))]
    assert all(len(r["completions"]) == 3 for r in sampled[0])
    assert sampled[0] == sampled[1] and sampled[0] != sampled[3]  # the seed fixes the draws
    assert [r["task"] for r in sampled[2]] == rows["task"]

    external = rows.remove_columns("task")  # external data: scored by exact match to the answer
    records, _ = complete_split(teacher, external, tokenizer, {0}, layout, steps=2, batch_size=3)
    assert "task" not in records[0] and set(score_records(records)) == {"exact_match", "mean"}
    with pytest.raises(ValueError, match="answer"):
        complete_split(teacher, rows.remove_columns("answer"), tokenizer, {0}, layout, steps=1)


@pytest.mark.parametrize("noise", ["per_step", "fixed"])
def test_processes_that_split_the_batches_decode_what_one_process_decodes(workdir, noise):
    """Rank r of W decodes batches r, r + W, ...; each batch draws its per-step noise from its own
    generator (``batch_generator(seed, b)``), so the union over ranks is one process's decoding."""
    teacher, tokenizer, _ = load_teacher(workdir / "artifacts" / "teacher")
    layout = Layout.load(workdir / "data")
    rows = datasets.load_from_disk(str(workdir / "data" / "test"))
    decode = lambda shard: decode_completions(teacher, rows, tokenizer, {0}, layout, steps=2, temperature=1.0,  # noqa: E731
                                              samples=3, batch_size=4, noise=noise, seed=3, shard=shard)[0]
    one = decode((0, 1))
    assert len(one) == 3 * len(rows) and len({c[2] for c in one}) > 1
    for world in (2, 3):
        shares = [decode((rank, world)) for rank in range(world)]
        assert all(shares) and sorted(c for share in shares for c in share) == sorted(one)
        assert records_of(rows, [c for share in reversed(shares) for c in share]) == records_of(rows, one)
    grid = settings_for([2], 0.0, 1.0, 3, gen_length=layout.gen_length)
    assert sum(completions_to_decode(grid, len(rows), 2, batch_size=4, ranks=Ranks(rank, 3, rank))
               for rank in range(3)) == completions_to_decode(grid, len(rows), 2)


def test_the_stage_on_two_ranks_writes_what_one_process_writes(workdir, tmp_path):
    """``torchrun --nproc-per-node 2 stages/evaluate.py``: each rank decodes a share of every
    setting (greedy, sampled, coupled noise, a latent student's several latents), rank 0 merges and
    writes; the metrics and the plot data equal one process's but for the timings."""
    teacher, _, _ = load_teacher(workdir / "artifacts" / "teacher")
    student = Student(teacher, prompt_length=2, hidden_size=8, latent_dim=3)
    with torch.no_grad():
        student.soft_prompt.prompt_gate.fill_(5.0)
        for p in student.soft_prompt.prompt_mlp.parameters():
            p.normal_(std=3.0, generator=torch.Generator().manual_seed(1))
    student.save_pretrained(tmp_path / "student")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": {
        "teacher_steps": [1, 7], "student_steps": [1, 2], "samples": 2, "batch_size": 3, "timing_repeats": 1}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it

    def evaluate(out, launcher=()):
        result = subprocess.run([*launcher, str(ROOT / "stages" / "evaluate.py"), "--data", str(workdir / "data"),
                                 "--teacher", str(workdir / "artifacts" / "teacher"), "--student", "student",
                                 "--metrics", f"{out}/eval.json", "--report", f"{out}/eval"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        untimed = lambda value: ({k: untimed(v) for k, v in value.items() if "seconds" not in k and "speedup" not in k  # noqa: E731
                                  and "cost" not in k and k != "ranks"} if isinstance(value, dict)
                                 else [untimed(v) for v in value] if isinstance(value, list) else value)
        return {path.name: untimed(json.loads(path.read_text())) for path in [tmp_path / out / "eval.json",
                                                                              *(tmp_path / out / "eval").glob("*.json")]}

    single = evaluate("single", [sys.executable])
    ranks = evaluate("ranks", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(free_port())])
    assert single == ranks and len(single) == 5
    assert json.loads((tmp_path / "ranks" / "eval.json").read_text())["ranks"] == 2
    names = set(single["eval.json"]["settings"])
    lines = (tmp_path / "single" / "eval" / "completions.jsonl").read_text()
    assert lines == (tmp_path / "ranks" / "eval" / "completions.jsonl").read_text()
    greedy = [json.loads(line) for line in lines.splitlines() if '"teacher_steps7_greedy"' in line]
    for task, accuracy in single["eval.json"]["settings"]["teacher_steps7_greedy"]["accuracy"].items():
        if task != "mean":  # the judgments written for inspection are the ones the accuracy counts
            judged = [ok for line in greedy if line["task"] == task for ok in line["correct"]]
            assert accuracy == pytest.approx(sum(judged) / len(judged), abs=1e-4)
    assert "teacher_steps7_sampled_t1x2_shared_noise" in names and "student_steps1_greedyx2" in names


def test_initial_student_scores_like_the_one_step_teacher(workdir):
    teacher, tokenizer, _ = load_teacher(workdir / "artifacts" / "teacher")
    student = Student(teacher, prompt_length=2, hidden_size=8).eval()  # zero gate: equals its base
    layout = Layout.load(workdir / "data")
    rows = datasets.load_from_disk(str(workdir / "data" / "test"))
    grid = settings_for([1, 2], 0.5, 1.0, 2, gen_length=layout.gen_length, student_steps=[1, 2])
    batches = []
    results = evaluate_settings({"teacher": teacher, "student": student}, grid, rows, tokenizer, {0}, layout,
                                batch_size=4, seed=0, on_batch=lambda name, n: batches.append((name, n)))
    assert sum(n for _, n in batches) == completions_to_decode(grid, len(rows), timing_repeats=1)  # the bar's total
    assert [name for name, _ in batches if _] == [s.name for s in grid for _ in range(-(-len(rows) * s.samples // 4))]
    by = {(r["model"], r["steps"], r["cfg_scale"], r["temperature"]): r for r in results}
    for key in [(n, w, temperature) for n in (1, 2) for w in (0.0, 0.5) for temperature in (0.0, 1.0)]:
        assert by[("student", *key)]["accuracy"] == by[("teacher", *key)]["accuracy"]
    assert all(r["seconds_per_sample"] > 0 for r in results)
    summary = summarize(results, gen_length=2)
    assert summary["student_minus_teacher_1_steps"] == 0.0 and summary["student_minus_gen_length_teacher"] == 0.0
    assert set(summary["student_minus_teacher_by_steps"]) == {"1", "2"}
    assert all(v == 0 for diff in summary["student_minus_teacher_by_steps"].values() for v in diff.values())


def test_stage_refuses_steps_beyond_gen_length(workdir):
    (workdir / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"teacher_steps": [1, 9]}}))
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "evaluate.py")], cwd=workdir,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "evaluate.teacher_steps: 9 steps" in last and "gen_length 7" in last
    assert not (workdir / "metrics" / "eval.json").exists()
