"""What a training run reports besides its losses: the learning rate, throughput and peak memory, to
every logger (``student.log_every_n_steps``)."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch

from pipeline.cache.loader import TrainingItem


def rows_and_tokens(item: TrainingItem) -> tuple[int, int]:
    """Rows (cache rows and rollouts) in one training step's batches, and their tokens."""
    rows = tokens = 0
    if item.meanflow is not None:
        n, length = item.meanflow.input_ids.shape  # (B, L)
        rows, tokens = rows + n, tokens + n * length
    if item.rollouts is not None:
        n = item.rollouts.tokens.shape[0]
        rows, tokens = rows + n, tokens + n * (item.rollouts.prompt_ids.shape[1] + item.rollouts.tokens.shape[1])
    return rows, tokens


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process has held: CUDA's allocator on a GPU, the resident set otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


class TrainingMonitor(L.Callback):
    """Logs ``perf/rows_per_second`` and ``perf/tokens_per_second`` (all processes: this one's rate
    times the world size, over the steps since the previous log) and ``perf/peak_memory_gb`` (this
    process). The learning rate comes from Lightning's ``LearningRateMonitor`` beside it."""

    def __init__(self):
        self.rows = self.tokens = 0
        self.since: float | None = None
        self.logged_step = -1  # with gradient accumulation, several batches end at one step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.since is None:
            self.since = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows, tokens = rows_and_tokens(batch)
        self.rows, self.tokens = self.rows + rows, self.tokens + tokens
        step = trainer.global_step
        if step % trainer.log_every_n_steps or step == self.logged_step or not trainer.loggers:
            return
        self.logged_step = step
        seconds = time.perf_counter() - self.since
        world = trainer.world_size
        metrics = {"perf/rows_per_second": world * self.rows / seconds,
                   "perf/tokens_per_second": world * self.tokens / seconds,
                   "perf/peak_memory_gb": peak_memory_gb(pl_module.device)}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self.rows = self.tokens = 0
        self.since = time.perf_counter()
