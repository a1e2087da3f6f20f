"""Filling the teacher cache: sample (t, mask) per example, run the teacher, keep its top-k; then
the teacher's own rollouts (``pipeline.cache.fill_rollouts``), the cache's second shard family.

The cache is cut into shards of ``rows_per_shard`` rows; shard j holds examples
``[j * E, (j + 1) * E)`` (E = rows_per_shard // samples_per_example), each with
``samples_per_example`` draws, and its randomness comes from a generator seeded by (seed, j) only.
So a shard's content does not depend on which process writes it or on how many processes share the
work: ``--shard-index i --num-shards n`` takes the blocks b with b % n == i, block b being the
``shards_per_block`` consecutive shards computed together (one shard at the default sizes), and any
split fills the same cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import fill_rollouts as rollout_fill
from pipeline.cache.params import CacheParams
from pipeline.cache.shards import (ROLLOUTS, TOPK, ShardWriter, ensure_manifest, finalize_manifest, my_shards,
                                   pending_shards, shard_rows)
from pipeline.cache.topk import CacheRows, cache_schema
from pipeline.core.errors import CacheError, ParamsError
from pipeline.core.params import params_hash
from pipeline.data.layout import Layout, load_split, split_fingerprint
from pipeline.generation.sampler import guided_hidden, sampler_network
from pipeline.models.logit_rows import map_row_chunks
from pipeline.models.mask_predictor import MaskPredictor


def examples_per_shard(params: CacheParams) -> int:
    return max(1, params.rows_per_shard // params.samples_per_example)


def num_shards_for(num_examples: int, params: CacheParams) -> int:
    return math.ceil(num_examples / examples_per_shard(params))


def shard_generator(seed: int, shard: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + shard)


def sample_t(n: int, params: CacheParams, generator: torch.Generator) -> torch.Tensor:
    """(n,) mask ratios: a ``full_mask_fraction`` at exactly 1, the rest uniform on (t_min, 1] or
    logit-normal clipped to [t_min, 1]."""
    full = torch.rand(n, generator=generator) < params.full_mask_fraction
    if params.t_distribution == "uniform":
        t = params.t_min + (1.0 - params.t_min) * (1.0 - torch.rand(n, generator=generator))
    else:
        normal = torch.randn(n, generator=generator) * params.logit_normal_std + params.logit_normal_mean
        t = torch.sigmoid(normal).clamp(min=params.t_min, max=1.0)
    return torch.where(full, torch.ones_like(t), t)


def draw_noisy_inputs(x0: torch.Tensor, layout: Layout, params: CacheParams, mask_id: int, generator):
    """For rows ``x0`` (N, L): t (N,), x_t (N, L), masked (N, L). Each answer token is masked with
    probability t; a row that drew no masked token gets one at a uniform answer position (it would
    carry no target otherwise)."""
    n = x0.shape[0]
    t = sample_t(n, params, generator)
    masked = torch.rand(x0.shape, generator=generator) < t[:, None]
    masked[:, : layout.prompt_length] = False
    fallback = layout.prompt_length + torch.randint(layout.gen_length, (n,), generator=generator)
    empty = ~masked.any(dim=1)
    masked[empty, fallback[empty]] = True
    return t, x0.masked_fill(masked, mask_id), masked


@torch.inference_mode()
def teacher_topk(
    model: MaskPredictor, x_t: torch.Tensor, attention_mask: torch.Tensor, masked: torch.Tensor, layout: Layout,
    top_k: int, cfg_scale: float, chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-softmax (over the full vocabulary) of the teacher at the masked positions, row-major:
    ids (M, k) int32 and log-probs (M, k) float16. With ``cfg_scale > 0`` the guided logits.

    The trunk runs once; the head, the float32 upcast (bf16 logits on GPU), the log-softmax and the
    top-k run on the masked positions only, ``chunk_bytes`` of float32 logits at a time."""
    prompt_index = attention_mask.bool().clone()
    prompt_index[:, layout.prompt_length:] = False
    hidden = guided_hidden(sampler_network(model), x_t, attention_mask, prompt_index, cfg_scale,
                           model.config.mask_token_id, masked)

    def topk_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = torch.log_softmax(hidden.logits(rows).float(), dim=-1)  # (n, V)
        values, ids = torch.topk(logprobs, top_k, dim=-1)
        return ids.to(torch.int32), values.to(torch.float16)

    rows = torch.arange(len(hidden.cond), device=x_t.device)  # (M,)
    return map_row_chunks(topk_rows, (rows,), model.config.embedding_size, chunk_bytes)


def shards_per_block(params: CacheParams) -> int:
    """Consecutive shards computed together: as many as one forward batch holds (1 at the default sizes),
    so that small shards cost what large ones do."""
    return max(1, params.batch_size // (examples_per_shard(params) * params.samples_per_example))


def fill_block(
    model: MaskPredictor, dataset, block: range, todo: set[int], layout: Layout, params: CacheParams, out_dir: Path,
    progress=None,
) -> None:
    """Compute the consecutive shards ``block`` together (each shard's noise from its own generator;
    the teacher's forward batches run over all their rows) and write those in ``todo``."""
    device = next(model.parameters()).device
    per_shard, S = examples_per_shard(params), params.samples_per_example
    parts = []
    for shard in block:
        first, last = shard * per_shard, min((shard + 1) * per_shard, len(dataset))
        rows = dataset[first:last]
        x0 = torch.as_tensor(np.asarray(rows["input_ids"]), dtype=torch.long).repeat_interleave(S, dim=0)
        attention = torch.as_tensor(np.asarray(rows["attention_mask"]), dtype=torch.long).repeat_interleave(S, dim=0)
        t, x_t, masked = draw_noisy_inputs(x0, layout, params, model.config.mask_token_id,
                                           shard_generator(params.seed, shard))
        example_index = torch.arange(first, last).repeat_interleave(S)  # (N,) example-major
        parts.append((example_index, torch.arange(S).repeat(last - first), t, x_t, attention, x0, masked))
    example_index, sample_index, t, x_t, attention, x0, masked = (torch.cat(column) for column in zip(*parts))
    bounds = np.cumsum([0] + [len(part[0]) for part in parts])  # shard i holds rows [bounds[i], bounds[i + 1])
    schema = cache_schema(layout.length, params.top_k)
    with contextlib.ExitStack() as stack:
        writers = {i: stack.enter_context(ShardWriter(out_dir, shard, schema, params.record_batch_rows))
                   for i, shard in enumerate(block) if shard in todo}
        for start in range(0, len(t), params.batch_size):
            part = slice(start, start + params.batch_size)
            ids, logprobs = teacher_topk(model, x_t[part].to(device), attention[part].to(device),
                                         masked[part].to(device), layout, params.top_k, params.cfg_scale)
            if torch.isnan(logprobs).any():
                raise CacheError(f"{out_dir}: shard {block[0]}: the teacher's log-probs are NaN (a diverged teacher?); "
                                 "rerun the teacher stage")
            positions = masked[part].nonzero()[:, 1]  # row-major, like the boolean gather above
            rows = CacheRows(
                example_index=example_index[part].numpy(), sample_index=sample_index[part].numpy().astype(np.int32),
                t=t[part].numpy().astype(np.float32), input_ids=x_t[part].numpy(),
                attention_mask=attention[part].numpy(), x0=x0[part].numpy(),
                num_masked=masked[part].sum(dim=1).numpy(), masked_positions=positions.numpy(),
                topk_ids=ids.cpu().numpy(), topk_logprobs=logprobs.cpu().numpy(),
            )
            stop = start + len(rows)
            for i, writer in writers.items():  # each shard's share of this batch
                lo, hi = max(bounds[i], start), min(bounds[i + 1], stop)
                if lo < hi:
                    writer.write(rows.slice(lo - start, hi - start))
            if progress is not None:
                progress.update(sum(max(0, min(bounds[i + 1], stop) - max(bounds[i], start)) for i in writers))
        for writer in writers.values():
            writer.close()


def shard_blocks(todo: list[int], block: int, total: int) -> list[tuple[range, set[int]]]:
    """The blocks of ``block`` consecutive shards (of ``total``) that hold a shard of ``todo``, each
    with its shards to write."""
    starts = sorted({j // block * block for j in todo})
    return [(range(b, min(b + block, total)), {j for j in todo if b <= j < b + block}) for b in starts]


def fill_cache(
    model: MaskPredictor, dataset, layout: Layout, params: CacheParams, out_dir: Path, header: dict,
    shard_index: int = 0, num_shards: int = 1, replace_other: bool = False,
) -> dict:
    """Fill this process's shards (those of the blocks b with b % num_shards == shard_index) of both
    families (top-k rows, then rollouts) of the cache in ``out_dir``, skipping complete ones; finalize
    the manifest if the whole cache is then complete. A cache of other params, teacher or data already
    there is refused, or with ``replace_other`` deleted first."""
    from tqdm import tqdm

    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    for key, k in (("cache.top_k", params.top_k), ("cache.rollouts.top_k", params.rollouts.top_k)):
        if k > model.config.embedding_size:
            raise ParamsError(f"params.yaml:{key}: {k} exceeds the vocabulary ({model.config.embedding_size})")
    out_dir = Path(out_dir)
    total = num_shards_for(len(dataset), params)
    manifest = {**header, "num_shards": total, "top_k": params.top_k, "record_batch_rows": params.record_batch_rows}
    rollouts = rollout_fill.manifest_entry(params, layout, model.config.mask_token_id, len(dataset))
    if rollouts is not None:
        manifest[ROLLOUTS] = rollouts
    ensure_manifest(out_dir, manifest, replace_other)
    rollout_total = rollouts["num_shards"] if rollouts else 0

    block = shards_per_block(params)
    todo = pending_shards(out_dir, total, TOPK, shard_index, num_shards, block)
    rows = shard_rows(todo, examples_per_shard(params), len(dataset), params.samples_per_example)
    started = time.perf_counter()
    with tqdm(total=rows, unit="row", desc=f"top-k shards {shard_index}/{num_shards}", smoothing=0.1) as progress:
        for shards, pending in shard_blocks(todo, block, total):
            fill_block(model, dataset, shards, pending, layout, params, out_dir, progress)
    seconds = time.perf_counter() - started

    rollout_block = rollout_fill.shards_per_block(params.rollouts)
    rollout_todo = pending_shards(out_dir, rollout_total, ROLLOUTS, shard_index, num_shards, rollout_block)
    count = shard_rows(rollout_todo, rollout_fill.examples_per_shard(params.rollouts), rollouts["examples"],
                       params.rollouts.per_example) if rollouts else 0
    started = time.perf_counter()
    with tqdm(total=count, unit="rollout", desc=f"rollout shards {shard_index}/{num_shards}", smoothing=0.1,
              disable=not rollout_todo) as progress:
        for shards, pending in shard_blocks(rollout_todo, rollout_block, rollout_total):
            rollout_fill.fill_rollout_block(model, dataset, shards, pending, layout, params, rollouts["sampler"],
                                            out_dir, progress)
    rollout_seconds = time.perf_counter() - started
    mine = (len(my_shards(total, shard_index, num_shards, block))
            + len(my_shards(rollout_total, shard_index, num_shards, rollout_block)))
    return {"shards_total": total + rollout_total, "shards_written": len(todo), "rows_written": rows,
            "seconds": round(seconds, 2), "rollout_shards_written": len(rollout_todo), "rollouts_written": count,
            "rollout_seconds": round(rollout_seconds, 2),
            "shards_skipped": mine - len(todo) - len(rollout_todo), "complete": finalize_manifest(out_dir)}


def load_train_split(data_dir: Path, max_examples: int | None, tokens_only: bool = True):
    """The training split of ``prepare_data``, optionally truncated: with ``tokens_only`` its
    ``input_ids`` and ``attention_mask`` in numpy format, else every column as stored."""
    train = load_split(data_dir, "train")
    if max_examples is not None:
        train = train.select(range(min(max_examples, len(train))))
    return train.with_format("numpy", columns=["input_ids", "attention_mask"]) if tokens_only else train


def cache_header(record, layout: Layout, params: CacheParams, data_dir: Path, model: MaskPredictor) -> dict:
    """What makes two caches interchangeable: teacher, tokenizer, data, and content params (the
    forward batch size changes speed only, so it is left out of the hash)."""
    content = params.content()
    return {
        "teacher_fingerprint": record.fingerprint,
        "tokenizer_sha256": record.tokenizer_sha256,
        "data_fingerprint": split_fingerprint(Path(data_dir) / "train"),
        "params_hash": params_hash(content, layout),
        "params": content,
        "layout": {**dataclasses.asdict(layout), "length": layout.length},
        "vocab_size": model.config.embedding_size,
        "mask_token_id": model.config.mask_token_id,
    }
