"""Validation by generation: decode the validation prompts and score them with the task suite.

Used as a Lightning callback by teacher pretraining (at ``gen_length`` steps) and student
distillation (one step), so the learning curve that matters is logged, not just the loss.
"""

from __future__ import annotations

import lightning as L
import torch

from pipeline.data import Layout
from pipeline.generate import generate, mask_predictor
from pipeline.tasks import score
from pipeline.tokenizer import decode_answer


def mask_id_of(model) -> int:
    """The mask id of a LLaDA or of a student's base."""
    return (model.base if hasattr(model, "base") else model).config.mask_token_id


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

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        was_training = model.training
        model.eval()
        predictor = mask_predictor(model)
        device = next(model.parameters()).device
        P, G = self.layout.prompt_length, self.layout.gen_length
        records = []
        for start in range(0, len(self.rows), self.batch_size):
            rows = self.rows[start : start + self.batch_size]
            ids = torch.as_tensor(rows["input_ids"])[:, :P].long().to(device)
            mask = torch.as_tensor(rows["attention_mask"])[:, :P].long().to(device)
            out = generate(predictor, ids, mask, steps=self.steps, gen_length=G, block_length=G, mask_id=mask_id_of(model))
            for prompt, answer in zip(rows["prompt"], out[:, P:].tolist()):
                records.append({"prompt": prompt, "completions": [decode_answer(self.tokenizer, answer, self.stops)]})
        model.train(was_training)
        return score(records)

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
            metrics = self.evaluate(self.model_of(pl_module))
            self.history.append({"step": trainer.global_step, **{k: v["accuracy"] for k, v in metrics.items()}})
