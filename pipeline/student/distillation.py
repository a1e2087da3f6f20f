"""Stage two in Lightning: distillation of the student from the teacher cache.

The network is the plain ``Student`` (frozen LLaDA + soft prompt); ``StudentDistillation`` is a thin
LightningModule that weighs the two objectives, ``pipeline.student.meanflow.meanflow_loss`` on the cache's
top-k rows and ``pipeline.student.rollout_objective.rollout_loss`` on its teacher rollouts, and draws every
random number (r, the rollout steps, the latents) from counter-based hashes of the row's identity,
so a row gets the same draws on any rank; batches come from ``pipeline.cache.loader``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import deque
from pathlib import Path

import lightning as L
import torch

from pipeline.cache.loader import RolloutBatch, TeacherCacheDataModule, TopKBatch, TrainingItem
from pipeline.core.counter_random import (MATCHING_LATENT, MATCHING_MASK, MATCHING_SAMPLE, MEAN_FIELD_LATENT,
                                          MEAN_FIELD_SAMPLE, MEANFLOW_LATENT, POLICY_LATENT, POLICY_SAMPLE,
                                          POSTERIOR_DRAW, R_FIRST, R_SECOND, ROLLOUT_LATENT, ROLLOUT_STEPS,
                                          counter_uniform)
from pipeline.core.errors import ParamsError, TrainingError
from pipeline.core.files import writing
from pipeline.core.lr_schedule import warmup_cosine
from pipeline.data.scoring import Scorer, score_records
from pipeline.student.matching_objective import MatchingLoss, distribution_matching_loss
from pipeline.student.mean_field_objective import MeanFieldLoss, latent_contexts, mean_field_loss
from pipeline.student.meanflow import MeanFlowLoss, MeanFlowOptions, TeacherRows, meanflow_loss, sample_r
from pipeline.student.model import Student
from pipeline.student.params import StudentParams
from pipeline.student.policy_objective import PolicyLoss, policy_loss
from pipeline.student.rollout_objective import RolloutLoss, Selection, rollout_interval, rollout_loss, sample_steps

# The frozen base stays in eval mode on purpose (Student.train keeps it there).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

DIAGNOSTIC_WINDOW = 50  # training steps the end-of-training diagnostics average over


class StudentDistillation(L.LightningModule):
    """Trains ``student.soft_prompt`` on ``meanflow_weight * L_meanflow + rollout_weight * L_rollout +
    policy_weight * L_policy + matching_weight * L_matching + mean_field_weight * L_mean_field``, and with matching an auxiliary soft prompt
    (``auxiliary``, a ``Student`` on the same frozen base, never saved with the student) on its own
    cross-entropy; checkpoints hold only the soft prompts. ``rollout_steps`` is the number of
    steps of the cached rollouts' sampler; ``eos_id`` the token that ends an answer (the policy
    objective's reward stops there)."""

    def __init__(self, student: Student, params: StudentParams, gen_length: int, rollout_steps: int | None = None,
                 eos_id: int | None = None):
        super().__init__()
        if params.policy_weight > 0 and eos_id is None:
            raise ValueError("the policy objective needs eos_id")
        self.student, self.params, self.gen_length, self.rollout_steps = student, params, gen_length, rollout_steps
        self.eos_id = eos_id
        self.auxiliary = None
        if params.matching_weight > 0:
            config = dataclasses.replace(student.soft_prompt_config, latent_dim=0, codebook_size=0,
                                         latent_answer_positions=0, anchor="none")
            self.auxiliary = Student(student.base, config=config)
        if params.mean_field_weight > 0 and params.mean_field_contexts == "latent" and student.latent_dim < gen_length:
            raise ParamsError(f"student.mean_field_contexts: latent needs soft_prompt.latent_dim >= the answer length "
                              f"{gen_length} (one coordinate of z per answer position), got {student.latent_dim}")
        self.meanflow_options = MeanFlowOptions.of(params)
        self.strict_loading = False  # checkpoints omit the frozen base
        self.recent: dict[str, deque] = {}

    def meanflow_step(self, batch: TopKBatch) -> MeanFlowLoss:
        """The MeanFlow objective on a batch of top-k rows; v is rebuilt from the cached top-k, a chunk of
        masked positions at a time."""
        p = self.params
        keys = (p.seed, self.current_epoch, batch.example_index, batch.sample_index)
        r = sample_r(batch.t, p.equal_fraction, uniforms=(counter_uniform(*keys, R_FIRST), counter_uniform(*keys, R_SECOND)))
        latent = None
        if self.student.latent_dim:
            latent = self.student.soft_prompt.prior_latents(*keys, MEANFLOW_LATENT).to(batch.t.device)
        v = TeacherRows(self.student.base.config.embedding_size, batch.topk_ids, batch.topk_logprobs, p.tail)
        return meanflow_loss(self.student, batch.input_ids, batch.attention_mask, batch.masked, batch.t, r, v,
                             self.meanflow_options, self.gen_length, batch.x0, latent=latent)

    def row_keys(self, batch: RolloutBatch, dims: int = 0) -> tuple:
        """A rollout row's counter keys (seed, epoch, example, rollout), the per-row ones with ``dims``
        trailing singleton dimensions for broadcasting."""
        index = tuple(key.view(-1, *(1,) * dims) for key in (batch.example_index, batch.rollout_index))
        return (self.params.seed, self.current_epoch, *index)

    def rollout_step(self, batch: RolloutBatch) -> RolloutLoss:
        """The rollout objective on a batch of rollouts: (k, k') per rollout, and K latents for a
        latent student (every code of a code book of at most K codes, else K draws from the prior);
        the greedy rollouts train its greedy anchor, when it has one."""
        p, device = self.params, batch.tokens.device
        keys = self.row_keys(batch)
        uniforms = torch.stack([counter_uniform(*keys, ROLLOUT_STEPS, j) for j in range(4)]).to(device)
        k, k_end = sample_steps(self.rollout_steps, uniforms, p.one_step_fraction, p.r0_fraction)
        interval = rollout_interval(batch.prompt_ids, batch.prompt_mask, batch.tokens, batch.reveal_step,
                                    k, k_end, self.student.base.config.mask_token_id)
        latents, codes, draw_uniforms = None, None, None
        if self.student.latent_dim:
            prompt = self.student.soft_prompt
            K, codebook = p.latent_draws, prompt.config.codebook_size
            draws = torch.arange(K)[None, :]  # (1, K)
            if codebook and K >= codebook:
                codes = torch.arange(codebook, device=device).expand(len(k), -1)  # (B, K): every code
            elif codebook:
                codes = prompt.prior_codes(*self.row_keys(batch, 1), ROLLOUT_LATENT, draws)
            latents = prompt.codes[codes] if codes is not None else \
                prompt.prior_latents(*self.row_keys(batch, 1), ROLLOUT_LATENT, draws)  # (B, K, d)
            latents = latents.to(device)
            if p.selection == "posterior":
                draw_uniforms = counter_uniform(*self.row_keys(batch, 1), POSTERIOR_DRAW,
                                                torch.arange(p.trained_draws)[None, :])  # (B, m)
        selection = Selection(p.selection, p.selection_temperature_at(self.global_step), draw_uniforms)
        out = rollout_loss(self.student, interval, latents, self.student.base.config.mask_token_id, selection,
                           anchor=batch.greedy if self.student.has_anchor else None)
        if codes is not None and out.selection is not None:
            self.log_code_usage(codes[~out.anchor], out.selection.credit)
        return out

    def policy_step(self, batch: RolloutBatch) -> PolicyLoss:
        """The policy objective on the prompts of a batch of rollouts, each with a latent from the prior
        and ``policy_samples`` one-step samples."""
        p, device = self.params, batch.tokens.device
        latent = None
        if self.student.latent_dim:
            latent = self.student.soft_prompt.prior_latents(*self.row_keys(batch), POLICY_LATENT).to(device)
        sample = torch.arange(p.policy_samples)[None, :, None]
        position = torch.arange(self.gen_length)[None, None, :]
        uniforms = counter_uniform(*self.row_keys(batch, 2), POLICY_SAMPLE, sample, position).to(device)  # (B, M, G)
        return policy_loss(self.student, batch.prompt_ids, batch.prompt_mask, latent, uniforms, self.gen_length,
                           self.student.base.config.mask_token_id, self.eos_id, p.policy_entropy_weight)

    def matching_step(self, batch: RolloutBatch) -> MatchingLoss:
        """Distribution matching on the prompts of a batch of rollouts, each with a latent from the prior."""
        p, device, G = self.params, batch.tokens.device, self.gen_length
        latent = None
        if self.student.latent_dim:
            latent = self.student.soft_prompt.prior_latents(*self.row_keys(batch), MATCHING_LATENT).to(device)
        position = torch.arange(G)
        sample_uniforms = counter_uniform(*self.row_keys(batch, 2), MATCHING_SAMPLE, position[None, None, :])
        t_uniform = counter_uniform(*self.row_keys(batch), MATCHING_MASK)
        position_uniforms = counter_uniform(*self.row_keys(batch, 1), MATCHING_MASK, position[None, :])
        return distribution_matching_loss(self.student, self.auxiliary, batch.prompt_ids, batch.prompt_mask, latent,
                                          sample_uniforms.to(device), t_uniform.to(device),
                                          position_uniforms.to(device), self.student.base.config.mask_token_id,
                                          p.matching_beta, p.matching_label_smoothing)

    def mean_field_step(self, batch: RolloutBatch) -> MeanFieldLoss:
        """The mean-field reverse KL on the prompts of a batch of rollouts: a greedy rollout's row trains
        the greedy anchor (when the student has one), the others a latent from the prior; each with
        ``mean_field_samples`` one-step contexts, their noise drawn per row or, with
        ``mean_field_contexts: latent``, the latent's own Phi(z_i)."""
        p, device, G = self.params, batch.tokens.device, self.gen_length
        latent, anchor = None, None
        if self.student.latent_dim:
            latent = self.student.soft_prompt.prior_latents(*self.row_keys(batch), MEAN_FIELD_LATENT).to(device)
            anchor = batch.greedy if self.student.has_anchor else None
        if p.mean_field_contexts == "latent":
            z = self.student.soft_prompt.effective_latent(latent, anchor, len(latent))
            uniforms = latent_contexts(z, G)
        else:
            sample = torch.arange(p.mean_field_samples)[None, :, None]
            position = torch.arange(G)[None, None, :]
            uniforms = counter_uniform(*self.row_keys(batch, 2), MEAN_FIELD_SAMPLE, sample, position).to(device)
        return mean_field_loss(self.student, batch.prompt_ids, batch.prompt_mask, latent, uniforms, G,
                               self.student.base.config.mask_token_id, p.mean_field_entropy_weight, anchor=anchor)

    def training_step(self, item: TrainingItem, batch_idx: int):
        p, loss = self.params, 0.0
        if item.meanflow is not None:
            out = self.meanflow_step(item.meanflow)
            self.require_finite(out.loss, "MeanFlow", f"|du/dt| = {out.du_dt_abs.item():.3g}. Lower student.lr or "
                                "student.soft_prompt.max_frequency, or use tangent=seed.")
            self.log_meanflow(out)
            loss = loss + p.meanflow_weight * out.loss
        if item.rollouts is not None and p.rollout_weight > 0:
            out = self.rollout_step(item.rollouts)
            self.require_finite(out.loss, "rollout", "Lower student.lr.")
            self.log_rollouts(out)
            loss = loss + p.rollout_weight * out.loss
        if item.rollouts is not None and p.policy_weight > 0:
            out = self.policy_step(item.rollouts)
            self.require_finite(out.loss, "policy", "Lower student.lr or student.policy_weight.")
            self.log_policy(out)
            loss = loss + p.policy_weight * out.loss
        if item.rollouts is not None and p.matching_weight > 0:
            out = self.matching_step(item.rollouts)
            self.require_finite(out.student + out.auxiliary, "matching", "Lower student.lr or student.matching_weight.")
            self.track("matching_loss", out.student.detach())
            self.track("matching_auxiliary_loss", out.auxiliary.detach())
            self.track("matching_kl", out.kl)
            warm = self.global_step >= p.matching_warmup_steps  # until then only the auxiliary learns
            loss = loss + (p.matching_weight if warm else 0.0) * out.student + out.auxiliary
        if item.rollouts is not None and p.mean_field_weight > 0:
            out = self.mean_field_step(item.rollouts)
            self.require_finite(out.loss, "mean-field", "Lower student.lr or student.mean_field_weight.")
            self.log_mean_field(out)
            loss = loss + p.mean_field_weight * out.loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def require_finite(self, loss: torch.Tensor, name: str, hint: str) -> None:
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite {name} loss ({loss.item()}) at step {self.global_step}; {hint}")

    def track(self, name: str, value: torch.Tensor) -> None:
        """Log ``train/{name}`` and keep it for the end-of-training diagnostics."""
        self.log(f"train/{name}", value)
        self.recent.setdefault(name, deque(maxlen=DIAGNOSTIC_WINDOW)).append(float(value))

    def log_meanflow(self, out: MeanFlowLoss) -> None:
        self.track("meanflow_loss", out.loss.detach())
        self.track("du_dt_abs", out.du_dt_abs)
        if out.equal.any():
            self.track("kl_r_eq_t", out.kl[out.equal].mean())
        if (~out.equal).any():
            self.track("kl_r_lt_t", out.kl[~out.equal].mean())

    def log_rollouts(self, out: RolloutLoss) -> None:
        """The loss by one-step / intermediate rows, and whether the latent is used: the gap between
        the mean and the best draw's loss, and the distinct greedy answers across the K draws (about
        0 and 1 when the latent is ignored)."""
        self.track("rollout_loss", out.loss.detach())
        if out.one_step.any():
            self.track("rollout_loss_one_step", out.rows[out.one_step].mean())
        if (~out.one_step).any():
            self.track("rollout_loss_intermediate", out.rows[~out.one_step].mean())
        if out.anchor.any():
            self.track("rollout_loss_anchor", out.rows[out.anchor].mean())
        if out.selection is not None:
            self.track("latent_gap", out.selection.gap.mean())
            self.track("latent_distinct", out.selection.distinct.float().mean())
            one_step = out.one_step[~out.anchor]  # the selection's rows
            if one_step.any():
                self.track("latent_distinct_one_step", out.selection.distinct[one_step].float().mean())

    def log_code_usage(self, codes: torch.Tensor, credit: torch.Tensor) -> None:
        """How the code book is used: the entropy (nats; log K when every code is trained alike) of the
        training credit summed per code over the batch, and how many codes won a rollout. ``codes``
        (B, K) the scored codes, ``credit`` (B, K) their training weights."""
        K = self.student.soft_prompt.config.codebook_size
        usage = torch.zeros(K, dtype=credit.dtype, device=credit.device).index_add_(0, codes.flatten(), credit.flatten())
        usage = usage / usage.sum().clamp(min=1e-12)
        self.track("code_usage_entropy", -(usage * usage.clamp(min=1e-12).log()).sum())
        winners = codes.gather(1, credit.argmax(dim=1, keepdim=True))
        self.track("codes_won", torch.tensor(float(len(torch.unique(winners)))))

    def log_policy(self, out: PolicyLoss) -> None:
        """The reward (teacher pseudo-log-likelihood), answer length, entropy of q and distinct samples
        per prompt: a rising reward with a length falling to 1 is reward hacking (EOS-only answers)."""
        self.track("policy_loss", out.loss.detach())
        self.track("policy_reward", out.reward.mean())
        self.track("policy_length", out.length.float().mean())
        self.track("policy_entropy", out.entropy)
        self.track("policy_distinct", out.distinct.float().mean())

    def log_mean_field(self, out: MeanFieldLoss) -> None:
        """The conditional KL (near 0 at consistent answers), the teacher's pseudo-log-likelihood of the
        sampled contexts, the entropy of q and distinct contexts per prompt."""
        self.track("mean_field_loss", out.loss.detach())
        self.track("mean_field_conditional_kl", out.conditional_kl)
        self.track("mean_field_pll", out.pseudo_log_likelihood.mean())
        self.track("mean_field_entropy", out.entropy)
        self.track("mean_field_distinct", out.distinct.float().mean())

    def diagnostics(self) -> dict[str, float]:
        """Each tracked quantity averaged over the last ``DIAGNOSTIC_WINDOW`` steps (this rank)."""
        return {name: round(sum(values) / len(values), 4) for name, values in sorted(self.recent.items())}

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.student.soft_prompt.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The student's soft prompt and, with matching, the auxiliary's."""
        return [*self.student.soft_prompt.parameters(),
                *(self.auxiliary.soft_prompt.parameters() if self.auxiliary is not None else [])]

    def configure_optimizers(self):
        p = self.params
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=p.lr, weight_decay=p.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, p.warmup_steps, p.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(("student.base.", "auxiliary.base."))}


def check_cache_matches_teacher(cache_dir: Path, record) -> None:
    from pipeline.cache.topk import read_manifest
    from pipeline.core.errors import CacheError

    manifest = read_manifest(Path(cache_dir))
    if manifest["teacher_fingerprint"] != record.fingerprint:
        raise CacheError(f"{cache_dir}: built by teacher {manifest['teacher_fingerprint']}, but the teacher is "
                         f"{record.fingerprint}; rerun cache_teacher")


def train_student(params: StudentParams, teacher_dir: Path, cache_dir: Path, data_dir: Path, out_dir: Path,
                  metrics_dir: Path, checkpoint_dir: Path, resume=None, cache_params=None,
                  logs_dir: Path = Path("logs/student"), scorer: Scorer | None = None) -> dict:
    """Distil a student from the cache and save it (soft prompt + base pointer) to ``out_dir``, with
    checkpoints in this run's directory under ``checkpoint_dir`` (``pipeline.student.run``; ``resume``:
    a checkpoint of this run, or ``Resume`` for its last one). With ``cache_params`` (params.yaml's
    ``cache``), a cache built with others is refused. A ``student.logger`` besides DVCLive writes into
    ``logs_dir``. Validation completions are judged by ``scorer`` (default ``builtin``). Returns a summary on global rank 0, None on the
    other ranks."""
    import time

    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.utilities import rank_zero_only

    from pipeline.cache.rollouts import open_rollouts
    from pipeline.cache.shards import read_manifest
    from pipeline.core.time_cap import check_not_cut, time_limit
    from pipeline.data.layout import Layout, load_split
    from pipeline.generation.accuracy import GenerationAccuracy
    from pipeline.generation.decode import default_step_counts
    from pipeline.student import launch
    from pipeline.student import run as student_run
    from pipeline.student.monitor import TrainingMonitor
    from pipeline.teacher.artifact import load_teacher

    L.seed_everything(params.seed, workers=True)
    # Every input is checked before an output is touched (the logger clears metrics_dir / "training").
    on_gpu = torch.cuda.is_available()
    options = launch.trainer_options(params, on_gpu)  # refuses a world the params do not describe
    launch.check_logger(params.logger)
    base, tokenizer, record = load_teacher(teacher_dir)
    check_cache_matches_teacher(cache_dir, record)
    layout = Layout.load(data_dir)
    answer_positions = params.soft_prompt.latent_answer_positions
    if answer_positions and answer_positions != layout.gen_length:
        raise ParamsError(f"student.soft_prompt.latent_answer_positions: {answer_positions}, but the data's answers "
                          f"have {layout.gen_length} tokens (data.gen_length); set it to {layout.gen_length} or 0")
    manifest = read_manifest(cache_dir)
    if cache_params is not None:
        student_run.check_cache_is_current(cache_dir, manifest, cache_params, layout, data_dir)
    # The world the run trains in: devices as resolved (auto under a launcher is a number of processes).
    identity = student_run.run_identity(dataclasses.replace(params, devices=options["devices"]), manifest)
    run_dir = student_run.run_directory(checkpoint_dir, identity)
    ckpt_path = student_run.resume_checkpoint(resume, run_dir, identity)
    data = TeacherCacheDataModule(cache_dir, params.batch_size, params.num_workers, seed=params.seed,
                                  meanflow=params.meanflow_weight > 0,
                                  rollouts=params.rollouts if params.on_rollouts() else None)
    data.setup("fit")  # opens (rank 0: verifies) the cache
    if rank_zero_only.rank == 0:
        print(f"checkpoints: {run_dir}; " + (f"resuming {ckpt_path}" if ckpt_path else "training afresh"))
        if ckpt_path is None:
            student_run.clear_run_directory(run_dir)
    student = Student(base, config=params.soft_prompt)
    base.checkpoint_blocks = params.activation_checkpointing
    rollout_steps = None
    if params.rollout_weight > 0:
        rollout_steps = open_rollouts(cache_dir, verify=False).sampler["steps"]
    module = StudentDistillation(student, params, layout.gen_length, rollout_steps, eos_id=layout.pad_token_id)
    accuracy = GenerationAccuracy(load_split(data_dir, "val"), tokenizer, {layout.pad_token_id},
                                  layout, every_n_steps=params.eval_every, steps=1, model_of=lambda m: m.student,
                                  more_steps=tuple(default_step_counts(layout.gen_length)), scorer=scorer)
    trainer = L.Trainer(
        max_steps=params.max_steps,
        max_time=time_limit(params.max_minutes),
        logger=launch.loggers(params.logger, metrics_dir / "training", logs_dir, resume=ckpt_path is not None),
        callbacks=[accuracy, student_run.RecordRunIdentity(identity), TrainingMonitor(),
                   LearningRateMonitor(logging_interval="step"),
                   ModelCheckpoint(dirpath=str(run_dir), save_last=True, every_n_train_steps=params.eval_every,
                                   enable_version_counter=False)],
        plugins=[student_run.AtomicCheckpointIO()],
        **options,
    )
    started = time.perf_counter()
    with writing(metrics_dir / "training"):  # the logger's files (checkpoints name their own)
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None)
    check_not_cut(trainer.global_step, params.max_steps, params.max_minutes, "student.max_minutes",
                  f"; its checkpoints are kept: rerunning train_student continues it ({run_dir})")
    if not trainer.is_global_zero:
        return None
    rollout_sampler = open_rollouts(cache_dir, verify=False).sampler if params.rollout_weight > 0 else {}
    student.cpu().save_pretrained(out_dir, *teacher_reference(teacher_dir, record, base.source_path), trained_for={
        "prompt_length": layout.prompt_length, "gen_length": layout.gen_length,
        "block_length": rollout_sampler.get("block_length") or layout.gen_length})
    latents = latent_validation(student, accuracy.rows, tokenizer, layout, scorer=scorer) if student.latent_dim else None
    return {"steps": trainer.global_step, "minutes": round((time.perf_counter() - started) / 60, 2),
            "trainable_parameters": sum(p.numel() for p in student.soft_prompt.parameters()),
            "val_accuracy_one_step": accuracy.history[-1] if accuracy.history else None,
            "val_one_step_4_latents": latents, "diagnostics": module.diagnostics(), "curve": accuracy.history}


def teacher_reference(teacher_dir: Path, record, base_dir: Path) -> tuple[str, str | None]:
    """How a saved student names its base, as the user gave it: the teacher directory of a built-in
    teacher, or the checkpoint (path or hub id) ``teacher.checkpoint`` named, with the hub revision
    it was downloaded at."""
    from pipeline.models.checkpoint_io import hub_revision, looks_like_hub_id

    if record.checkpoint == ".":
        return str(teacher_dir), None
    return record.checkpoint, hub_revision(Path(base_dir)) if looks_like_hub_id(record.checkpoint) else None


def latent_validation(student: Student, rows, tokenizer, layout, samples: int = 4, scorer: Scorer | None = None) -> dict:
    """One step, greedy given each of ``samples`` latents per validation prompt: accuracy over all
    completions and distinct valid completions per prompt, per task."""
    from pipeline.generation.decode import complete_split

    records, _ = complete_split(student.eval(), rows, tokenizer, {layout.pad_token_id}, layout, steps=1,
                                samples=samples)
    metrics = score_records(records, scorer)
    return {"accuracy": {task: round(m["accuracy"], 4) for task, m in metrics.items()},
            "distinct_valid": {task: round(m["distinct_valid"], 3) for task, m in metrics.items()
                               if "distinct_valid" in m}}
