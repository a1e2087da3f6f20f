"""Stage two in Lightning: MeanFlow distillation of the student from the teacher cache.

The network is the plain ``Student`` (frozen LLaDA + soft prompt); ``MeanFlowDistillation`` is a thin
LightningModule around ``pipeline.meanflow.meanflow_loss``; batches come from
``pipeline.teacher_cache_loader``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch

from pipeline.config import StudentParams
from pipeline.lr_schedule import warmup_cosine
from pipeline.counter_random import counter_uniform
from pipeline.meanflow import MeanFlowLoss, dense_logprobs, meanflow_loss, sample_r
from pipeline.student import Student
from pipeline.teacher_cache_loader import TeacherCacheDataModule


# The frozen base stays in eval mode on purpose (Student.train keeps it there).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class MeanFlowDistillation(L.LightningModule):
    """Trains ``student.soft_prompt`` on u_tgt = v - (t - r) du/dt; checkpoints hold only the soft prompt."""

    def __init__(self, student: Student, params: StudentParams, gen_length: int):
        super().__init__()
        self.student, self.params, self.gen_length = student, params, gen_length
        self.strict_loading = False  # checkpoints omit the frozen base

    def forward_step(self, batch) -> MeanFlowLoss:
        """The objective on a cache batch. r comes from a counter-based hash of (seed, epoch, example,
        sample), so a row draws the same r on any rank; v is rebuilt from the cached top-k."""
        p = self.params
        keys = (p.seed, self.current_epoch, batch["example_index"], batch["sample_index"])
        r = sample_r(batch["t"], p.equal_fraction, uniforms=(counter_uniform(*keys, 1), counter_uniform(*keys, 2)))
        v = dense_logprobs(batch["topk_ids"], batch["topk_logprobs"], self.student.base.config.embedding_size, p.tail)
        return meanflow_loss(self.student, batch["input_ids"], batch["attention_mask"], batch["masked"], batch["t"], r, v,
                             p, self.gen_length, batch["x0"])

    def training_step(self, batch, batch_idx):
        out = self.forward_step(batch)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite MeanFlow loss ({out.loss.item()}) at step {self.global_step}; |du/dt| = "
                f"{out.du_dt_abs.item():.3g}. Lower student.lr or student.soft_prompt.max_frequency, or use tangent=seed."
            )
        kl, equal = out.kl, out.equal
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/du_dt_abs", out.du_dt_abs)
        if equal.any():
            self.log("train/kl_r_eq_t", kl[equal].mean())
        if (~equal).any():
            self.log("train/kl_r_lt_t", kl[~equal].mean())
        return out.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.student.soft_prompt.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    def configure_optimizers(self):
        p = self.params
        optimizer = torch.optim.AdamW(self.student.soft_prompt.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, p.warmup_steps, p.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("student.base.")}


def check_cache_matches_teacher(cache_dir: Path, record) -> None:
    from pipeline.errors import CacheError
    from pipeline.teacher_cache import read_manifest

    manifest = read_manifest(Path(cache_dir))
    if manifest["teacher_fingerprint"] != record.fingerprint:
        raise CacheError(f"{cache_dir}: built by teacher {manifest['teacher_fingerprint']}, but the teacher is "
                         f"{record.fingerprint}; rerun cache_teacher")


def train_student(params: StudentParams, teacher_dir: Path, cache_dir: Path, data_dir: Path, out_dir: Path,
                  metrics_dir: Path, checkpoint_dir: Path, resume: Path | None = None) -> dict:
    """Distil a student from the cache and save it (soft prompt + base pointer) to ``out_dir``.
    Returns a summary on global rank 0, None on the other ranks."""
    import datetime
    import time

    import datasets
    from dvclive.lightning import DVCLiveLogger
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pipeline.data import Layout
    from pipeline.generation_accuracy import GenerationAccuracy
    from pipeline.teacher import load_teacher

    L.seed_everything(params.seed, workers=True)
    base, tokenizer, record = load_teacher(teacher_dir)
    check_cache_matches_teacher(cache_dir, record)
    layout = Layout.load(data_dir)
    student = Student(base, config=params.soft_prompt)
    module = MeanFlowDistillation(student, params, layout.gen_length)
    accuracy = GenerationAccuracy(datasets.load_from_disk(str(data_dir / "val")), tokenizer, {layout.pad_token_id},
                                  layout, every_n_steps=params.eval_every, steps=1, model_of=lambda m: m.student)
    on_gpu = torch.cuda.is_available()
    trainer = L.Trainer(
        max_steps=params.max_steps,
        max_time=datetime.timedelta(minutes=params.max_minutes),
        accelerator="auto",
        devices=params.devices,
        strategy=params.strategy,
        precision=params.precision or ("bf16-mixed" if on_gpu else "32-true"),
        logger=DVCLiveLogger(dir=str(metrics_dir / "training"), save_dvc_exp=False, dvcyaml=False),
        callbacks=[accuracy, ModelCheckpoint(dirpath=str(checkpoint_dir), save_last=True, every_n_train_steps=params.eval_every)],
        log_every_n_steps=10,
        gradient_clip_val=1.0,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=TeacherCacheDataModule(cache_dir, params.batch_size, params.num_workers,
                                                          seed=params.seed),
                ckpt_path=str(resume) if resume else None)
    if not trainer.is_global_zero:
        return None
    student.cpu().save_pretrained(out_dir)
    return {"steps": trainer.global_step, "minutes": round((time.perf_counter() - started) / 60, 2),
            "trainable_parameters": sum(p.numel() for p in student.soft_prompt.parameters()),
            "val_accuracy_one_step": accuracy.history[-1] if accuracy.history else None, "curve": accuracy.history}
