"""Validation by generation: decode the validation prompts and score them with the task suite.

Used as a Lightning callback by teacher pretraining (at ``gen_length`` steps) and student
distillation (one step), so the learning curve that matters is logged, not just the loss.
"""

from __future__ import annotations

import lightning as L

from pipeline.data.layout import Layout
from pipeline.data.scoring import score_records
from pipeline.generation.decode import complete_split


class GenerationAccuracy(L.Callback):
    """Every ``every_n_steps`` (and at the end), greedy-decode the validation prompts with ``steps``
    steps and log task accuracy under ``val/accuracy/{task}``. ``model_of(pl_module)`` picks the
    network to decode with."""

    def __init__(self, val_split, tokenizer, stops: set[int], layout: Layout, every_n_steps: int, steps: int,
                 model_of=lambda module: module.model, batch_size: int = 256):
        self.rows = val_split
        self.tokenizer, self.stops, self.layout = tokenizer, stops, layout
        self.every_n_steps, self.steps, self.model_of, self.batch_size = every_n_steps, steps, model_of, batch_size
        self.history: list[dict] = []

    def evaluate(self, model) -> dict:
        was_training = model.training
        model.eval()
        records, _ = complete_split(model, self.rows, self.tokenizer, self.stops, self.layout, steps=self.steps,
                                    batch_size=self.batch_size)
        model.train(was_training)
        return score_records(records)

    def record(self, trainer, pl_module) -> None:
        metrics = self.evaluate(self.model_of(pl_module))
        self.history.append({"step": trainer.global_step, **{k: v["accuracy"] for k, v in metrics.items()}})
        if trainer.logger is not None:
            accuracy = {f"val/accuracy/{task}": values["accuracy"] for task, values in metrics.items()}
            trainer.logger.log_metrics(accuracy, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0:
            self.record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and (not self.history or self.history[-1]["step"] != trainer.global_step):
            self.record(trainer, pl_module)
