"""Filling the rollout shards: the teacher's own sampler on training prompts (format:
``pipeline.cache.rollouts``).

A rollout's noise is a pure function of its seed, and its seed a function of (cache.seed, example,
rollout), or of (cache.seed, field) under ``shared`` noise; the rollouts of block b (the
``shards_per_block`` consecutive shards sampled together, one shard at the default sizes) are sampled
in batches of ``cache.rollouts.batch_size`` in a fixed order, and a rerun samples a block whole even
when only some of its shards are missing. So a shard's bytes depend only on (params, shard index): any
split of the blocks over processes, and any rerun after a kill, writes the same bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.cache.params import CacheParams, RolloutParams
from pipeline.cache.rollouts import RolloutRows, rollout_schema
from pipeline.cache.shards import ROLLOUTS, ShardWriter
from pipeline.core.errors import ParamsError
from pipeline.data.layout import Layout
from pipeline.generation.noise import CounterNoise, completion_seeds, field_seeds
from pipeline.generation.sampler import SamplerOptionError, SamplerOptions, sample_trajectory, sampler_network
from pipeline.models.mask_predictor import MaskPredictor


def rollout_examples(params: CacheParams, num_examples: int) -> int:
    """How many training examples get rollouts (0 when ``per_example`` is 0)."""
    r = params.rollouts
    if r.per_example == 0:
        return 0
    return num_examples if r.max_examples is None else min(r.max_examples, num_examples)


def examples_per_shard(params: RolloutParams) -> int:
    return max(1, params.rollouts_per_shard // max(params.per_example, 1))


def num_shards_for(num_examples: int, params: RolloutParams) -> int:
    return math.ceil(num_examples / examples_per_shard(params)) if num_examples else 0


def sampler_settings(params: CacheParams, layout: Layout, mask_id: int) -> dict:
    """The sampler's settings, resolved against the layout (recorded in the manifest); refuses
    steps / block lengths the sampler cannot run, naming the key."""
    r = params.rollouts
    G = layout.gen_length
    try:
        options = SamplerOptions(gen_length=G, steps=r.steps or G, block_length=r.block_length,
                                 temperature=r.temperature, cfg_scale=r.cfg_scale, remasking=r.remasking)
    except SamplerOptionError as err:
        raise ParamsError(f"params.yaml:cache.rollouts.{err}") from err
    return {"steps": options.steps, "gen_length": G, "block_length": options.block_length, "remasking": r.remasking,
            "cfg_scale": r.cfg_scale, "temperature": r.temperature, "noise": r.noise, "num_fields": r.num_fields,
            "greedy_first": r.greedy_first, "mask_token_id": mask_id, "batch_size": r.batch_size}


def manifest_entry(params: CacheParams, layout: Layout, mask_id: int, num_examples: int) -> dict | None:
    """The manifest's ``rollouts`` entry (``pipeline.cache.rollouts``) for a cache over
    ``num_examples`` training examples; None when there are no rollouts."""
    examples = rollout_examples(params, num_examples)
    if not examples:
        return None
    return {"num_shards": num_shards_for(examples, params.rollouts), "record_batch_rows": params.record_batch_rows,
            "examples": examples, "per_example": params.rollouts.per_example, "top_k": params.rollouts.top_k,
            "sampler": sampler_settings(params, layout, mask_id)}


def rollout_plan(first: int, last: int, params: CacheParams) -> RolloutRows:
    """The per-rollout columns fixed before sampling, for examples [first, last), example-major:
    indices, temperature, seed and field (token columns left empty)."""
    r = params.rollouts
    n = last - first
    example = np.repeat(np.arange(first, last, dtype=np.int64), r.per_example)
    rollout = np.tile(np.arange(r.per_example, dtype=np.int32), n)
    greedy = (rollout == 0) & r.greedy_first
    # The sampler runs at the stored float32 temperature, so a rollout regenerates from its row.
    temperature = np.where(greedy, 0.0, r.temperature).astype(np.float32)
    seed = completion_seeds(params.seed, torch.from_numpy(example), torch.from_numpy(rollout.astype(np.int64)))
    field = np.full(len(example), -1, dtype=np.int32)
    if r.noise == "shared":
        field = np.where(greedy, -1, (rollout - int(r.greedy_first)) % r.num_fields).astype(np.int32)
        shared = field_seeds(params.seed, torch.from_numpy(np.maximum(field, 0).astype(np.int64)))
        seed = torch.where(torch.from_numpy(field >= 0), shared, seed)
    empty = np.zeros((len(example), 0), dtype=np.int32)
    return RolloutRows(example, rollout, temperature, seed.numpy().view(np.uint64), field, empty, empty.astype(np.int8),
                       empty, empty.astype(np.int16))


def shards_per_block(params: RolloutParams) -> int:
    """Consecutive rollout shards sampled together: as many as one sampler batch holds (1 at the
    default sizes). A function of params alone, since the batch a rollout is sampled in is part of what
    it is (bf16 logits depend on the batch)."""
    return max(1, params.batch_size // (examples_per_shard(params) * max(params.per_example, 1)))


@torch.inference_mode()
def fill_rollout_block(model: MaskPredictor, dataset, block: range, todo: set[int], layout: Layout,
                       params: CacheParams, sampler: dict, out_dir, progress=None) -> None:
    """Sample the consecutive rollout shards ``block`` together (one plan over their examples) and
    write those in ``todo``. Greedy and sampled rollouts go through the sampler in separate batches
    (one temperature per batch); each shard is written example-major."""
    r = params.rollouts
    device = next(model.parameters()).device
    per_shard = examples_per_shard(r)
    examples = rollout_examples(params, len(dataset))
    first, last = block[0] * per_shard, min((block[-1] + 1) * per_shard, examples)
    plan = rollout_plan(first, last, params)
    rows = dataset[first:last]
    P, G = layout.prompt_length, layout.gen_length
    prompts = np.asarray(rows["input_ids"])[:, :P].astype(np.int32).repeat(r.per_example, axis=0)  # (N, P)
    prompt_mask = np.asarray(rows["attention_mask"])[:, :P].astype(np.int8).repeat(r.per_example, axis=0)
    tokens = np.zeros((len(plan), G), dtype=np.int32)
    reveal = np.zeros((len(plan), G), dtype=np.int16)
    if r.top_k:
        top_ids = np.zeros((len(plan), G, r.top_k), dtype=np.int32)
        top_logprobs = np.zeros((len(plan), G, r.top_k), dtype=np.float16)
    shard_rows = {shard: slice((shard * per_shard - first) * r.per_example,
                               (min((shard + 1) * per_shard, examples) - first) * r.per_example) for shard in todo}
    wanted = np.zeros(len(plan), dtype=bool)  # the rows of the shards to write (the progress bar counts them)
    for rows_of_shard in shard_rows.values():
        wanted[rows_of_shard] = True
    predictor = sampler_network(model)
    seeds = torch.from_numpy(plan.seed.view(np.int64))
    for temperature in sorted(set(plan.temperature.tolist())):
        group = np.flatnonzero(plan.temperature == temperature)
        for start in range(0, len(group), r.batch_size):
            part = group[start : start + r.batch_size]
            options = SamplerOptions(gen_length=G, steps=sampler["steps"], block_length=sampler["block_length"],
                                     temperature=temperature, cfg_scale=r.cfg_scale, remasking=r.remasking)
            trajectory = sample_trajectory(
                predictor, torch.from_numpy(prompts[part]).long().to(device), options,
                mask_id=model.config.mask_token_id, attention_mask=torch.from_numpy(prompt_mask[part]).long().to(device),
                noise=CounterNoise(seeds[part], fixed=r.noise != "per_step"), record_top_k=r.top_k,
            )
            tokens[part] = trajectory.sequences[:, P:].cpu().numpy()
            reveal[part] = trajectory.reveal_step.cpu().numpy()
            if r.top_k:
                top_ids[part] = trajectory.reveal_topk_ids.cpu().numpy()
                top_logprobs[part] = trajectory.reveal_topk_logprobs.cpu().numpy().astype(np.float16)
            if progress is not None:
                progress.update(int(wanted[part].sum()))
    written = RolloutRows(plan.example_index, plan.rollout_index, plan.temperature, plan.seed, plan.field, prompts,
                          prompt_mask, tokens, reveal, top_ids if r.top_k else None, top_logprobs if r.top_k else None)
    schema = rollout_schema(P, G, r.top_k)
    for shard in sorted(todo):
        with ShardWriter(out_dir, shard, schema, params.record_batch_rows, family=ROLLOUTS) as writer:
            writer.write(written.slice(shard_rows[shard].start, shard_rows[shard].stop))
            writer.close()
