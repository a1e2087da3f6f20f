"""LLaDA-MoE against the reference checkpoint, against a naive transcription of the reference's
math (every feature the fixture lacks), and its routing and dispatch."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.core.errors import CheckpointError
from pipeline.models.layers import apply_rope, rope_cos_sin
from pipeline.models.llada import LLaDA
from pipeline.models.llada_moe import LLaDAMoE, LLaDAMoEConfig, grouped_dispatch, reference_dispatch
from pipeline.models.registry import load_model
from tests.conftest import REFERENCE_MOE_CHECKPOINT, random_moe, tiny_moe_config


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_reference_parity(attention):
    model = load_model(REFERENCE_MOE_CHECKPOINT)
    assert isinstance(model, LLaDAMoE)
    expected = load_file(str(REFERENCE_MOE_CHECKPOINT / "expected_logits.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], attention=attention)
    assert logits.shape == expected["logits"].shape
    assert (logits - expected["logits"]).abs().max().item() < 1e-4


def naive_logits(model: LLaDAMoE, ids: torch.Tensor) -> torch.Tensor:
    """The reference modeling code's forward written out from its state dict, token by token for
    the routing: QK-norm per head before RoPE, rotate_half on the first rotary features, repeat_kv,
    softmax routing over all experts (+ expert bias) then top-k, dense layers, the shared expert."""
    c, w = model.config, model.state_dict()
    H, Hkv, D, R = c.n_heads, c.n_kv_heads, c.head_dim, c.rotary_dim
    B, T = ids.shape

    def rms(v, name):
        return w[name] * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)

    def linear(v, name):
        return v @ w[name].T

    def swiglu(v, p):
        return linear(F.silu(linear(v, p + "gate_proj.weight")) * linear(v, p + "up_proj.weight"), p + "down_proj.weight")

    angles = torch.arange(T, dtype=torch.float64)[:, None] / c.rope_theta ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, R/2)

    def rotate(v):  # (B, T, heads, D)
        a, b = v[..., : R // 2], v[..., R // 2 : R]
        return torch.cat((a * cos - b * sin, b * cos + a * sin, v[..., R:]), dim=-1)

    x = w["model.embed_tokens.weight"][ids]
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        h = rms(x, p + "input_layernorm.weight")
        q = rms(linear(h, p + "self_attn.q_proj.weight").view(B, T, H, D), p + "self_attn.q_norm.weight")
        k = rms(linear(h, p + "self_attn.k_proj.weight").view(B, T, Hkv, D), p + "self_attn.k_norm.weight")
        v = linear(h, p + "self_attn.v_proj.weight").view(B, T, Hkv, D)
        q, k = rotate(q), rotate(k)
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        probs = torch.softmax(torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D), dim=-1)
        x = x + linear(torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, -1), p + "self_attn.o_proj.weight")
        h = rms(x, p + "post_attention_layernorm.weight")
        if not c.is_moe_layer(i):
            x = x + swiglu(h, p + "mlp.")
            continue
        out = torch.zeros_like(h)
        for b in range(B):
            for t in range(T):
                scores = torch.softmax(linear(h[b, t], p + "mlp.gate.weight"), dim=-1)
                if p + "mlp.expert_bias" in w:
                    scores = scores + w[p + "mlp.expert_bias"]
                top, chosen = scores.topk(c.num_experts_per_tok)
                if c.norm_topk_prob:
                    top = top / top.sum()
                for weight, e in zip(top, chosen.tolist()):
                    out[b, t] += weight * swiglu(h[b, t], p + f"mlp.experts.{e}.")
        if c.shared_expert_intermediate_size is not None:
            out = out + swiglu(h, p + "shared_expert.")
        x = x + out
    return linear(rms(x, "model.norm.weight"), "lm_head.weight")


def test_naive_transcription_reproduces_the_reference():
    """The naive forward below is itself checked against the reference's logits."""
    model = load_model(REFERENCE_MOE_CHECKPOINT, dtype=torch.float64)
    expected = load_file(str(REFERENCE_MOE_CHECKPOINT / "expected_logits.safetensors"))
    with torch.no_grad():
        assert (naive_logits(model, expected["input_ids"]) - expected["logits"].double()).abs().max() < 1e-4


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_every_feature_equals_the_naive_forward(norm_topk_prob, attention):
    """Dense layer, shared expert, GQA, partial rotary, expert bias, renormalization: the features
    the reference fixture does not exercise."""
    config = tiny_moe_config(40, 39, norm_topk_prob=norm_topk_prob)
    model = random_moe(config, seed=1, std=0.3).double()
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(ids, attention=attention), naive_logits(model, ids), atol=1e-10)


def test_routing_is_softmax_over_all_experts_then_top_k():
    config = tiny_moe_config(40, 39, moe_router_enable_expert_bias=False)
    moe = random_moe(config, seed=3, std=0.5).double().blocks[1].mlp
    h = torch.randn(20, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weights, experts = moe.route(h)
    probs = torch.softmax(h @ moe.gate.weight.T, dim=-1)
    assert torch.equal(experts, probs.topk(2).indices)
    assert torch.allclose(weights, probs.gather(1, experts))
    assert (weights.sum(-1) < 1).all()  # no renormalization
    moe.config.norm_topk_prob = True
    assert torch.allclose(moe.route(h)[0].sum(-1), torch.ones(20, dtype=torch.float64))


def test_grouped_dispatch_equals_the_reference_loop():
    config = tiny_moe_config(40, 39, num_experts=8, num_experts_per_tok=3)
    experts = random_moe(config, seed=5).double().blocks[1].mlp.experts
    g = torch.Generator().manual_seed(6)
    h = torch.randn(50, 32, generator=g, dtype=torch.float64)
    chosen = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(50)])  # expert 7 gets no token
    weights = torch.rand(50, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(grouped_dispatch(experts, h, weights, chosen), reference_dispatch(experts, h, weights, chosen),
                          atol=1e-13)


@pytest.mark.parametrize("max_shard_bytes", [1 << 40, 20_000])
def test_save_load_round_trip(tmp_path, max_shard_bytes):
    model = random_moe(tiny_moe_config(40, 39), seed=7)
    model.save_pretrained(tmp_path, max_shard_bytes=max_shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_bytes < 1 << 40)
    again = load_model(tmp_path)
    assert isinstance(again, LLaDAMoE)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LLaDAMoEModelLM"]


def test_config_decides_the_architecture(tmp_path):
    """Real LLaDA-MoE configs may say model_type llada; the architectures entry decides."""
    copy = tmp_path / "moe"
    shutil.copytree(REFERENCE_MOE_CHECKPOINT, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "llada"}))
    assert isinstance(load_model(copy), LLaDAMoE)
    with pytest.raises(CheckpointError, match="not llada"):
        LLaDA.from_pretrained(copy)
    (copy / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64}))
    with pytest.raises(CheckpointError, match="neither LLaDA nor LLaDA-MoE"):
        load_model(copy)


@pytest.mark.parametrize("case", ["missing_expert_fields", "missing_expert", "mask_outside_vocab", "unsupported"])
def test_bad_moe_checkpoints_are_refused_clearly(tmp_path, case):
    copy = tmp_path / "moe"
    shutil.copytree(REFERENCE_MOE_CHECKPOINT, copy)
    config = json.loads((copy / "config.json").read_text())
    if case == "missing_expert_fields":
        del config["num_experts"], config["expert_intermediate_size"]
        expected = "config.json: a LLaDA-MoE config needs .*missing num_experts, expert_intermediate_size"
    elif case == "missing_expert":
        weights = load_file(str(copy / "model.safetensors"))
        for name in [k for k in weights if k.startswith("model.layers.1.mlp.experts.5.")]:
            del weights[name]
        save_file(weights, str(copy / "model.safetensors"))
        expected = r"model.safetensors\) lack 3 tensors .*model.layers.1.mlp.experts.5.down_proj.weight"
    elif case == "mask_outside_vocab":
        del config["mask_token_id"]  # the default, LLaDA-MoE-7B's 156895, is outside this vocabulary
        expected = "mask_token_id 156895 outside the vocabulary"
    else:
        config["rope_scaling"] = {"type": "linear", "factor": 2.0}
        expected = "rope_scaling=.* is not supported"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=expected):
        load_model(copy)


def test_partial_rotary_passes_the_other_features_through():
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(5.0, dtype=torch.float64), 4, 10000.0)
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:]) and not torch.allclose(out[..., 1:, :4], x[..., 1:, :4])
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_config_validation():
    with pytest.raises(ValueError, match="dense layers .* no dense_intermediate_size"):
        tiny_moe_config(40, 39, dense_intermediate_size=None)
    with pytest.raises(ValueError, match="moe_layer_freq has 3 entries for 2 layers"):
        tiny_moe_config(40, 39, moe_layer_freq=[1, 1, 1])
    with pytest.raises(ValueError, match="num_experts_per_tok 7 > num_experts 6"):
        tiny_moe_config(40, 39, num_experts_per_tok=7)
    assert LLaDAMoEConfig.from_dict(json.loads((REFERENCE_MOE_CHECKPOINT / "config.json").read_text())).rotary_dim == 16
