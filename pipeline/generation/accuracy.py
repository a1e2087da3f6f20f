"""Validation by generation: decode the validation prompts and score them with the task suite.

Used as a Lightning callback by teacher pretraining (at ``gen_length`` steps) and student
distillation (one step, and more step counts), so the learning curve that matters is logged, not
just the loss.
"""

from __future__ import annotations

import lightning as L

from pipeline.data.layout import Layout
from pipeline.data.scoring import Scorer, score_records
from pipeline.generation.decode import complete_split


class GenerationAccuracy(L.Callback):
    """Every ``every_n_steps`` (and at the end), greedy-decode the validation prompts with ``steps``
    steps, judge them with ``scorer`` (default ``builtin``) and log task accuracy under ``val/accuracy/{task}``, and with each of ``more_steps`` under
    ``val/accuracy_steps{n}/{task}`` (history keys ``{task}_steps{n}``). ``model_of(pl_module)`` picks
    the network to decode with."""

    def __init__(self, val_split, tokenizer, stops: set[int], layout: Layout, every_n_steps: int, steps: int,
                 model_of=lambda module: module.model, batch_size: int = 256, more_steps: tuple[int, ...] = (),
                 scorer: Scorer | None = None):
        self.rows = val_split
        self.tokenizer, self.stops, self.layout = tokenizer, stops, layout
        self.every_n_steps, self.steps, self.model_of, self.batch_size = every_n_steps, steps, model_of, batch_size
        self.more_steps = tuple(n for n in more_steps if n != steps)
        self.scorer = scorer
        self.history: list[dict] = []

    def evaluate(self, model, steps: int | None = None) -> dict:
        was_training = model.training
        model.eval()
        records, _ = complete_split(model, self.rows, self.tokenizer, self.stops, self.layout,
                                    steps=steps or self.steps, batch_size=self.batch_size)
        model.train(was_training)
        return score_records(records, self.scorer)

    def record(self, trainer, pl_module) -> None:
        model = self.model_of(pl_module)
        entry = {"step": trainer.global_step, **{k: v["accuracy"] for k, v in self.evaluate(model).items()}}
        logged = {f"val/accuracy/{task}": value for task, value in entry.items() if task != "step"}
        for n in self.more_steps:
            accuracy = {task: values["accuracy"] for task, values in self.evaluate(model, n).items()}
            entry.update({f"{task}_steps{n}": value for task, value in accuracy.items()})
            logged.update({f"val/accuracy_steps{n}/{task}": value for task, value in accuracy.items()})
        self.history.append(entry)
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)

    def state_dict(self) -> dict:
        """The history so far, kept in checkpoints: a resumed run reports the whole curve."""
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # with gradient accumulation, several batches end at one step: once
        recorded = bool(self.history) and self.history[-1]["step"] == step
        if trainer.is_global_zero and step % self.every_n_steps == 0 and not recorded:
            self.record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and (not self.history or self.history[-1]["step"] != trainer.global_step):
            self.record(trainer, pl_module)
