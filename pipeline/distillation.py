"""Stage two in Lightning: MeanFlow distillation of the student from the teacher cache.

The network is the plain ``Student`` (frozen LLaDA + soft prompt); ``MeanFlowDistillation`` is a thin
LightningModule around the pure functions of ``pipeline.meanflow``. The data module serves
mini-batches cut from the cache's record batches, so a sample is a contiguous slice of one
decompressed Arrow batch (no per-row decoding), and Lightning's distributed sampler gives every rank
the same number of mini-batches.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from pipeline.config import StudentParams
from pipeline.lr_schedule import warmup_cosine
from pipeline.meanflow import MeanFlowLoss, counter_uniform, dense_logprobs, meanflow_loss, sample_r
from pipeline.student import Student
from pipeline.teacher_cache import open_cache, record_batch_arrays


# The frozen base stays in eval mode on purpose (Student.train keeps it there).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def collate_rows(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors of a block of cache rows: per row (B,) / (B, L), ``masked`` (B, L) bool, and the
    teacher's top-k (M, k) in the row-major order of ``masked``."""
    n, length = arrays["input_ids"].shape
    rows = np.repeat(np.arange(n), np.diff(arrays["offsets"]))
    masked = torch.zeros(n, length, dtype=torch.bool)
    masked[torch.from_numpy(rows), torch.from_numpy(arrays["masked_positions"].astype(np.int64))] = True
    tensor = lambda key, dtype: torch.from_numpy(np.array(arrays[key])).to(dtype)  # noqa: E731  (copy: Arrow memory is read-only)
    return {
        "input_ids": tensor("input_ids", torch.long),
        "attention_mask": tensor("attention_mask", torch.long),
        "x0": tensor("x0", torch.long),
        "t": tensor("t", torch.float32),
        "example_index": tensor("example_index", torch.long),
        "sample_index": tensor("sample_index", torch.long),
        "masked": masked,
        "topk_ids": tensor("topk_ids", torch.long),
        "topk_logprobs": tensor("topk_logprobs", torch.float32),
    }


class CacheMiniBatches(torch.utils.data.Dataset):
    """Item i = rows [start, stop) of one record batch of the cache, collated. The cache is opened
    lazily in each worker process (memory maps do not cross process boundaries)."""

    def __init__(self, cache_dir: str | Path, batch_size: int, verify: bool = True):
        self.cache_dir, self.batch_size = Path(cache_dir), batch_size
        cache = open_cache(self.cache_dir, verify=verify)
        self.manifest = cache.manifest
        self.chunks = [
            (j, start, min(start + batch_size, rows))
            for j, (_, _, rows) in enumerate(cache.batch_index)
            for start in range(0, rows, batch_size)
        ]
        self._cache = None

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._cache is None:
            self._cache = open_cache(self.cache_dir, verify=False)
        j, start, stop = self.chunks[i]
        return collate_rows(record_batch_arrays(self._cache.record_batch(j).slice(start, stop - start)))

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}


class TeacherCacheDataModule(L.LightningDataModule):
    def __init__(self, cache_dir: str | Path, batch_size: int, num_workers: int = 0, shuffle: bool = True,
                 seed: int = 0):
        super().__init__()
        self.cache_dir, self.batch_size, self.num_workers, self.shuffle = Path(cache_dir), batch_size, num_workers, shuffle
        self.seed = seed
        self.dataset: CacheMiniBatches | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:  # checksums are read once, by rank 0, not by every rank
            verify = self.trainer is None or self.trainer.is_global_zero
            self.dataset = CacheMiniBatches(self.cache_dir, self.batch_size, verify=verify)

    def train_dataloader(self):
        # Items are whole mini-batches (batch_size=None), so the sampler is ours to choose: under
        # DDP a DistributedSampler gives each rank a disjoint slice and (padding by repetition) the
        # same number of steps; Lightning calls its set_epoch.
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(
                self.dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                shuffle=self.shuffle, seed=self.seed,
            )
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=sampler, shuffle=self.shuffle if sampler is None else None,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )


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
