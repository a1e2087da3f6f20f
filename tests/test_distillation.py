"""Stage two: the cache loader, the Lightning distillation module, DDP, checkpoints, the stage."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.cache.loader import CacheMiniBatches, TeacherCacheDataModule
from pipeline.cache.params import CacheParams
from pipeline.cache.topk import open_cache
from pipeline.core.errors import TrainingError
from pipeline.core.params import from_mapping
from pipeline.data.layout import Layout
from pipeline.student.distillation import StudentDistillation
from pipeline.student.model import Student
from pipeline.student.params import StudentParams
from pipeline.student.soft_prompt import SoftPromptConfig
from pipeline.teacher.artifact import load_teacher
from tests.conftest import make_cached_workdir

ROOT = Path(__file__).resolve().parents[1]


CACHE = dict(samples_per_example=2, top_k=6, rows_per_shard=64, record_batch_rows=16)
"""The cache of the module's workdir (params.yaml's ``cache`` section for the stage)."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_cached_workdir(tmp_path_factory.mktemp("distill"), CACHE, train_per_task=16)


def make_module(workdir, **overrides):
    base, _, _ = load_teacher(workdir / "artifacts" / "teacher")
    params = StudentParams(**{"soft_prompt": SoftPromptConfig(prompt_length=2, hidden_size=8, latent_dim=0),
                              "meanflow_weight": 1.0, "rollout_weight": 0.0, "batch_size": 8,
                              "max_steps": 3, "warmup_steps": 1, "lr": 1e-2, **overrides})
    student = Student(base, config=params.soft_prompt)
    return StudentDistillation(student, params, Layout.load(workdir / "data").gen_length), params


def trainer(**options):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **{"enable_checkpointing": False, **options})


def test_mini_batches_are_the_cache_rows(workdir):
    cache = open_cache(workdir / "artifacts" / "cache")
    batches = CacheMiniBatches(workdir / "artifacts" / "cache", batch_size=5)
    assert sum(len(batches[i].t) for i in range(len(batches))) == len(cache) == 128
    batch = batches[1]  # rows 5..9 of the first record batch
    rows = [cache[i] for i in range(5, 10)]
    assert torch.equal(batch.input_ids, torch.tensor(np.stack([r["input_ids"] for r in rows])).long())
    assert torch.equal(batch.masked.nonzero()[:, 1], torch.tensor(np.concatenate([r["masked_positions"] for r in rows])).long())
    assert torch.equal(batch.topk_ids, torch.tensor(np.concatenate([r["topk_ids"] for r in rows])).long())
    assert torch.allclose(batch.topk_logprobs, torch.tensor(np.concatenate([r["topk_logprobs"] for r in rows])).float())


@pytest.mark.parametrize("jvp", ["no_grad", "grad"])
def test_training_moves_only_the_soft_prompt(workdir, jvp):
    module, params = make_module(workdir, jvp=jvp)
    base_before = copy.deepcopy(module.student.base.state_dict())
    prompt_before = copy.deepcopy(module.student.soft_prompt.state_dict())
    fit = trainer(max_steps=3)
    fit.fit(module, datamodule=TeacherCacheDataModule(workdir / "artifacts" / "cache", params.batch_size))
    assert fit.global_step == 3
    for key, value in module.student.base.state_dict().items():
        assert torch.equal(value, base_before[key]), key  # bit for bit
    assert any(not torch.equal(v, prompt_before[k]) for k, v in module.student.soft_prompt.state_dict().items())
    metrics = fit.callback_metrics
    assert {"train/loss", "train/du_dt_abs", "train/grad_norm"} <= set(metrics)
    assert torch.isfinite(metrics["train/loss"])


def test_loss_at_r_equal_t_is_distillation_of_v(workdir):
    module, _ = make_module(workdir, equal_fraction=1.0, adaptive_power=0.0)
    batch = CacheMiniBatches(workdir / "artifacts" / "cache", batch_size=8)[0]
    out = module.meanflow_step(batch)
    assert out.equal.all()
    # the target is v itself: the KL logged equals KL(v || u) computed directly
    from pipeline.student.meanflow import dense_logprobs

    v = dense_logprobs(batch.topk_ids, batch.topk_logprobs, module.student.base.config.embedding_size)
    with torch.no_grad():
        u = module.student(input_ids=batch.input_ids, r=batch.t, t=batch.t, attention_mask=batch.attention_mask)
    kl = (v.exp() * (v - torch.log_softmax(u[batch.masked], -1))).sum(-1)
    assert torch.allclose(out.kl, kl, atol=1e-5)


def test_non_finite_loss_stops_with_a_clear_error(workdir):
    module, params = make_module(workdir)
    with torch.no_grad():
        module.student.soft_prompt.prompt_gate.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite MeanFlow loss"):
        trainer(max_steps=1).fit(module, datamodule=TeacherCacheDataModule(workdir / "artifacts" / "cache", 8))


def test_checkpoints_hold_only_the_soft_prompt_and_resume(workdir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module, params = make_module(workdir, max_steps=4)
    data = lambda: TeacherCacheDataModule(workdir / "artifacts" / "cache", 8)  # noqa: E731
    first = trainer(max_steps=2, enable_checkpointing=True,
                    callbacks=[ModelCheckpoint(dirpath=str(tmp_path), save_last=True, every_n_train_steps=2)])
    first.fit(module, datamodule=data())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert keys and all(k.startswith("student.soft_prompt.") for k in keys)
    saved = {k.removeprefix("student.soft_prompt."): v for k, v in checkpoint["state_dict"].items()}

    resumed, _ = make_module(workdir, max_steps=4)
    seen = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(step=trainer.global_step, state=copy.deepcopy(pl_module.student.soft_prompt.state_dict()))

    second = trainer(max_steps=4, callbacks=[Capture()])
    second.fit(resumed, datamodule=data(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert seen["step"] == 2 and second.global_step == 4
    assert all(torch.equal(seen["state"][k], v) for k, v in saved.items())


@pytest.mark.parametrize("stop", [3, 4, 6])
def test_a_resumed_run_continues_the_data_order(workdir, tmp_path, stop):
    """Interrupted after ``stop`` steps (mid-epoch, at an epoch's end, in the second epoch; 4 batches
    per epoch) and resumed from its checkpoint, a run ends with the weights of an uninterrupted one
    (it used to restart the epoch's order, training again on the batches it had seen)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = lambda: TeacherCacheDataModule(workdir / "artifacts" / "cache", 32)  # noqa: E731  (128 rows: 4 batches)
    L.seed_everything(0)
    straight, _ = make_module(workdir, max_steps=8)
    trainer(max_steps=8).fit(straight, datamodule=data())
    L.seed_everything(0)
    interrupted, _ = make_module(workdir, max_steps=8)
    save = ModelCheckpoint(dirpath=str(tmp_path), save_last=True, every_n_train_steps=stop)
    trainer(max_steps=stop, enable_checkpointing=True, callbacks=[save]).fit(interrupted, datamodule=data())
    L.seed_everything(0)
    resumed, _ = make_module(workdir, max_steps=8)
    trainer(max_steps=8).fit(resumed, datamodule=data(), ckpt_path=str(tmp_path / "last.ckpt"))
    for key, value in straight.student.soft_prompt.state_dict().items():
        assert torch.equal(resumed.student.soft_prompt.state_dict()[key], value), key


@pytest.mark.parametrize("objective", ["meanflow", "rollouts", "posterior", "policy", "matching", "mean_field"])
def test_ddp_on_two_processes_matches_one_process(workdir, tmp_path, objective):
    """Two gloo ranks with 4 rows each = one process with 8 rows: the same soft prompt after training,
    and identical on both ranks (rollouts: latent selection among 3 draws included; posterior: soft EM
    over 3 of 5 codes; policy: 3 samples per prompt, rewarded by the teacher; matching: the student
    and its auxiliary; mean_field: 2 contexts per prompt, anchor rows among them)."""
    script = ROOT / "tests" / "ddp_distill.py"
    for devices, batch, out in ((2, 4, tmp_path / "ddp"), (1, 8, tmp_path / "single")):
        result = subprocess.run([sys.executable, str(script), str(workdir), str(out), str(devices), str(batch), "3",
                                 objective], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(str(tmp_path / "ddp" / "rank0.safetensors")), load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    single = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    initial = Student(load_teacher(workdir / "artifacts" / "teacher")[0], prompt_length=2, hidden_size=8,
                      latent_dim=0 if objective == "meanflow" else 4)
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.allclose(rank0[key], single[key], atol=1e-5, rtol=1e-4), key
    assert not torch.equal(single["prompt_gate"], initial.soft_prompt.prompt_gate.detach())


def test_train_student_stage_with_rollouts_and_a_latent(workdir, tmp_path):
    """The rollout objective from the cache's rollouts, with a latent: the summary carries the latent
    diagnostics and the 4-latent validation."""
    student = {"soft_prompt": {"prompt_length": 2, "hidden_size": 8, "latent_dim": 3}, "batch_size": 8,
               "max_steps": 2, "eval_every": 1, "warmup_steps": 1, "meanflow_weight": 0.0,
               "rollout_weight": 1.0, "latent_draws": 3}
    result = run_student_stage(workdir, tmp_path, student)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Student.from_pretrained(tmp_path / "s").latent_dim == 3
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert {"latent_gap", "latent_distinct", "rollout_loss_one_step"} <= set(summary["diagnostics"])
    assert "meanflow_loss" not in summary["diagnostics"]
    latents = summary["val_one_step_4_latents"]  # a random teacher: few valid answers
    assert 0 <= latents["distinct_valid"]["word"] <= 4 and set(latents["accuracy"]) >= {"word", "perm", "mean"}


def test_train_student_stage_with_a_code_book_soft_em_policy_and_matching(workdir, tmp_path):
    """The mode-seeking objectives through the stage, with the latent into the answer positions: the
    summary carries the code usage, policy, matching and mean-field diagnostics, the saved student decodes with its
    code book, and the run's checkpoint holds the two soft prompts but not the frozen base."""
    gen_length = Layout.load(workdir / "data").gen_length
    student = {"soft_prompt": {"prompt_length": 2, "hidden_size": 8, "latent_dim": 3, "codebook_size": 4,
                               "latent_answer_positions": gen_length},
               "batch_size": 8, "max_steps": 2, "eval_every": 2, "warmup_steps": 1,
               "rollout_weight": 1.0, "latent_draws": 4, "selection": "posterior",
               "selection_temperature": 1.0, "selection_temperature_start": 5.0, "trained_draws": 2,
               "policy_weight": 0.5, "policy_samples": 3, "matching_weight": 0.5, "matching_warmup_steps": 1,
               "mean_field_weight": 0.5, "mean_field_samples": 2}
    result = run_student_stage(workdir, tmp_path, student)
    assert result.returncode == 0, result.stderr[-3000:]
    config = Student.from_pretrained(tmp_path / "s").soft_prompt_config
    assert config.codebook_size == 4 and config.latent_answer_positions == gen_length
    diagnostics = json.loads((tmp_path / "m" / "summary.json").read_text())["diagnostics"]
    assert 0 <= diagnostics["code_usage_entropy"] <= round(math.log(4), 4) and 1 <= diagnostics["codes_won"] <= 4
    assert diagnostics["policy_reward"] < 0 and 1 <= diagnostics["policy_length"] <= 7
    assert 1 <= diagnostics["policy_distinct"] <= 3 and diagnostics["policy_entropy"] > 0
    assert diagnostics["matching_kl"] >= 0 and diagnostics["matching_auxiliary_loss"] > 0
    assert diagnostics["mean_field_conditional_kl"] >= 0 and diagnostics["mean_field_pll"] < 0
    assert 1 <= diagnostics["mean_field_distinct"] <= 2 and diagnostics["mean_field_entropy"] > 0
    (checkpoint,) = (tmp_path / "c").glob("*/last.ckpt")
    keys = torch.load(checkpoint, weights_only=False)["state_dict"].keys()
    assert {k.split(".")[0] for k in keys} == {"student", "auxiliary"} and not any(".base." in k for k in keys)


def test_a_time_cap_that_binds_fails_and_keeps_the_runs_checkpoints(workdir, tmp_path):
    """A cap that stops training early publishes no student and says so; the run's checkpoints stay
    for ``--resume`` (whose identity ignores ``max_minutes``)."""
    student = {"soft_prompt": {"prompt_length": 2, "hidden_size": 8, "latent_dim": 0}, "batch_size": 8,
               "max_steps": 400, "eval_every": 1, "warmup_steps": 1, "meanflow_weight": 1.0, "rollout_weight": 0.0}
    paths = ["--out", str(tmp_path / "s"), "--metrics", str(tmp_path / "m"), "--checkpoints", str(tmp_path / "c")]

    (workdir / "params.yaml").write_text(yaml.safe_dump({"student": {**student, "max_minutes": 1.0e-6}, "cache": CACHE}))
    cut = subprocess.run([sys.executable, str(ROOT / "stages" / "train_student.py"), *paths], cwd=workdir,
                         capture_output=True, text=True, timeout=600)
    assert cut.returncode == 2 and "Traceback" not in cut.stderr, cut.stderr[-3000:]
    last = cut.stderr.strip().splitlines()[-1]
    assert last.startswith("error: student.max_minutes") and "of 400" in last and "rerunning train_student" in last
    assert not (tmp_path / "s").exists()
    (run_dir,) = (tmp_path / "c").iterdir()
    assert (run_dir / "last.ckpt").is_file()


def test_a_rerun_continues_the_interrupted_run_to_the_uninterrupted_result(workdir, tmp_path):
    """The stage's default (what dvc repro runs): an interrupted run (here cut by a time cap after its
    first step) is continued by the next run with the same params, cache and code, and ends with the
    soft prompt and the whole validation curve of a run never interrupted (--fresh, elsewhere)."""
    student = {**STAGE_STUDENT, "max_steps": 3}
    cut = run_student_stage(workdir, tmp_path, {**student, "max_minutes": 1.0e-6})
    assert cut.returncode == 2 and "student.max_minutes" in cut.stderr, cut.stderr[-3000:]
    resumed = run_student_stage(workdir, tmp_path, student)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-3000:]
    whole = subprocess.run([sys.executable, str(ROOT / "stages" / "train_student.py"), "--out", str(tmp_path / "w"),
                            "--metrics", str(tmp_path / "wm"), "--checkpoints", str(tmp_path / "wc"), "--fresh"],
                           cwd=workdir, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0 and "training afresh" in whole.stdout, whole.stderr[-3000:]
    found, expected = (load_file(str(d / "soft_prompt.safetensors")) for d in (tmp_path / "s", tmp_path / "w"))
    for key in expected:
        assert torch.equal(found[key], expected[key]), key
    curves = [json.loads((d / "accuracy_curve.json").read_text()) for d in (tmp_path / "m", tmp_path / "wm")]
    assert [entry["step"] for entry in curves[0]] == [1, 2, 3] and curves[0] == curves[1]


def test_train_student_stage_end_to_end(workdir, tmp_path):
    params = {"student": {"soft_prompt": {"prompt_length": 2, "hidden_size": 8, "latent_dim": 0}, "batch_size": 8,
                          "max_steps": 2, "eval_every": 1, "warmup_steps": 1, "meanflow_weight": 1.0,
                          "rollout_weight": 0.0, "log_every_n_steps": 1}, "cache": CACHE}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, str(ROOT / "stages" / "train_student.py")], cwd=workdir,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    student = Student.from_pretrained(workdir / "artifacts" / "student")
    assert student.soft_prompt_config.prompt_length == 2
    summary = json.loads((workdir / "metrics" / "student" / "summary.json").read_text())
    assert summary["steps"] == 2 and "mean" in summary["val_accuracy_one_step"]
    plots = workdir / "metrics" / "student" / "training" / "plots" / "metrics"
    for name in ("lr-AdamW", "perf/rows_per_second", "perf/tokens_per_second", "perf/peak_memory_gb"):
        lines = (plots / f"{name}.tsv").read_text().splitlines()  # logged every log_every_n_steps (here 1)
        assert len(lines) >= 2 and float(lines[-1].split("\t")[1]) > 0, name
    from pipeline.generate_cli import main as generate_main

    out = tmp_path / "out.jsonl"
    assert generate_main(["--model", str(workdir / "artifacts" / "student"), "--prompts",
                          str(workdir / "data" / "prompts" / "test.jsonl"), "--out", str(out), "--gen-length", "7"]) == 0
    assert len(out.read_text().splitlines()) == 8


def test_training_target_is_v_minus_gap_times_the_jvp(workdir):
    """The target meanflow_step trains on, recomputed independently, on rows with r < t; and the two
    JVP patterns give the same loss on a batch mixing r = t and r < t."""
    from pipeline.student.meanflow import dense_logprobs, tangent, token_losses

    module, _ = make_module(workdir, equal_fraction=0.5)
    module.student.double()
    with torch.no_grad():
        module.student.soft_prompt.prompt_gate.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    batch = CacheMiniBatches(workdir / "artifacts" / "cache", batch_size=8)[0]
    batch.t = batch.t.double()
    out = module.meanflow_step(batch)
    assert out.equal.any() and (~out.equal).any()
    base, masked, t = module.student.base, batch.masked, batch.t
    from pipeline.core.counter_random import counter_uniform
    from pipeline.student.meanflow import sample_r

    keys = (0, 0, batch.example_index, batch.sample_index)
    r = sample_r(t, 0.5, uniforms=(counter_uniform(*keys, 1), counter_uniform(*keys, 2)))
    v = dense_logprobs(batch.topk_ids, batch.topk_logprobs, base.config.embedding_size).double()
    dz = tangent("linear", v, masked, base.embedding_weight.detach(), base.config.mask_token_id, t)
    z = base.embed(batch.input_ids).detach()
    fn = lambda z_, t_: module.student(inputs_embeds=z_, r=r, t=t_, attention_mask=batch.attention_mask,  # noqa: E731
                                       attention="math")
    _, du_dt = torch.func.jvp(fn, (z, t), (dz, torch.ones_like(t)))
    expected = v - (t - r)[masked.nonzero()[:, 0], None] * du_dt[masked]
    with torch.no_grad():  # training keeps no (M, V) target: its KL to u is what it trained on
        u = module.student(input_ids=batch.input_ids, r=r, t=t, attention_mask=batch.attention_mask)[masked]
    assert torch.allclose(out.kl.double(), token_losses("kl", u, expected).double(), atol=1e-5, rtol=1e-4)
    grad_mode, _ = make_module(workdir, equal_fraction=0.5, jvp="grad")
    grad_mode.student = module.student
    assert torch.allclose(grad_mode.meanflow_step(batch).loss, out.loss, rtol=1e-6)


STAGE_STUDENT = {"soft_prompt": {"prompt_length": 2, "hidden_size": 8, "latent_dim": 0}, "batch_size": 8,
                 "max_steps": 2, "eval_every": 1, "warmup_steps": 1, "meanflow_weight": 1.0, "rollout_weight": 0.0}


def run_student_stage(workdir, tmp_path, student: dict, *args):
    (workdir / "params.yaml").write_text(yaml.safe_dump({"student": student, "cache": CACHE}))
    return subprocess.run([sys.executable, str(ROOT / "stages" / "train_student.py"), "--out", str(tmp_path / "s"),
                           "--metrics", str(tmp_path / "m"), "--checkpoints", str(tmp_path / "c"), *args],
                          cwd=workdir, capture_output=True, text=True, timeout=600)


def test_resume_continues_this_run_and_refuses_another_runs_checkpoint(workdir, tmp_path):
    """Checkpoints live in a directory per run (a hash of the params that determine it): a run with
    other params and ``--resume`` trains afresh in its own directory instead of resuming (and
    publishing) the previous run's student; an explicit checkpoint of another run is refused,
    naming the key that differs."""
    first = run_student_stage(workdir, tmp_path, STAGE_STUDENT)
    assert first.returncode == 0, first.stderr[-3000:]
    (old_run,) = (tmp_path / "c").iterdir()
    assert (old_run / "last.ckpt").is_file() and not list(old_run.glob("last-v*.ckpt"))
    seed = {**STAGE_STUDENT, "tangent": "seed"}
    second = run_student_stage(workdir, tmp_path, seed, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "training afresh" in second.stdout
    (new_run,) = set((tmp_path / "c").iterdir()) - {old_run}
    resumed = torch.load(new_run / "last.ckpt", weights_only=True)  # what --resume reads: tensors and plain data
    assert resumed["run_identity"]["student"]["tangent"] == "seed" and resumed["global_step"] == 2
    saved = load_file(str(tmp_path / "s" / "soft_prompt.safetensors"))
    for key, value in saved.items():
        assert torch.equal(resumed["state_dict"][f"student.soft_prompt.{key}"], value), key
    again = run_student_stage(workdir, tmp_path, seed, "--resume")  # the same params: this run, continued (done)
    assert again.returncode == 0 and f"resuming {new_run / 'last.ckpt'}" in again.stdout, again.stderr[-3000:]
    refused = run_student_stage(workdir, tmp_path, seed, "--resume", str(old_run / "last.ckpt"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --resume") and "student.tangent: 'linear' -> 'seed'" in last
    # A crafted checkpoint with this run's identity and a payload: refused, and the payload never runs.
    marker = tmp_path / "payload-ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({**resumed, "payload": Payload(marker)}, crafted)
    refused = run_student_stage(workdir, tmp_path, seed, "--resume", str(crafted))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "holds objects other than tensors and plain data" in refused.stderr.strip().splitlines()[-1]
    assert not marker.exists()


def test_a_truncated_last_checkpoint_is_refused_on_resume(workdir, tmp_path):
    """A full disk used to leave a truncated last.ckpt under its final name, and --resume then died
    with a traceback; now the file is read before Lightning gets it, and refused in one line."""
    assert run_student_stage(workdir, tmp_path, STAGE_STUDENT).returncode == 0
    (run_dir,) = (tmp_path / "c").iterdir()
    last = run_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    refused = run_student_stage(workdir, tmp_path, STAGE_STUDENT, "--resume")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: --resume {last}: not a readable Lightning checkpoint") and "--fresh trains" in line


def test_checkpoints_are_written_whole_or_not_at_all(tmp_path):
    """A save that fails midway (here: an object torch cannot pickle; in practice a full disk) leaves
    the previous checkpoint and no temporary."""
    from pipeline.student.run import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        io.save_checkpoint({"step": torch.tensor(2), "broken": lambda: None}, path)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["step"] == 1


class Payload:
    """Unpickling it creates ``marker``: a harmless stand-in for code a crafted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def student_call(workdir, tmp_path, resume=None, cache=None, cache_params=None, **overrides):
    from pipeline.student.distillation import train_student

    params = from_mapping(StudentParams, {**STAGE_STUDENT, **overrides}, "student")
    return train_student(params, workdir / "artifacts" / "teacher", cache or workdir / "artifacts" / "cache",
                         workdir / "data", tmp_path / "s", tmp_path / "m", tmp_path / "c", resume,
                         cache_params or CacheParams(**CACHE))


@pytest.mark.parametrize("case", ["missing_resume", "foreign_resume", "damaged_cache", "cache_params", "strategy"])
def test_a_failed_run_keeps_the_last_good_runs_record(workdir, tmp_path, case):
    """Inputs are checked before an output is touched: a bad resume path or a damaged cache used to
    delete metrics/student/training/ (the logger clears it) while summary.json still described the
    old run. Each failure is a pipeline error naming the file or key (one ``error:`` line)."""
    import shutil

    from pipeline.core.errors import CacheError, CheckpointError

    record = tmp_path / "m" / "training" / "metrics.json"
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    kwargs, error, message = {}, CheckpointError, None
    if case == "missing_resume":
        kwargs, message = {"resume": tmp_path / "nope.ckpt"}, r"--resume .*nope.ckpt: file not found"
    elif case == "foreign_resume":  # a checkpoint written before runs were recorded
        torch.save({"state_dict": {}, "global_step": 3}, tmp_path / "old.ckpt")
        kwargs, message = {"resume": tmp_path / "old.ckpt"}, r"old.ckpt: records no run identity"
    elif case == "damaged_cache":
        cache = shutil.copytree(workdir / "artifacts" / "cache", tmp_path / "cache")
        shard = cache / "shard-00000.arrow"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
        kwargs, error, message = {"cache": cache}, CacheError, r"shard-00000.arrow: checksum mismatch"
    elif case == "cache_params":  # params.yaml changed, stage one not rerun
        kwargs = {"cache_params": CacheParams(**{**CACHE, "top_k": 8})}
        error, message = CacheError, r"built with other params than params.yaml \(cache.top_k: 6 -> 8\); rerun cache_teacher"
    else:
        kwargs, error, message = {"strategy": "dpp"}, ValueError, r"strategy: 'dpp' is not supported"
    with pytest.raises(error, match=message):
        student_call(workdir, tmp_path, **kwargs)
    assert record.read_text() == "{}" and not (tmp_path / "s").exists()


def test_a_cache_from_other_training_data_is_refused(workdir, tmp_path):
    from pipeline.cache.topk import read_manifest
    from pipeline.core.errors import CacheError
    from pipeline.student.run import check_cache_is_current

    manifest = read_manifest(workdir / "artifacts" / "cache")
    layout = Layout.load(workdir / "data")
    check_cache_is_current(tmp_path, manifest, CacheParams(**CACHE), layout, workdir / "data")  # the same: accepted
    with pytest.raises(CacheError, match=r"built from other training data .*train .*rerun cache_teacher"):
        check_cache_is_current(tmp_path, {**manifest, "data_fingerprint": "0" * 16}, CacheParams(**CACHE), layout,
                               workdir / "data")


def test_a_latent_into_answer_positions_of_another_length_is_refused(workdir, tmp_path):
    gen_length = Layout.load(workdir / "data").gen_length
    student = {**STAGE_STUDENT, "soft_prompt": {"prompt_length": 2, "hidden_size": 8, "latent_dim": 3,
                                                "latent_answer_positions": gen_length + 1}}
    result = run_student_stage(workdir, tmp_path, student)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (f"error: student.soft_prompt.latent_answer_positions: {gen_length + 1}, but the data's answers have "
            f"{gen_length} tokens") in result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("objective", ["meanflow", "rollouts"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(workdir, objective, monkeypatch):
    """Trunk blocks recomputed in the backward pass (``student.activation_checkpointing``): the same loss
    and soft-prompt gradients as with the activations kept (MeanFlow with the no-grad JVP; the rollout
    objective with a latent and selection among 3 draws)."""
    from pipeline.cache.loader import RolloutMiniBatches

    latent = objective == "rollouts"
    prompt = SoftPromptConfig(prompt_length=2, hidden_size=8, latent_dim=4 if latent else 0)
    module, _ = make_module(workdir, soft_prompt=prompt,
                            meanflow_weight=0.0 if latent else 1.0, rollout_weight=1.0 if latent else 0.0, latent_draws=3)
    module.rollout_steps = 7  # the cache's sampler steps (gen_length)
    with torch.no_grad():  # an open gate: the prefix, and so the soft prompt, is in every block's graph
        module.student.soft_prompt.prompt_gate.fill_(0.1)
    cache = workdir / "artifacts" / "cache"
    batch = RolloutMiniBatches(cache, 8, "all")[0] if latent else CacheMiniBatches(cache, batch_size=8)[0]
    results, calls = [], []
    block_class = type(module.student.base.blocks[0])
    forward = block_class.forward
    monkeypatch.setattr(block_class, "forward", lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs))
    for recompute in (False, True):
        module.student.base.checkpoint_blocks = recompute
        module.student.zero_grad(set_to_none=True)
        calls.clear()
        loss = (module.rollout_step(batch) if latent else module.meanflow_step(batch)).loss
        forwards = len(calls)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in module.student.soft_prompt.named_parameters()
                                        if p.grad is not None}, len(calls) - forwards))
    (kept_loss, kept, kept_reruns), (recomputed_loss, recomputed, reruns) = results
    assert kept_reruns == 0 and reruns >= 1  # the backward pass ran the block again
    assert torch.equal(kept_loss, recomputed_loss) and kept.keys() == recomputed.keys() and kept
    for name in kept:
        assert torch.allclose(kept[name], recomputed[name], rtol=1e-6, atol=1e-9), name
    with pytest.raises(ValueError, match="activation_checkpointing: needs jvp: no_grad"):
        StudentParams(activation_checkpointing=True, jvp="grad")
