"""Stage one: the Arrow cache format, and filling it from a teacher (determinism, sharding,
resumption after a kill, damage and mismatch detection)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.cache.fill import cache_header, fill_cache, load_train_split
from pipeline.cache.params import CacheParams
from pipeline.cache.rollouts import open_rollouts
from pipeline.cache.shards import ShardWriter, ensure_manifest, finalize_manifest, header_digest
from pipeline.cache.topk import CacheRows, cache_schema, cache_statistics, open_cache
from pipeline.core.errors import CacheError, ParamsError
from pipeline.core.params import from_mapping
from pipeline.data.layout import Layout
from pipeline.teacher.artifact import load_teacher
from tests.conftest import make_workdir

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(samples_per_example=3, top_k=5, rows_per_shard=24, record_batch_rows=10, batch_size=7,
             full_mask_fraction=0.2, rollouts={"per_example": 0})  # rollouts: tests/test_rollout_cache.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("work"))


def fill(workdir, out, shard_index=0, num_shards=1, replace_other=False, **overrides):
    params = from_mapping(CacheParams, {**SMALL, **overrides}, "cache")
    model, _, record = load_teacher(workdir / "artifacts" / "teacher")
    layout = Layout.load(workdir / "data")
    train = load_train_split(workdir / "data", params.max_examples)
    header = cache_header(record, layout, params, workdir / "data", model)
    return fill_cache(model, train, layout, params, out, header, shard_index, num_shards, replace_other)


def random_rows(n, length, k, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, n)
    m = int(counts.sum())
    return CacheRows(
        example_index=np.arange(n, dtype=np.int64), sample_index=rng.integers(0, 3, n).astype(np.int32),
        t=rng.random(n).astype(np.float32), input_ids=rng.integers(0, 99, (n, length)).astype(np.int32),
        attention_mask=rng.integers(0, 2, (n, length)).astype(np.int8), x0=rng.integers(0, 99, (n, length)).astype(np.int32),
        num_masked=counts, masked_positions=rng.integers(0, length, m).astype(np.int32),
        topk_ids=rng.integers(0, 99, (m, k)).astype(np.int32), topk_logprobs=-rng.random((m, k)).astype(np.float16),
    )


def test_write_read_round_trip(tmp_path):
    length, k = 9, 4
    header = {"teacher_fingerprint": "t", "tokenizer_sha256": "s", "data_fingerprint": "d", "params_hash": "p",
              "layout": {"length": length}, "vocab_size": 99, "num_shards": 2, "top_k": k, "record_batch_rows": 4}
    ensure_manifest(tmp_path, header)
    blocks = [random_rows(7, length, k, seed) for seed in (0, 1)]
    for index, rows in enumerate(blocks):
        with ShardWriter(tmp_path, index, cache_schema(length, k), record_batch_rows=4) as writer:
            writer.write(rows.slice(0, 3))
            writer.write(rows.slice(3, 7))
            writer.close()
    assert finalize_manifest(tmp_path)
    cache = open_cache(tmp_path)
    assert len(cache) == 14 and cache.num_batches == 4  # 7 rows -> batches of 4 + 3, per shard
    for index, rows in enumerate(blocks):
        offsets = np.concatenate(([0], np.cumsum(rows.num_masked)))
        for i in range(7):
            record = cache[index * 7 + i]
            a, b = offsets[i], offsets[i + 1]
            assert record["example_index"] == i and record["t"] == rows.t[i]
            assert np.array_equal(record["input_ids"], rows.input_ids[i])
            assert np.array_equal(record["attention_mask"], rows.attention_mask[i])
            assert np.array_equal(record["x0"], rows.x0[i])
            assert np.array_equal(record["masked_positions"], rows.masked_positions[a:b])
            assert np.array_equal(record["topk_ids"], rows.topk_ids[a:b])
            assert record["topk_logprobs"].dtype == np.float16
            assert np.array_equal(record["topk_logprobs"], rows.topk_logprobs[a:b])
    assert cache[-1]["example_index"] == 6


def test_stored_logprobs_equal_a_fresh_teacher_forward(workdir, tmp_path):
    summary = fill(workdir, tmp_path / "cache")
    assert summary["complete"] and summary["shards_total"] == 15  # 120 examples, 8 per shard
    cache = open_cache(tmp_path / "cache")
    assert len(cache) == 120 * 3
    model, _, _ = load_teacher(workdir / "artifacts" / "teacher")
    layout = Layout.load(workdir / "data")
    saw_full_mask = False
    for i in range(0, len(cache), 17):
        row = cache[i]
        masked = row["input_ids"] == model.config.mask_token_id
        assert np.array_equal(np.flatnonzero(masked), row["masked_positions"])
        assert row["masked_positions"].min() >= layout.prompt_length and len(row["masked_positions"]) >= 1
        assert np.array_equal(row["x0"][~masked], row["input_ids"][~masked])
        saw_full_mask |= row["t"] == 1.0 and masked[layout.prompt_length:].all()
        with torch.no_grad():
            logits = model(torch.tensor(row["input_ids"][None]).long(),
                           attention_mask=torch.tensor(row["attention_mask"][None]).long())[0]
        logprobs = torch.log_softmax(logits[torch.tensor(row["masked_positions"]).long()], dim=-1)
        values, ids = logprobs.topk(5, dim=-1)
        assert np.array_equal(row["topk_ids"], ids.numpy())
        assert np.allclose(row["topk_logprobs"].astype(np.float32), values.numpy(), atol=2e-3, rtol=1e-3)
        assert (np.diff(row["topk_logprobs"].astype(np.float32), axis=1) <= 0).all()
    assert saw_full_mask
    stats = cache_statistics(tmp_path / "cache")
    assert stats["rows"] == 360 and stats["bytes_per_masked_position_disk"] > 0


def shard_digests(directory):
    return {name: entry["sha256"] for name, entry in json.loads((directory / "manifest.json").read_text())["shards"].items()}


def test_deterministic_and_independent_of_the_process_split(workdir, tmp_path):
    fill(workdir, tmp_path / "a")
    fill(workdir, tmp_path / "b", batch_size=13)  # forward batch size is speed only
    assert shard_digests(tmp_path / "a") == shard_digests(tmp_path / "b")
    first = fill(workdir, tmp_path / "split", shard_index=0, num_shards=2)
    assert not first["complete"] and first["shards_written"] == 8  # shards 0, 2, ..., 14
    with pytest.raises(CacheError, match="incomplete cache .8 of 15 shards"):
        open_cache(tmp_path / "split")
    assert fill(workdir, tmp_path / "split", shard_index=1, num_shards=2)["complete"]
    rows = lambda d: {(r["example_index"], r["sample_index"], r["t"], r["topk_ids"].tobytes()) for r in open_cache(d)}
    assert rows(tmp_path / "split") == rows(tmp_path / "a")
    assert shard_digests(tmp_path / "split") == shard_digests(tmp_path / "a")
    again = fill(workdir, tmp_path / "a")  # rerun: everything skipped
    assert again["shards_written"] == 0 and again["shards_skipped"] == 15


def test_mismatched_params_or_teacher_are_refused(workdir, tmp_path):
    fill(workdir, tmp_path / "cache", max_examples=16)
    with pytest.raises(CacheError, match=r"params_hash .*\(cache.top_k: 5 -> 6\)"):  # names the key that differs
        fill(workdir, tmp_path / "cache", max_examples=16, top_k=6)
    fill(workdir, tmp_path / "replaced", max_examples=16)
    fill(workdir, tmp_path / "other", max_examples=16, top_k=6)  # what the replacement must equal
    assert fill(workdir, tmp_path / "replaced", max_examples=16, top_k=6, replace_other=True)["complete"]
    assert sorted(p.name for p in (tmp_path / "replaced").iterdir()) == sorted(p.name for p in (tmp_path / "other").iterdir())
    assert shard_digests(tmp_path / "replaced") == shard_digests(tmp_path / "other")  # dvc.yaml's --replace-other
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    manifest["teacher_fingerprint"] = "0" * 16  # another teacher's manifest (with its own header digest)
    manifest["header_sha256"] = header_digest(manifest)
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="teacher_fingerprint"):
        fill(workdir, tmp_path / "cache", max_examples=16)


@pytest.mark.parametrize("edit", ["sampler_steps", "num_shards", "top_k", "no_digest"])
def test_an_edited_manifest_is_refused_by_every_reader(workdir, tmp_path, edit):
    """Editing the manifest's body (the rollouts' sampler steps 7 -> 3, a shard count of 1e9) used to
    train another student with exit 0, or spin; the header's digest now refuses it, in one line."""
    fill(workdir, tmp_path / "cache", max_examples=16, rollouts={"per_example": 2, "rollouts_per_shard": 8})
    path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    if edit == "sampler_steps":
        manifest["rollouts"]["sampler"]["steps"] = 3
    elif edit == "num_shards":
        manifest.update(complete=False, num_shards=10**9)
    elif edit == "top_k":
        manifest["top_k"] = 4
    else:
        del manifest["header_sha256"]
    path.write_text(json.dumps(manifest))
    match = "written by an older stage one" if edit == "no_digest" else "edited after stage one wrote it"
    for read in (open_cache, open_rollouts, lambda d: fill(workdir, d, max_examples=16,
                                                           rollouts={"per_example": 2, "rollouts_per_shard": 8})):
        with pytest.raises(CacheError, match=match):
            read(tmp_path / "cache")


def test_shards_of_another_cache_are_not_relabelled(workdir, tmp_path):
    """With the manifest deleted and cache.seed changed, a rerun used to adopt the old shards as the
    new cache's (exit 0, complete); their sidecars carry the params hash they were written with."""
    fill(workdir, tmp_path / "cache", max_examples=16)
    (tmp_path / "cache" / "manifest.json").unlink()
    with pytest.raises(CacheError, match=r"shard-00000.json: this shard was written with params_hash \w+, the manifest has"):
        fill(workdir, tmp_path / "cache", max_examples=16, seed=1)


def test_a_rerun_rewrites_damaged_shards_it_would_skip(workdir, tmp_path):
    """A damaged shard used to count as complete on a rerun; now its checksum is checked and the
    shard written again, to the same bytes as a fresh cache."""
    fill(workdir, tmp_path / "cache", max_examples=16)
    reference = shard_digests(tmp_path / "cache")
    shard = tmp_path / "cache" / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    again = fill(workdir, tmp_path / "cache", max_examples=16)
    assert again["complete"] and again["shards_written"] == 1
    assert shard_digests(tmp_path / "cache") == reference
    assert len(open_cache(tmp_path / "cache")) == 16 * 3


def test_a_rerun_rewrites_a_shard_whose_sidecar_is_cut_short(workdir, tmp_path):
    """A truncated sidecar used to stop every rerun with a JSONDecodeError until deleted by hand."""
    fill(workdir, tmp_path / "cache", max_examples=16)
    reference = shard_digests(tmp_path / "cache")
    sidecar = tmp_path / "cache" / "shard-00001.json"
    sidecar.write_text(sidecar.read_text()[:20])
    again = fill(workdir, tmp_path / "cache", max_examples=16)
    assert again["complete"] and again["shards_written"] == 1
    assert shard_digests(tmp_path / "cache") == reference
    assert len(open_cache(tmp_path / "cache")) == 16 * 3


def test_a_manifest_missing_a_shard_entry_is_refused_by_name(workdir, tmp_path):
    fill(workdir, tmp_path / "cache", max_examples=16)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    del manifest["shards"]["00001"]
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"manifest.json: no entry for shard-00001.arrow"):
        open_cache(tmp_path / "cache")


def test_top_k_above_the_vocabulary_names_the_key(workdir, tmp_path):
    with pytest.raises(ParamsError, match=r"params.yaml:cache.top_k: 99 exceeds the vocabulary \(43\)"):
        fill(workdir, tmp_path / "cache", top_k=99)


def test_a_teacher_with_non_finite_outputs_is_refused(workdir, tmp_path):
    """Finite weights whose logits overflow: NaN log-probs are refused, not cached as complete."""
    params = from_mapping(CacheParams, {**SMALL, "max_examples": 16}, "cache")
    model, _, record = load_teacher(workdir / "artifacts" / "teacher")
    with torch.no_grad():
        model.transformer["ln_f"].weight.fill_(1e38)
    layout = Layout.load(workdir / "data")
    with pytest.raises(CacheError, match="shard 0: the teacher's log-probs are NaN"):
        fill_cache(model, load_train_split(workdir / "data", 16), layout, params, tmp_path / "cache",
                   cache_header(record, layout, params, workdir / "data", model))
    assert not json.loads((tmp_path / "cache" / "manifest.json").read_text())["complete"]
    assert not list((tmp_path / "cache").glob("shard-*"))


def assert_damage_refused(shard, open_family, cut: int) -> None:
    """A flipped bit in ``shard`` fails its checksum, and the shard cut short by ``cut`` bytes its
    size check (without checksums), each refused naming the file."""
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{shard.name}: checksum mismatch"):
        open_family(shard.parent)
    shard.write_bytes(bytes(data[:-cut]))
    with pytest.raises(CacheError, match=rf"{shard.name}: size .*truncated"):
        open_family(shard.parent, verify=False)


def test_damaged_shards_are_refused_by_name(workdir, tmp_path):
    fill(workdir, tmp_path / "cache", max_examples=16)
    assert_damage_refused(tmp_path / "cache" / "shard-00001.arrow", open_cache, cut=100)


def kill_stage_one_after(work, params: dict, sidecars: str):
    """Run ``stages/cache_teacher.py`` in ``work`` with ``params`` and SIGKILL it as soon as a
    sidecar matching ``sidecars`` exists; returns the command (to rerun it) and the cache directory."""
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, str(ROOT / "stages" / "cache_teacher.py")]
    process = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = work / "artifacts" / "cache"
    deadline = time.time() + 300
    while not list(cache.glob(sidecars)) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return command, cache


def test_killed_run_resumes_to_the_same_cache(tmp_path):
    work = make_workdir(tmp_path / "work", train_per_task=600, d_model=64)
    params = {"cache": {**SMALL, "rows_per_shard": 300, "record_batch_rows": 64, "batch_size": 50}}
    command, cache = kill_stage_one_after(work, params, "shard-*.json")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert not manifest["complete"], "the run finished before it could be killed: make it longer"
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(cache)
    complete = {p.name for p in cache.glob("shard-*.json")}
    assert 0 < len(complete) < manifest["num_shards"]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(cache.glob(".shard-*"))  # the killed run's temporary file is gone
    reference = tmp_path / "reference"
    fill(work, reference, **params["cache"])
    assert shard_digests(cache) == shard_digests(reference)
    assert len(open_cache(cache)) == 600 * 4 * 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_topk_on_masked_rows_equals_the_full_logits_topk(tiny_checkpoint, dtype, cfg_scale, chunk_rows):
    """The head, log-softmax and top-k on the masked positions only (in chunks of 3 rows, or one)
    give the cache rows of the full (B, T, V) logits: the same ids, and the same float16 log-probs."""
    from pipeline.cache.fill import teacher_topk
    from pipeline.models.llada import LLaDA

    model = LLaDA.from_pretrained(tiny_checkpoint, dtype=dtype)
    layout = Layout(prompt_length=4, gen_length=6, pad_token_id=0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(3, model.config.vocab_size, (5, 10), generator=g)
    attention = torch.ones_like(x0)
    attention[0, :2] = 0
    masked = torch.rand(5, 10, generator=g) < 0.5
    masked[:, :4], masked[:, -1] = False, True
    x_t = x0.masked_fill(masked, model.config.mask_token_id)
    chunk = None if chunk_rows is None else chunk_rows * 4 * model.config.embedding_size
    ids, logprobs = teacher_topk(model, x_t, attention, masked, layout, 5, cfg_scale, chunk_bytes=chunk)

    with torch.no_grad():  # the computation before: guided logits for every position, then the masked rows
        predict = lambda x: model(input_ids=x, attention_mask=torch.cat((attention, attention)))  # noqa: E731
        prompt = attention.bool() & (torch.arange(10) < 4)
        cond, un = predict(torch.cat((x_t, x_t.masked_fill(prompt, model.config.mask_token_id)))).chunk(2)
        logits = un + (cfg_scale + 1) * (cond - un) if cfg_scale else model(input_ids=x_t, attention_mask=attention)
        values, expected = torch.log_softmax(logits[masked].float(), dim=-1).topk(5, dim=-1)
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float16
    assert torch.equal(ids, expected.int()) and torch.equal(logprobs, values.half())


def test_a_rerun_keeps_a_live_writers_temporary_files(workdir, tmp_path):
    """Two stage-one runs on one directory: the second deletes only the temporaries of writers that are
    gone, never a live process's in-progress shard (which then died with FileNotFoundError)."""
    import subprocess
    import sys

    fill(workdir, tmp_path / "cache", max_examples=16)
    reference = shard_digests(tmp_path / "cache")
    (tmp_path / "cache" / "shard-00001.json").unlink()  # shard 1 pending again
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # another live process
    try:
        live = tmp_path / "cache" / f".shard-00001.arrow.tmp-{writer.pid}"  # what it is writing
        dead = tmp_path / "cache" / f".shard-00001.arrow.tmp-{gone}"
        for temporary in (live, dead):
            temporary.write_bytes(b"part of a shard")
        again = fill(workdir, tmp_path / "cache", max_examples=16)
        assert live.exists() and not dead.exists()
    finally:
        writer.kill()
    assert again["complete"] and again["shards_written"] == 1
    assert shard_digests(tmp_path / "cache") == reference


def test_the_reader_keeps_a_bounded_number_of_shards_open(workdir, tmp_path, monkeypatch):
    """A cache of more shards than ``MAX_OPEN_SHARDS`` (a LLaDA-8B cache has thousands; the usual limit
    is 1024 open files) reads every batch, the same as with all shards open, holding at most that many
    shard files open."""
    import os

    from pipeline.cache import shards

    fill(workdir, tmp_path / "cache", max_examples=16, rows_per_shard=9, record_batch_rows=4)
    expected = open_cache(tmp_path / "cache")
    assert len(expected.shards.paths) >= 4
    batches = [expected.record_batch(j) for j in range(expected.num_batches)]
    monkeypatch.setattr(shards, "MAX_OPEN_SHARDS", 1)

    def open_shard_files() -> int:
        fds = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
        return sum(1 for target in fds if target.startswith(str((tmp_path / "cache").resolve())))

    del expected
    before = open_shard_files()
    cache = open_cache(tmp_path / "cache")
    for j in list(range(cache.num_batches)) * 2:
        assert cache.record_batch(j).equals(batches[j])
        assert open_shard_files() - before <= 1 + 1  # the open shard, and the batch just read keeps its map


@pytest.mark.parametrize("edit,message", [
    ({"num_shards": 10**6, "complete": False, "redigest": True}, r"incomplete cache \(\d+ of 1000000 shards\)"),
    ({"num_shards": "13"}, r"damaged \(shard num_shards '13' is not an integer >= 0\)"),
    ({"num_shards": -1}, r"damaged \(shard num_shards -1 is not an integer >= 0\)"),
    ({"teacher_fingerprint": None, "drop": "teacher_fingerprint"}, r"damaged \(no teacher_fingerprint\)"),
])
def test_a_lying_manifest_is_refused_without_counting_to_its_num_shards(workdir, tmp_path, monkeypatch, edit, message):
    """A billion shards in an incomplete manifest used to make every reader look for a billion sidecars;
    a string count or a missing key were tracebacks. The work is bounded by the files present (an edited
    count is refused by the header digest first: tests above)."""
    from pipeline.cache import shards
    from pipeline.core.errors import CacheError

    fill(workdir, tmp_path / "cache", max_examples=16)
    path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    drop, redigest = edit.pop("drop", None), edit.pop("redigest", False)
    manifest.update(edit)
    manifest.pop(drop, None)
    if redigest:  # as if stage one itself had been asked for a million shards
        manifest["header_sha256"] = header_digest(manifest)
    path.write_text(json.dumps(manifest))
    names = []
    sidecar_name = shards.sidecar_name
    monkeypatch.setattr(shards, "sidecar_name", lambda *a: names.append(a) or sidecar_name(*a))
    with pytest.raises(CacheError, match=message):
        open_cache(tmp_path / "cache")
    assert len(names) < 100  # sidecars looked up: those present, not num_shards of them
