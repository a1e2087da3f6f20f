"""Pretraining the built-in teacher with LLaDA's SFT objective, in Lightning.

Per sequence t ~ U(eps, 1]; each answer token (EOS padding included) is masked with probability t;
the prompt is never masked. Loss: cross-entropy on masked tokens, each weighted 1/t, summed and
normalized by the answer length and the batch size (LLaDA's SFT loss).
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from pipeline.core.errors import ParamsError, TrainingError
from pipeline.core.lr_schedule import warmup_cosine
from pipeline.data.layout import Layout, forward_mask, load_split, sample_mask_ratio
from pipeline.generation.accuracy import GenerationAccuracy
from pipeline.models.llada import LLaDA


def sft_loss(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, answer_length: int):
    """LLaDA's SFT loss: sum over masked tokens of CE / t, divided by answer length and batch size.

    logits (B, L, V), x0 (B, L), masked (B, L) bool, t (B,)."""
    token_ce = F.cross_entropy(logits[masked].float(), x0[masked], reduction="none")  # (N,)
    weights = (1.0 / t)[:, None].expand_as(masked)[masked]  # (N,)
    return (token_ce * weights).sum() / (answer_length * x0.shape[0])


class MaskedDiffusionSFT(L.LightningModule):
    """Trains every weight of a ``LLaDA`` as a mask predictor on fixed-layout sequences."""

    def __init__(self, model: LLaDA, layout: Layout, lr: float, weight_decay: float, warmup_steps: int,
                 max_steps: int, min_mask_ratio: float):
        super().__init__()
        self.model = model
        self.layout = layout
        self.save_hyperparameters(ignore=["model", "layout"])

    def masked_batch(self, batch, generator=None):
        x0 = batch["input_ids"].long()
        t = sample_mask_ratio(x0.shape[0], self.hparams.min_mask_ratio, generator, x0.device, stratified=True)
        x_t, masked = forward_mask(x0, t, self.layout.prompt_length, self.model.config.mask_token_id, generator)
        return x0, x_t, masked, t

    def loss(self, batch, generator=None):
        x0, x_t, masked, t = self.masked_batch(batch, generator)
        logits = self.model(input_ids=x_t, attention_mask=batch["attention_mask"])
        return sft_loss(logits, x0, masked, t, self.layout.gen_length)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if not torch.isfinite(loss):  # stop here: a diverged teacher would pass for a trained one
            raise TrainingError(f"non-finite teacher loss ({loss.item()}) at step {self.global_step}; lower "
                                f"teacher.train.lr (now {self.hparams.lr})")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        # The same masks every validation run, so the curve is comparable across steps.
        generator = torch.Generator(device=batch["input_ids"].device).manual_seed(batch_idx)
        self.log("val/loss", self.loss(batch, generator), prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=(0.9, 0.95),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.hparams.warmup_steps, self.hparams.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class SequenceDataModule(L.LightningDataModule):
    """Tokenized ``train``/``val`` splits written by ``prepare_data`` (``datasets`` on disk).

    With ``task_weights``, training rows are drawn with replacement at a rate proportional to their
    task's weight (a seeded sampler: the same rows in the same order on every run); otherwise each
    epoch is a seeded shuffle."""

    def __init__(self, data_dir: str | Path, batch_size: int, num_workers: int = 0,
                 task_weights: dict[str, float] | None = None, seed: int = 0):
        super().__init__()
        self.data_dir, self.batch_size, self.num_workers = Path(data_dir), batch_size, num_workers
        self.task_weights, self.seed = task_weights, seed

    def split(self, name: str):
        return load_split(self.data_dir, name)

    @functools.cached_property
    def train_split(self):
        return self.split("train")

    @functools.cached_property
    def row_weights(self) -> torch.Tensor:
        """(N,) sampling weight of each training row: its task's weight. Weights that do not fit the
        data raise ``ParamsError`` naming the key."""
        train = self.train_split
        where = f"teacher.train.task_weights ({self.data_dir / 'train'})"
        if "task" not in train.column_names:
            raise ParamsError(f"{where}: the data has no task column (only the built-in suite has tasks); "
                              "set task_weights to null")
        tasks = train["task"]
        present = sorted(set(tasks))
        missing = [task for task in present if task not in self.task_weights]  # absent tasks' weights are unused
        if missing:
            raise ParamsError(f"{where}: no weight for the data's tasks {missing}")
        if not any(self.task_weights[task] > 0 for task in present):
            raise ParamsError(f"{where}: every task in the data ({present}) has weight 0")
        return torch.tensor([float(self.task_weights[task]) for task in tasks], dtype=torch.float64)

    def train_dataloader(self):
        train = self.train_split
        generator = torch.Generator().manual_seed(self.seed)
        if self.task_weights is None:
            sampler = torch.utils.data.RandomSampler(train, generator=generator)
        else:
            sampler = torch.utils.data.WeightedRandomSampler(self.row_weights, num_samples=len(train),
                                                             replacement=True, generator=generator)
        return torch.utils.data.DataLoader(
            train.with_format("torch", columns=["input_ids", "attention_mask"]), batch_size=self.batch_size,
            sampler=sampler, drop_last=True, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self):
        val = self.split("val").with_format("torch", columns=["input_ids", "attention_mask"])
        return torch.utils.data.DataLoader(val, batch_size=self.batch_size, num_workers=self.num_workers)


def pretrain_teacher(params, data_dir: Path, out_dir: Path, metrics_dir: Path) -> dict:
    """Pretrain the built-in teacher on ``data_dir`` and save it to ``out_dir`` (atomically) as a
    LLaDA checkpoint directory with its tokenizer and ``teacher.json``. Returns a summary."""
    import json
    import time

    from dvclive.lightning import DVCLiveLogger

    from pipeline.core.files import atomic_directory, writing
    from pipeline.core.time_cap import check_not_cut, time_limit
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.models.checkpoint_check import first_non_finite
    from pipeline.models.checkpoint_io import checkpoint_fingerprint
    from pipeline.models.llada import LLaDAConfig
    from pipeline.teacher.artifact import TeacherRecord, tokenizer_hash

    train = params.train
    L.seed_everything(train.seed, workers=True)
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    layout = Layout.load(data_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    config = LLaDAConfig(
        **vars(params.model), vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
        eos_token_id=layout.pad_token_id, pad_token_id=layout.pad_token_id, max_sequence_length=layout.length,
    )
    model = LLaDA(config).init_weights(std=0.02)
    module = MaskedDiffusionSFT(model, layout, train.lr, train.weight_decay, train.warmup_steps, train.max_steps,
                                train.min_mask_ratio)
    accuracy = GenerationAccuracy(load_split(data_dir, "val"), tokenizer,
                                  {layout.pad_token_id}, layout, every_n_steps=max(1, train.max_steps // 20),
                                  steps=layout.gen_length)
    trainer = L.Trainer(
        max_steps=train.max_steps,
        max_time=time_limit(train.max_minutes),
        accelerator="auto",
        devices=1,
        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
        gradient_clip_val=1.0,
        val_check_interval=max(1, train.max_steps // 20),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=DVCLiveLogger(dir=str(metrics_dir), save_dvc_exp=False, dvcyaml=False),
        callbacks=[accuracy],
        log_every_n_steps=10,
    )
    data = SequenceDataModule(data_dir, train.batch_size, task_weights=train.task_weights, seed=train.seed)
    if train.task_weights is not None:
        data.row_weights  # refuse weights that do not fit the data before training (computed once)
    if train.batch_size > len(data.train_split):  # batches are full (drop_last): none would be drawn
        raise ParamsError(f"params.yaml:teacher.train.batch_size: {train.batch_size} is more than the "
                          f"{len(data.train_split)} training examples in {data_dir / 'train'}: not one step could run")
    started = time.perf_counter()
    with writing(metrics_dir):  # the logger's files; a full disk there is one line naming it
        trainer.fit(module, datamodule=data)
    minutes = (time.perf_counter() - started) / 60
    check_not_cut(trainer.global_step, train.max_steps, train.max_minutes, "teacher.train.max_minutes")
    model.cpu().eval()
    broken = first_non_finite(model)
    if broken is not None:
        raise TrainingError(f"the pretrained teacher's {broken} is not finite; lower teacher.train.lr (now {train.lr})")
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(str(tmp))
        generation = {"eos_token_id": layout.pad_token_id, "pad_token_id": layout.pad_token_id,
                      "gen_length": layout.gen_length}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        full = params.fingerprint == "full"
        TeacherRecord(checkpoint=".", fingerprint=checkpoint_fingerprint(tmp, full=full), mask_token_id=config.mask_token_id,
                      tokenizer_sha256=tokenizer_hash(tmp), builtin=True, fingerprint_full=full).save(tmp)
    return {"steps": trainer.global_step, "minutes": round(minutes, 2), "parameters": sum(p.numel() for p in model.parameters()),
            "val_accuracy": accuracy.history[-1], "curve": accuracy.history}
