"""Held-out evaluation: the teacher at 1, 2, 4, ..., ``gen_length`` steps against the one-step
student, with and without classifier-free guidance, greedy and sampled, in one run. This module
decodes and scores (validation during training uses it too); ``pipeline.evaluation.report`` turns
the results into metrics, tables and plots.

Every setting decodes the whole test split in batches of the same number of prompts on the same
device, so its wall seconds per sample are comparable with the others'. Forward passes per sample:
the sampler calls the network once per step, and CFG sends each row twice (conditional and
unconditional), so it counts double (a test counts the calls).

Scoring is ``pipeline.data.scoring``: rows of the built-in task suite are judged by their task, rows of
external data by exact match with the reference answer.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from pipeline.data.prepare import Layout
from pipeline.core.errors import DataError
from pipeline.generation.sampler import (CounterNoise, completion_latents, completion_seeds, field_seeds, generate,
                               mask_predictor)
from pipeline.data.scoring import score_records
from pipeline.data.tokenizer import decode_answer


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way of decoding the test split."""

    model: str
    """``teacher`` or ``student``."""
    steps: int
    block_length: int
    """Semi-autoregressive block length of the sampler (the student fills the whole answer at once)."""
    cfg_scale: float
    temperature: float
    samples: int
    """Completions per prompt."""
    noise: str = "per_step"
    """Sampling noise: ``per_step`` (fresh draws from a seeded generator at every step), ``fixed`` or
    ``shared`` (counter-based Gumbel fields, as stage one's ``cache.rollouts.noise``)."""

    @property
    def forward_passes(self) -> int:
        """Network evaluations per completion: one per step, two with CFG."""
        return self.steps * (2 if self.cfg_scale > 0 else 1)

    @property
    def name(self) -> str:
        decoding = "greedy" if self.temperature == 0 else f"sampled_t{self.temperature:g}"
        decoding += f"x{self.samples}" if self.samples > 1 else ""
        guidance = f"_cfg{self.cfg_scale:g}" if self.cfg_scale > 0 else ""
        noise = f"_{self.noise}_noise" if self.noise != "per_step" else ""
        return f"{self.model}_steps{self.steps}_{decoding}{guidance}{noise}"


def default_teacher_steps(gen_length: int, num_blocks: int = 1) -> list[int]:
    """``num_blocks`` times 1, 2, 4, ... below ``gen_length``, then ``gen_length`` itself (the
    sampler needs a whole number of steps per block)."""
    steps, n = [], num_blocks
    while n < gen_length:
        steps.append(n)
        n *= 2
    return steps + [gen_length]


def settings_for(teacher_steps: list[int], cfg_scale: float, temperature: float, samples: int,
                 gen_length: int, block_length: int | None = None, noise_variants: list[str] = (),
                 student_latents: bool = False) -> list[Setting]:
    """Teacher at each step count (blocks of ``block_length``, default the whole answer) and the
    student at one step; each greedy and sampled, each without and (when ``cfg_scale > 0``) with
    guidance; then the teacher at ``gen_length`` steps sampled with each of ``noise_variants``; then,
    for a student with a latent, the student at one step greedy given each of ``samples`` latents."""
    guidance = [0.0] + ([cfg_scale] if cfg_scale > 0 else [])
    decodings = [(0.0, 1), (temperature, samples)]
    models = [("teacher", n, block_length or gen_length) for n in teacher_steps] + [("student", 1, gen_length)]
    return [Setting(model, steps, block, w, temp, k)
            for model, steps, block in models for w in guidance for temp, k in decodings] + [
        Setting("teacher", gen_length, block_length or gen_length, 0.0, temperature, samples, noise)
        for noise in noise_variants] + (
        [Setting("student", 1, gen_length, 0.0, 0.0, samples)] if student_latents and samples > 1 else [])


def completion_noise(noise: str, seed: int, rows: torch.Tensor, samples: torch.Tensor, num_fields: int):
    """The counter-based noise of completions (row, sample) under ``fixed`` (one field per
    completion) or ``shared`` (sample i of every row uses field i mod ``num_fields``)."""
    if noise == "fixed":
        return CounterNoise(completion_seeds(seed, rows, samples), fixed=True)
    if noise == "shared":
        return CounterNoise(field_seeds(seed, samples % num_fields), fixed=True)
    raise ValueError(f"noise must be 'fixed' or 'shared', got {noise!r}")


@torch.inference_mode()
def complete_split(
    model,
    rows,
    tokenizer,
    stops: set[int],
    layout: Layout,
    steps: int,
    block_length: int | None = None,
    cfg_scale: float = 0.0,
    temperature: float = 0.0,
    samples: int = 1,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    noise: str = "per_step",
    seed: int = 0,
    num_fields: int = 4,
) -> tuple[list[dict], float]:
    """Decode every row of a tokenized split (``input_ids``, ``attention_mask``, ``prompt``,
    ``answer``, and ``task`` for the built-in suite) ``samples`` times with ``model`` (a LLaDA or a
    Student); returns records ``{"prompt", "answer", "completions"[, "task"]}`` in row order and the
    wall seconds spent in generation. Sampling noise: fresh draws from ``generator`` (``per_step``),
    or ``completion_noise(noise, seed, ...)``. A student with a latent decodes completion (row, i)
    given ``completion_latents(seed, row, i)``."""
    missing = {"input_ids", "attention_mask", "prompt", "answer"} - set(rows.column_names)
    if missing:
        raise DataError(f"the split to decode lacks the columns {sorted(missing)}")
    predictor = mask_predictor(model)
    device = next(model.parameters()).device
    mask_id = (model.base if hasattr(model, "base") else model).config.mask_token_id
    latent_dim = getattr(model, "latent_dim", 0)
    P, G = layout.prompt_length, layout.gen_length
    ids = torch.as_tensor(rows["input_ids"])[:, :P].long()  # (N, P)
    attention = torch.as_tensor(rows["attention_mask"])[:, :P].long()
    order = torch.arange(len(ids)).repeat_interleave(samples)  # (N * samples,)
    sample_index = torch.arange(samples).repeat(len(ids))
    completions: list[list[str]] = [[] for _ in range(len(ids))]
    seconds = 0.0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        draws = sample_index[start : start + batch_size]
        coupled = None if noise == "per_step" else completion_noise(noise, seed, index, draws, num_fields)
        if latent_dim:
            predictor = mask_predictor(model, completion_latents(seed, index, draws, latent_dim).to(device))
        began = time.perf_counter()
        out = generate(predictor, ids[index].to(device), attention[index].to(device), steps=steps, gen_length=G,
                       block_length=block_length or G, temperature=temperature, cfg_scale=cfg_scale, mask_id=mask_id,
                       generator=generator, noise=coupled)
        answers = out[:, P:].tolist()  # the copy to the host waits for the device
        seconds += time.perf_counter() - began
        for row, answer in zip(index.tolist(), answers):
            completions[row].append(decode_answer(tokenizer, answer, stops))
    records = [{"prompt": p, "answer": a, "completions": c}
               for p, a, c in zip(rows["prompt"], rows["answer"], completions)]
    if "task" in rows.column_names:
        for record, task in zip(records, rows["task"]):
            record["task"] = task
    return records, seconds


def evaluate_settings(models: dict, settings: list[Setting], rows, tokenizer, stops: set[int], layout: Layout,
                      batch_size: int, seed: int, timing_repeats: int = 1, progress=None,
                      num_fields: int = 4) -> list[dict]:
    """One result row per setting: accuracy per task (and ``distinct_valid`` for many-answer tasks),
    forward passes and wall seconds per completion. ``models`` maps ``teacher``/``student`` to
    networks. One warm-up batch per (model, guidance, sampling) keeps one-off costs (allocations,
    kernel selection) out of the timings, and greedy settings (deterministic) are timed
    ``timing_repeats`` times, keeping the fastest (the least disturbed)."""
    warmup = rows.select(range(min(len(rows), batch_size)))
    for model, cfg_scale, temperature in sorted({(s.model, s.cfg_scale, s.temperature) for s in settings}):
        complete_split(models[model], warmup, tokenizer, stops, layout, steps=1, cfg_scale=cfg_scale,
                       temperature=temperature)
    results = []
    for setting in settings:
        device = next(models[setting.model].parameters()).device
        times = []
        for _ in range(timing_repeats if setting.temperature == 0 else 1):
            records, seconds = complete_split(
                models[setting.model], rows, tokenizer, stops, layout, setting.steps, setting.block_length,
                setting.cfg_scale, setting.temperature, setting.samples, batch_size,
                torch.Generator(device=device).manual_seed(seed), setting.noise, seed, num_fields,
            )
            times.append(seconds)
        seconds = min(times)
        metrics = score_records(records)
        results.append({
            **dataclasses.asdict(setting),
            "name": setting.name,
            "forward_passes": setting.forward_passes,
            "seconds_per_sample": seconds / (len(records) * setting.samples),
            "accuracy": {task: m["accuracy"] for task, m in metrics.items()},
            "distinct_valid": {task: m["distinct_valid"] for task, m in metrics.items() if "distinct_valid" in m},
        })
        if progress is not None:
            progress(results[-1])
    return results
