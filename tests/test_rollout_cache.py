"""Stage one's rollouts: the teacher's own sampler cached as final tokens + reveal steps + seeds
(round trip, reconstruction of every intermediate state, regeneration from the seed, determinism
under any process split, resumption after a kill, damage and mismatch detection)."""

import json
import subprocess

import numpy as np
import pytest
import torch

from pipeline.cache.fill import cache_header, fill_cache, load_train_split
from pipeline.cache.params import CacheParams
from pipeline.cache.rollouts import RolloutRows, open_rollouts, rollout_schema, rollout_statistics
from pipeline.cache.shards import ROLLOUTS, ShardWriter, ensure_manifest, finalize_manifest
from pipeline.cache.topk import open_cache
from pipeline.core.errors import CacheError, ParamsError
from pipeline.core.params import from_mapping
from pipeline.data.layout import Layout
from pipeline.generation.noise import CounterNoise, field_seeds
from pipeline.generation.sampler import SamplerOptions, sample_trajectory, sampler_network
from pipeline.teacher.artifact import load_teacher
from tests.conftest import make_workdir
from tests.test_teacher_cache import assert_damage_refused, kill_stage_one_after

# 30 of the 120 training examples get 3 rollouts each, 6 examples (18 rollouts) per shard: 5 shards.
ROLLOUTS_SMALL = {"max_examples": 30, "per_example": 3, "rollouts_per_shard": 20, "batch_size": 7}
SMALL = dict(samples_per_example=1, top_k=3, rows_per_shard=60, record_batch_rows=8, batch_size=7,
             rollouts=ROLLOUTS_SMALL)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("work"))


def cache_params(**rollouts) -> CacheParams:
    return from_mapping(CacheParams, {**SMALL, "rollouts": {**ROLLOUTS_SMALL, **rollouts}}, "cache")


def fill(workdir, out, shard_index=0, num_shards=1, params=None):
    params = params or cache_params()
    model, _, record = load_teacher(workdir / "artifacts" / "teacher")
    layout = Layout.load(workdir / "data")
    train = load_train_split(workdir / "data", params.max_examples)
    header = cache_header(record, layout, params, workdir / "data", model)
    return fill_cache(model, train, layout, params, out, header, shard_index, num_shards)


def rollout_digests(directory):
    return {k: v["sha256"] for k, v in json.loads((directory / "manifest.json").read_text())[ROLLOUTS]["shards"].items()}


def test_round_trip_with_and_without_reveal_topk(tmp_path):
    rng = np.random.default_rng(0)
    P, G, n = 4, 6, 11
    for k in (0, 3):
        directory = tmp_path / f"k{k}"
        ensure_manifest(directory, {"teacher_fingerprint": "t", "tokenizer_sha256": "s", "data_fingerprint": "d",
                                    "params_hash": "p", "layout": {"prompt_length": P, "gen_length": G, "length": P + G},
                                    "mask_token_id": 9, "num_shards": 0, "top_k": 1, "record_batch_rows": 4,
                                    ROLLOUTS: {"num_shards": 1, "record_batch_rows": 4, "examples": n, "per_example": 1,
                                               "top_k": k, "sampler": {"steps": 3}}})
        rows = RolloutRows(
            np.arange(n, dtype=np.int64), np.zeros(n, np.int32), rng.random(n).astype(np.float32),
            np.array([2**64 - 1 - i for i in range(n)], dtype=np.uint64), rng.integers(-1, 4, n).astype(np.int32),
            rng.integers(0, 9, (n, P)).astype(np.int32), rng.integers(0, 2, (n, P)).astype(np.int8),
            rng.integers(0, 9, (n, G)).astype(np.int32), rng.integers(0, 3, (n, G)).astype(np.int16),
            rng.integers(0, 9, (n, G, k)).astype(np.int32) if k else None,
            -rng.random((n, G, k)).astype(np.float16) if k else None,
        )
        with ShardWriter(directory, 0, rollout_schema(P, G, k), 4, family=ROLLOUTS) as writer:
            writer.write(rows.slice(0, 5))
            writer.write(rows.slice(5, n))
            writer.close()
        assert finalize_manifest(directory)
        cache = open_rollouts(directory)
        assert len(cache) == n and cache.num_batches == 3
        back = RolloutRows.concat([cache.batch(j) for j in range(cache.num_batches)])
        for field in ("example_index", "temperature", "seed", "field", "prompt_ids", "prompt_mask", "tokens",
                      "reveal_step", "reveal_topk_ids", "reveal_topk_logprobs"):
            expected, got = getattr(rows, field), getattr(back, field)
            assert (got is None) if expected is None else (got.dtype == expected.dtype and np.array_equal(got, expected))
        assert cache[-1]["seed"] == 2**64 - 1 - (n - 1) and cache[3]["tokens"].shape == (G,)


@pytest.fixture(scope="module")
def workdir_8(tmp_path_factory):
    """Answers of 8 tokens, so that the sampler can run 2 blocks."""
    return make_workdir(tmp_path_factory.mktemp("work8"), gen_length=8)


@pytest.mark.parametrize("noise,sampler", [
    ("per_step", {}), ("fixed", {}), ("shared", {}),
    ("per_step", {"steps": 4, "block_length": 4, "cfg_scale": 0.5}),  # 2 blocks, guidance
    ("fixed", {"steps": 6, "block_length": 4, "remasking": "random", "temperature": 0.7}),
])
def test_rollouts_regenerate_from_their_seed_and_reconstruct_every_step(workdir_8, tmp_path, noise, sampler):
    """The sampler rerun on a cached rollout's prompt with the noise regenerated from its stored seed
    gives the same tokens, reveal steps and reveal top-k, and the network's input at step k is the
    state the reader rebuilds for k."""
    params = cache_params(noise=noise, per_example=3, num_fields=2, top_k=2, **sampler)
    assert fill(workdir_8, tmp_path / "cache", params=params)["complete"]
    rollouts = open_rollouts(tmp_path / "cache")
    model, _, _ = load_teacher(workdir_8 / "artifacts" / "teacher")
    layout = Layout.load(workdir_8 / "data")
    P, G = layout.prompt_length, layout.gen_length
    settings = rollouts.sampler
    assert len(rollouts) == 90 and settings["noise"] == noise
    assert settings["steps"] == sampler.get("steps", G) and settings["block_length"] == sampler.get("block_length", G)
    train = load_train_split(workdir_8 / "data", None)
    seen = []
    recorder = lambda ids, mask: seen.append(ids.clone()) or model(input_ids=ids, attention_mask=mask)  # noqa: E731
    for i in range(0, 90, 7):
        row = rollouts[i]
        assert np.array_equal(row["prompt_ids"], train[row["example_index"]]["input_ids"][:P])
        assert row["temperature"] == (0.0 if row["rollout_index"] == 0 else np.float32(settings["temperature"]))
        assert row["field"] == (-1 if noise != "shared" or row["rollout_index"] == 0 else (row["rollout_index"] - 1) % 2)
        seen.clear()
        options = SamplerOptions(steps=settings["steps"], gen_length=G, block_length=settings["block_length"],
                                 temperature=float(row["temperature"]), cfg_scale=settings["cfg_scale"],
                                 remasking=settings["remasking"])
        trajectory = sample_trajectory(
            recorder, torch.tensor(row["prompt_ids"][None]).long(), options, mask_id=model.config.mask_token_id,
            attention_mask=torch.tensor(row["prompt_mask"][None]).long(), record_top_k=2,
            noise=CounterNoise(torch.tensor([row["seed"]], dtype=torch.uint64).view(torch.int64), fixed=noise != "per_step"))
        assert np.array_equal(trajectory.sequences[0, P:].numpy(), row["tokens"])
        assert np.array_equal(trajectory.reveal_step[0].numpy(), row["reveal_step"])
        assert np.array_equal(trajectory.reveal_topk_ids[0].numpy(), row["reveal_topk_ids"])
        assert np.array_equal(trajectory.reveal_topk_logprobs[0].numpy().astype(np.float16), row["reveal_topk_logprobs"])
        assert len(seen) == settings["steps"]
        for k, state in enumerate(seen):  # with CFG the first row is the conditional input
            assert np.array_equal(rollouts.state_after(row, k), state[0].numpy())
        assert np.array_equal(rollouts.state_after(row, settings["steps"])[P:], row["tokens"])
    if noise == "shared":  # a field is shared by every prompt: its seed is a function of its index
        batch = RolloutRows.concat([rollouts.batch(j) for j in range(rollouts.num_batches)])
        sampled = batch.field >= 0
        expected = field_seeds(params.seed, torch.from_numpy(batch.field[sampled].astype(np.int64)))
        assert np.array_equal(batch.seed[sampled], expected.numpy().view(np.uint64))
        assert set(batch.field[sampled].tolist()) == {0, 1}


def test_sampler_settings_that_cannot_run_are_refused(workdir, tmp_path):
    with pytest.raises(ParamsError, match="cache.rollouts.block_length: gen_length 7 is not a multiple of 3"):
        fill(workdir, tmp_path / "cache", params=cache_params(block_length=3))
    with pytest.raises(ParamsError, match="cache.rollouts.steps: 8 steps"):
        fill(workdir, tmp_path / "cache", params=cache_params(steps=8))
    with pytest.raises(ParamsError, match="cache.rollouts.noise"):
        from_mapping(CacheParams, {"rollouts": {"noise": "gaussian"}}, "cache")
    with pytest.raises(ParamsError, match="cache.rollouts.per_example: 4 rollouts at temperature 0 would be copies"):
        from_mapping(CacheParams, {"rollouts": {"temperature": 0.0}}, "cache")
    with pytest.raises(ParamsError, match="cache.rollouts.per_example: 5 sampled rollouts per prompt but 4 shared"):
        from_mapping(CacheParams, {"rollouts": {"noise": "shared", "per_example": 6}}, "cache")


def test_independent_of_the_process_split_and_the_batch(workdir, tmp_path):
    fill(workdir, tmp_path / "one")
    first = fill(workdir, tmp_path / "split", shard_index=0, num_shards=2)
    assert not first["complete"] and first["rollout_shards_written"] == 3  # rollout shards 0, 2, 4
    assert fill(workdir, tmp_path / "split", shard_index=1, num_shards=2)["complete"]
    assert rollout_digests(tmp_path / "split") == rollout_digests(tmp_path / "one")
    other_batch = from_mapping(CacheParams, {**SMALL, "batch_size": 5}, "cache")  # the top-k rows' batch
    fill(workdir, tmp_path / "batch", params=other_batch)
    assert rollout_digests(tmp_path / "batch") == rollout_digests(tmp_path / "one")
    with pytest.raises(CacheError, match="params_hash"):  # the sampler's batch is part of the content
        fill(workdir, tmp_path / "one", params=cache_params(batch_size=5))
    again = fill(workdir, tmp_path / "one")
    assert again["rollout_shards_written"] == 0 and again["shards_skipped"] == again["shards_total"]
    stats = rollout_statistics(tmp_path / "one")
    assert stats["rollouts"] == 90 and 0 < stats["bytes_per_rollout_disk"] < 1000


def test_small_shards_share_forward_batches_and_any_split_or_rerun_gives_the_same_bytes(workdir, tmp_path, monkeypatch):
    """One-example shards used to cost one forward (top-k) or one sampler run per temperature (rollouts)
    each: stage one with many small shards was 7x slower. Consecutive shards now share batches (blocks
    of batch_size // shard size shards), blocks are what processes split, and a rerun samples a block
    whole: the bytes are those of one process, uninterrupted."""
    from pipeline.cache import fill as topk_fill
    from pipeline.cache import fill_rollouts

    calls = {"forward": 0, "sampler": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(topk_fill, "teacher_topk", counting("forward", topk_fill.teacher_topk))
    monkeypatch.setattr(fill_rollouts, "sample_trajectory", counting("sampler", fill_rollouts.sample_trajectory))
    small = from_mapping(CacheParams, {**SMALL, "max_examples": 40, "rows_per_shard": 1, "batch_size": 8,
                                       "rollouts": {**ROLLOUTS_SMALL, "rollouts_per_shard": 3, "batch_size": 12}},
                         "cache")  # 40 top-k shards in blocks of 8; 30 rollout shards in blocks of 4
    fill(workdir, tmp_path / "one", params=small)
    assert calls == {"forward": 5, "sampler": 2 * 8}  # per block: a greedy and a sampled batch
    for i in range(3):
        fill(workdir, tmp_path / "split", shard_index=i, num_shards=3, params=small)
    assert rollout_digests(tmp_path / "split") == rollout_digests(tmp_path / "one")
    topk = lambda d: {k: v["sha256"] for k, v in json.loads((d / "manifest.json").read_text())["shards"].items()}  # noqa: E731
    assert topk(tmp_path / "split") == topk(tmp_path / "one") and len(topk(tmp_path / "one")) == 40
    for name in ("rollouts-00005", "shard-00013"):  # one shard from the middle of a block of each family
        (tmp_path / "split" / f"{name}.json").unlink()
    again = fill(workdir, tmp_path / "split", params=small)
    assert again["shards_written"] == 1 and again["rollout_shards_written"] == 1 and again["complete"]
    assert rollout_digests(tmp_path / "split") == rollout_digests(tmp_path / "one")
    assert topk(tmp_path / "split") == topk(tmp_path / "one")
    per_shard = from_mapping(CacheParams, {**small.content(), "batch_size": 1}, "cache")  # a forward per shard
    fill(workdir, tmp_path / "per_shard", params=per_shard)
    assert topk(tmp_path / "per_shard") == topk(tmp_path / "one")  # the top-k rows do not depend on their batch


def test_greedy_rollouts_are_the_evaluations_greedy_decoding(workdir, tmp_path):
    fill(workdir, tmp_path / "cache")
    rollouts = open_rollouts(tmp_path / "cache")
    model, _, _ = load_teacher(workdir / "artifacts" / "teacher")
    layout = Layout.load(workdir / "data")
    batch = RolloutRows.concat([rollouts.batch(j) for j in range(rollouts.num_batches)])
    greedy = batch.take(np.flatnonzero(batch.temperature == 0))
    out = sample_trajectory(sampler_network(model), torch.from_numpy(greedy.prompt_ids).long(),
                            SamplerOptions(steps=layout.gen_length, gen_length=layout.gen_length),
                            mask_id=model.config.mask_token_id, attention_mask=torch.from_numpy(greedy.prompt_mask).long())
    assert np.array_equal(out.sequences[:, layout.prompt_length:].numpy(), greedy.tokens)
    assert len(greedy) == 30 and np.array_equal(greedy.example_index, np.arange(30))


def test_mismatched_rollout_params_and_damaged_shards_are_refused(workdir, tmp_path):
    fill(workdir, tmp_path / "cache")
    with pytest.raises(CacheError, match="params_hash"):
        fill(workdir, tmp_path / "cache", params=cache_params(noise="fixed"))
    with pytest.raises(CacheError, match="params_hash"):
        fill(workdir, tmp_path / "cache", params=cache_params(temperature=0.5))
    assert_damage_refused(tmp_path / "cache" / "rollouts-00002.arrow", open_rollouts, cut=50)
    open_cache(tmp_path / "cache")  # the top-k family is intact and still opens


def test_killed_run_resumes_to_the_same_rollouts(tmp_path):
    work = make_workdir(tmp_path / "work", train_per_task=150, d_model=64)
    rollouts = {"max_examples": 600, "per_example": 4, "rollouts_per_shard": 120}  # 20 rollout shards
    params = {"cache": {**SMALL, "rows_per_shard": 600, "record_batch_rows": 64, "batch_size": 60,
                        "rollouts": {**rollouts, "batch_size": 60}}}
    command, cache = kill_stage_one_after(work, params, "rollouts-*.json")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert not manifest["complete"], "the run finished before it could be killed: make it longer"
    assert 0 < len(list(cache.glob("rollouts-*.json"))) < manifest[ROLLOUTS]["num_shards"]
    pending = manifest[ROLLOUTS]["num_shards"] - 1
    assert not (cache / f"rollouts-{pending:05d}.json").exists()
    (cache / f".rollouts-{pending:05d}.arrow.tmp-999999").write_bytes(b"half a shard")  # as a kill mid-write leaves
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(cache.glob(".rollouts-*"))  # the killed run's temporary file is gone
    reference = tmp_path / "reference"
    fill(work, reference, params=from_mapping(CacheParams, params["cache"], "cache"))
    assert rollout_digests(cache) == rollout_digests(reference)
    metrics = json.loads((work / "metrics" / "cache.json").read_text())["rollouts"]
    assert metrics["rollouts"] == 2400 and metrics["forward_passes_per_rollout"] == 7 and metrics["rollouts_per_second"] > 0
    assert set(metrics["accuracy"]) == {"greedy", "sampled"} and "distinct_valid" in metrics["accuracy"]["sampled"]["perm"]
    # A rerun on the complete cache (dvc repro after another stage changed) computes nothing: it keeps
    # the timings of the run that wrote the shards instead of reporting zeros.
    before = json.loads((work / "metrics" / "cache.json").read_text())
    assert subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600).returncode == 0
    after = json.loads((work / "metrics" / "cache.json").read_text())
    assert after == before and after["rollouts"]["seconds"] > 0
