"""Decode a tokenized split with a mask predictor (the teacher at N steps, or the one-step student) into
records scored by ``pipeline.data.scoring``: the evaluation's settings and the validation accuracy
during training both decode through here."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from pipeline.core.counter_random import COMPLETION_LATENT, DECODE_BATCH, counter_hash
from pipeline.core.errors import CheckpointError, DataError
from pipeline.data.layout import Layout
from pipeline.data.tokenizer import decode_answer
from pipeline.generation.noise import completion_noise
from pipeline.generation.sampler import SamplerNetwork, SamplerOptions, generate, sampler_network
from pipeline.models.checkpoint_io import generation_hints


def uses_anchor(model, temperature: float, samples: int) -> bool:
    """Whether completions decode with the student's greedy anchor: greedy decoding of one completion
    per prompt, by a student that has one. Several completions, or sampling, draw a latent each."""
    return getattr(model, "has_anchor", False) and temperature == 0 and samples == 1


def check_answer_length(model, gen_length: int, block_length: int | None = None) -> None:
    """A student whose latent enters the answer positions' inputs decodes answers of the length it
    was built for only (``SoftPromptConfig.latent_answer_positions``); any other student decoding
    another answer length or block length than it was trained for (``Student.trained_for``) warns,
    once per student: it runs, but outside what it learned."""
    config = getattr(model, "soft_prompt_config", None)
    G = config.latent_answer_positions if config is not None else 0
    if G and G != gen_length:
        raise CheckpointError(f"this student's latent enters {G} answer positions (latent_answer_positions); "
                              f"it cannot decode answers of {gen_length} tokens (use --gen-length {G})")
    trained = getattr(model, "trained_for", None) or {}
    asked = {"gen_length": gen_length}
    if block_length not in (None, gen_length):  # one block (one step, or the whole answer) is always in range
        asked["block_length"] = block_length
    differs = {key: value for key, value in asked.items() if key in trained and trained[key] != value}
    if differs and not getattr(model, "warned_length", False):
        model.warned_length = True
        warnings.warn("this student was trained for " + ", ".join(f"{k} {trained[k]}" for k in differs)
                      + "; decoding with " + ", ".join(f"{k} {v}" for k, v in differs.items())
                      + " is outside what it learned", UserWarning, stacklevel=2)


def completion_network(model, seed: int, index: torch.Tensor, draws: torch.Tensor, anchor: bool) -> SamplerNetwork:
    """The sampler's network for completions ``draws`` (N,) of prompts ``index`` (N,): a teacher or a
    student without a latent as it is; a latent student given the greedy anchor (``anchor``) or
    completion (i, d)'s own z from the student's prior, ``prior_latents(seed, COMPLETION_LATENT, i, d)``
    (for a Gaussian prior ``completion_latents(seed, i, d)``; a code book draws a code), whatever the batch."""
    latent_dim = getattr(model, "latent_dim", 0)
    if not latent_dim:
        return sampler_network(model)
    if anchor:
        return sampler_network(model, anchor=True)
    device = next(model.parameters()).device
    return sampler_network(model, model.soft_prompt.prior_latents(seed, COMPLETION_LATENT, index, draws).to(device))


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) (B, W) with each row right-aligned."""
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, tokens in enumerate(batch):
        if tokens:
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
    return ids, mask


def decoding_defaults(checkpoint: Path, trained: dict, is_student: bool, gen_length: int | None = None,
                      steps=None, block_length: int | None = None) -> tuple[int, object, int]:
    """(gen_length, steps, block_length) the caller left unset, as the generate CLI and the lm-eval
    model choose them: the answer length a student was trained for (``Student.trained_for``), else the
    checkpoint's ``generation_config.json`` hint, else 128; one step for a student, ``gen_length``
    for a checkpoint; at several steps the rollouts' blocks the student was trained with, else one
    block."""
    if gen_length is None:
        gen_length = {**generation_hints(checkpoint), **trained}.get("gen_length", 128)
    if steps is None:
        steps = 1 if is_student else gen_length
    if block_length is None:
        block_length = (trained.get("block_length", gen_length)
                        if steps != 1 and gen_length == trained.get("gen_length") else gen_length)
    return gen_length, steps, block_length


def default_step_counts(gen_length: int, num_blocks: int = 1) -> list[int]:
    """``num_blocks`` times 1, 2, 4, ... below ``gen_length``, then ``gen_length`` itself (the
    sampler needs a whole number of steps per block)."""
    steps, n = [], num_blocks
    while n < gen_length:
        steps.append(n)
        n *= 2
    return steps + [gen_length]


def require_columns(rows, *names: str) -> None:
    missing = set(names) - set(rows.column_names)
    if missing:
        raise DataError(f"the split to decode lacks the columns {sorted(missing)}")


def batch_generator(seed: int, batch: int, device) -> torch.Generator:
    """The ``per_step`` noise of batch ``batch`` of a decoded split: a generator seeded by
    ``counter_hash(seed, DECODE_BATCH, batch)``, so a batch draws the same noise whichever process
    decodes it (the draws still depend on the batch size and the device type)."""
    return torch.Generator(device=device).manual_seed(int(counter_hash(seed, DECODE_BATCH, batch)) & (2**63 - 1))


def shard_batches(completions: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> list[slice]:
    """The batches of ``completions`` (in row-major (row, draw) order) that process ``shard = (rank,
    world)`` decodes: every ``world``-th batch from the ``rank``-th, so the batches, and their noise,
    are the same whatever the number of processes."""
    rank, world = shard
    return [slice(start, start + batch_size) for start in range(rank * batch_size, completions, world * batch_size)]


@torch.inference_mode()
def decode_completions(
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
    noise: str = "per_step",
    seed: int = 0,
    num_fields: int = 4,
    shard: tuple[int, int] = (0, 1),
    on_batch=None,
) -> tuple[list[tuple[int, int, str]], float]:
    """Decode the rows of a tokenized split (``input_ids``, ``attention_mask``) ``samples`` times
    each with ``model`` (a LLaDA or a Student): the completions ``(row, draw, text)`` of the batches
    ``shard_batches`` gives process ``shard``, and the wall seconds spent in generation. Sampling
    noise: ``per_step``, fresh draws from the batch's ``batch_generator(seed, b)``; or
    ``completion_noise(noise, seed, ...)``, a function of (row, draw) alone. A student is called with
    each step's interval; with a latent it decodes completion (row, draw) given its latent from the
    student's prior (``completion_network``), or, greedy with one completion, given its greedy anchor
    (``uses_anchor``). ``on_batch(n)`` is called after each batch with its number of completions."""
    require_columns(rows, "input_ids", "attention_mask")
    device = next(model.parameters()).device
    mask_id = (model.base if hasattr(model, "base") else model).config.mask_token_id
    check_answer_length(model, layout.gen_length, block_length)
    anchor = uses_anchor(model, temperature, samples)
    P, G = layout.prompt_length, layout.gen_length
    options = SamplerOptions(gen_length=G, steps=steps, block_length=block_length, temperature=temperature,
                             cfg_scale=cfg_scale)
    ids = torch.as_tensor(rows["input_ids"])[:, :P].long()  # (N, P)
    attention = torch.as_tensor(rows["attention_mask"])[:, :P].long()
    order = torch.arange(len(ids)).repeat_interleave(samples)  # (N * samples,)
    sample_index = torch.arange(samples).repeat(len(ids))
    completions, seconds = [], 0.0
    for batch in shard_batches(len(order), batch_size, shard):
        index, draws = order[batch], sample_index[batch]
        coupled = None if noise == "per_step" else completion_noise(noise, seed, index, draws, num_fields)
        generator = batch_generator(seed, batch.start // batch_size, device) if coupled is None else None
        predictor = completion_network(model, seed, index, draws, anchor)
        began = time.perf_counter()
        out = generate(predictor, ids[index].to(device), options, mask_id=mask_id,
                       attention_mask=attention[index].to(device), generator=generator, noise=coupled)
        answers = out[:, P:].tolist()  # the copy to the host waits for the device
        seconds += time.perf_counter() - began
        completions += [(row, draw, decode_answer(tokenizer, answer, stops))
                        for row, draw, answer in zip(index.tolist(), draws.tolist(), answers)]
        if on_batch is not None:
            on_batch(len(index))
    return completions, seconds


def records_of(rows, completions: list[tuple[int, int, str]]) -> list[dict]:
    """Records ``{"prompt", "answer", "completions"[, "task"]}`` of every row of a split, in row order,
    from completions ``(row, draw, text)`` in any order (each row's in draw order)."""
    require_columns(rows, "prompt", "answer")
    texts: list[list[str]] = [[] for _ in range(len(rows))]
    for row, _, text in sorted(completions, key=lambda c: c[:2]):
        texts[row].append(text)
    records = [{"prompt": p, "answer": a, "completions": c} for p, a, c in zip(rows["prompt"], rows["answer"], texts)]
    if "task" in rows.column_names:
        for record, task in zip(records, rows["task"]):
            record["task"] = task
    return records


def complete_split(model, rows, tokenizer, stops: set[int], layout: Layout, steps: int,
                   **options) -> tuple[list[dict], float]:
    """Every completion of a split in one process (``decode_completions``'s options), as
    ``records_of`` records, and the wall seconds spent in generation."""
    require_columns(rows, "input_ids", "attention_mask", "prompt", "answer")
    completions, seconds = decode_completions(model, rows, tokenizer, stops, layout, steps, **options)
    return records_of(rows, completions), seconds
