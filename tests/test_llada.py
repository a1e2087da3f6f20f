"""Our LLaDA against the reference checkpoint, and the identities its prefix/JVP paths rely on."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.errors import CheckpointError
from pipeline.models.checkpoint_io import checkpoint_fingerprint
from pipeline.models.llada import LLaDA, LLaDAConfig
from tests.conftest import make_checkpoint


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_reference_parity(reference_checkpoint, attention):
    model = LLaDA.from_pretrained(reference_checkpoint)
    expected = load_file(str(reference_checkpoint / "expected_logits.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], attention=attention)
    assert logits.shape == expected["logits"].shape
    assert (logits - expected["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/model.safetensors", "..", 7])
def test_an_index_naming_files_outside_its_directory_is_refused(reference_checkpoint, tmp_path, name):
    """A sharded index names shard files of its own directory; a path (even to an existing file
    elsewhere) is refused, naming it, before anything is read."""
    model = LLaDA.from_pretrained(reference_checkpoint)
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=100_000)
    shutil.copy(next((tmp_path / "ckpt").glob("model-*.safetensors")), tmp_path / "outside.safetensors")
    index_file = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    index_file.write_text(json.dumps(index))
    message = (f"names the weight file '{name}', which is not a file name" if isinstance(name, str)
               else "every 'weight_map' value must be a weight file name")
    with pytest.raises(CheckpointError, match=message):
        LLaDA.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("key, value, message", [
    ("rope_theta", 0.0, "rope_theta must be a finite number > 0"),
    ("rope_theta", -5.0, "rope_theta must be a finite number > 0"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number > 0"),
    ("eos_token_id", "mask", "mask_token_id 92 is the eos_token_id"),
])
def test_a_config_that_would_make_every_output_wrong_is_refused(reference_checkpoint, tmp_path, key, value, message):
    """A NaN or non-positive rope_theta or rms_norm_eps used to load, then fail as a NaN loss blamed
    on the learning rate; a mask id equal to EOS ended every answer at its first masked position."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(reference_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config[key] = config["mask_token_id"] if value == "mask" else value
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        LLaDA.from_pretrained(checkpoint)


def test_config_field_names(reference_checkpoint):
    model = LLaDA.from_pretrained(reference_checkpoint)
    c = model.config
    assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.mask_token_id) == (64, 2, 4, 4, 96, 92)
    assert c.mlp_hidden_size == 160 and c.rope_theta == 500000.0


@pytest.mark.parametrize("max_shard_bytes", [1 << 40, 100_000])
def test_save_load_round_trip(reference_checkpoint, tmp_path, max_shard_bytes):
    model = LLaDA.from_pretrained(reference_checkpoint)
    model.save_pretrained(tmp_path, max_shard_bytes=max_shard_bytes)
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 1 << 40)
    if sharded:
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    again = LLaDA.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert json.loads((tmp_path / "config.json").read_text())["mask_token_id"] == 92


def test_bfloat16_load(reference_checkpoint):
    ids = load_file(str(reference_checkpoint / "expected_logits.safetensors"))["input_ids"]
    fp32 = LLaDA.from_pretrained(reference_checkpoint)
    bf16 = LLaDA.from_pretrained(reference_checkpoint, dtype=torch.bfloat16)
    assert bf16.transformer["wte"].weight.dtype == torch.bfloat16
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids).float()
    assert (a - b).abs().max() < 0.03 * a.abs().max()  # bf16 keeps ~3 significant digits per op
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def gqa_and_equivalent_mha(seed=0):
    config = LLaDAConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=40, mask_token_id=39)
    gqa = LLaDA(config).init_weights(std=0.3, generator=torch.Generator().manual_seed(seed)).double()
    mha = LLaDA(LLaDAConfig(**{**config.__dict__, "n_kv_heads": 4, "extra": {}})).double()
    state = gqa.state_dict()
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):  # (Hkv*D, C) -> repeat each kv head
            w = state[key].view(2, 8, 32)
            state[key] = w.repeat_interleave(2, dim=0).reshape(4 * 8, 32)
    mha.load_state_dict(state)
    return gqa, mha


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_grouped_query_attention_equals_repeated_heads(attention):
    gqa, mha = gqa_and_equivalent_mha()
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(gqa(ids, attention=attention), mha(ids, attention=attention), atol=1e-10)


def capture_kv(model, ids):
    """Pre-RoPE keys/values of every layer for ``ids``: (B, L, 2, Hkv, T, D)."""
    c, seen = model.config, []
    hooks = [
        proj.register_forward_hook(lambda m, i, o: seen.append(o))
        for block in model.transformer["blocks"]
        for proj in (block.k_proj, block.v_proj)
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    B, T = ids.shape
    kv = [o.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2) for o in seen]  # (B, Hkv, T, D) each
    return torch.stack([torch.stack(kv[2 * i : 2 * i + 2], dim=1) for i in range(c.n_layers)], dim=1)


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_prefix_is_layer_past_before_rope(attention):
    """Keys/values of real tokens given as a prefix reproduce running those tokens in front.

    Only true if the prefix takes positions 0..P-1, is rotated with them, and shares the softmax."""
    gqa, _ = gqa_and_equivalent_mha(seed=3)
    ids = torch.randint(0, 40, (2, 13), generator=torch.Generator().manual_seed(2))
    P = 5
    with torch.no_grad():
        full = gqa(ids, attention=attention)
        # Layer i's pre-RoPE keys/values of the first P tokens, from the full run.
        prefix = capture_kv(gqa, ids)[..., :P, :]
        tail = gqa(ids[:, P:], prefix=prefix, attention=attention)
    assert torch.allclose(tail, full[:, P:], atol=1e-9)


def test_padding_is_invisible():
    gqa, _ = gqa_and_equivalent_mha()
    ids = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(4))
    padded = torch.cat((torch.randint(0, 40, (1, 4)), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)), dim=1)
    with torch.no_grad():
        for attention in ("sdpa", "math"):
            out = gqa(padded, attention_mask=mask, attention=attention)[:, 4:]
            assert torch.allclose(out, gqa(ids, attention=attention), atol=1e-10)


def test_jvp_matches_finite_differences():
    gqa, _ = gqa_and_equivalent_mha(seed=5)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(6))
    embeds = gqa.embed(ids).detach()
    direction = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def f(e):
        return gqa(inputs_embeds=e, attention="math")

    _, jvp = torch.func.jvp(f, (embeds,), (direction,))
    h = 1e-5
    with torch.no_grad():
        fd = (f(embeds + h * direction) - f(embeds - h * direction)) / (2 * h)
    assert (jvp - fd).abs().max() / fd.abs().max() < 1e-7


def test_fingerprint_tracks_content(reference_checkpoint, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference_checkpoint, copy)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(reference_checkpoint)
    model = LLaDA.from_pretrained(copy)
    with torch.no_grad():
        model.transformer["ff_out"].weight.mul_(1.01)
    model.save_pretrained(copy)
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(reference_checkpoint)


def test_full_fingerprint_sees_a_flipped_byte_the_sampled_one_cannot(tmp_path):
    """The sampled fingerprint reads the headers and a few slices of each weight file (here two slices
    of 64 bytes, so that the reference file has bytes between them); a byte flipped between the slices
    is invisible to it, and the full fingerprint sees it. A teacher recorded with the full one is
    refused by every stage that loads it."""
    from pipeline.teacher.artifact import TeacherRecord, load_teacher, tokenizer_hash

    copy = make_checkpoint(tmp_path / "teacher")
    weights = copy / "model.safetensors"
    sampled = lambda: checkpoint_fingerprint(copy, window=64, windows=2)  # noqa: E731
    before, before_full = sampled(), checkpoint_fingerprint(copy, full=True)
    assert before_full != checkpoint_fingerprint(copy)  # the two kinds never coincide
    TeacherRecord(checkpoint=".", fingerprint=before_full, mask_token_id=2, tokenizer_sha256=tokenizer_hash(copy),
                  builtin=True, fingerprint_full=True).save(copy)
    load_teacher(copy)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # a weight's low bit, between the two slices
    weights.write_bytes(bytes(data))
    assert sampled() == before
    assert checkpoint_fingerprint(copy, full=True) != before_full
    with pytest.raises(CheckpointError, match=f"has fingerprint .*, recorded {before_full}"):
        load_teacher(copy)


def test_bad_checkpoints_are_refused_clearly(reference_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        LLaDA.from_pretrained(tmp_path / "absent")
    broken = tmp_path / "broken"
    shutil.copytree(reference_checkpoint, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        LLaDA.from_pretrained(broken)
    shutil.copy(reference_checkpoint / "model.safetensors", broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "d_model": 128}))
    with pytest.raises(CheckpointError, match="shape"):
        LLaDA.from_pretrained(broken)
    (broken / "config.json").write_text(json.dumps({**config, "block_type": "sequential"}))
    with pytest.raises(CheckpointError, match="block_type"):
        LLaDA.from_pretrained(broken)
