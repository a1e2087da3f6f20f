"""Decode a tokenized split with a mask predictor (the teacher at N steps, or the one-step student) into
records scored by ``pipeline.data.scoring``: the evaluation's settings and the validation accuracy
during training both decode through here."""

from __future__ import annotations

import time

import torch

from pipeline.core.errors import DataError
from pipeline.data.layout import Layout
from pipeline.data.tokenizer import decode_answer
from pipeline.generation.noise import completion_latents, completion_noise
from pipeline.generation.sampler import SamplerOptions, generate, sampler_network


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
    predictor = sampler_network(model)
    device = next(model.parameters()).device
    mask_id = (model.base if hasattr(model, "base") else model).config.mask_token_id
    latent_dim = getattr(model, "latent_dim", 0)
    P, G = layout.prompt_length, layout.gen_length
    options = SamplerOptions(gen_length=G, steps=steps, block_length=block_length, temperature=temperature,
                             cfg_scale=cfg_scale)
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
            predictor = sampler_network(model, completion_latents(seed, index, draws, latent_dim).to(device))
        began = time.perf_counter()
        out = generate(predictor, ids[index].to(device), options, mask_id=mask_id,
                       attention_mask=attention[index].to(device), generator=generator, noise=coupled)
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
