"""LLaDA-MoE (``inclusionAI/LLaDA-MoE-7B-A1B-*``), implemented natively and checkpoint-compatible.

OLMoE-style blocks with bidirectional attention, as the public reference modeling code
(``modeling_lladamoe.py``) computes them:

* attention: q/k/v projections (optional bias), **QK-norm**: an RMSNorm over each head's
  ``head_dim`` on q and k after projection and before RoPE, optional ``clip_qkv``, RoPE on the
  first ``partial_rotary_factor * head_dim`` features, grouped-query attention;
* MLP: a sparse MoE block where ``moe_layer_freq[i] != 0``, a dense SwiGLU of width
  ``dense_intermediate_size`` elsewhere, plus an optional shared expert (layer-level
  ``shared_expert``) added to the MoE output;
* routing: softmax over all experts in float32, optional ``expert_bias`` added to those
  probabilities, top-k; the selected (biased) probabilities are the weights, renormalized only when
  ``norm_topk_prob``; experts are SwiGLU (``down(silu(gate(x)) * up(x))``).

The reference ignores ``attention_mask`` (every position attends to every other); this model
honours it for left-padded batches, and agrees with the reference when there is no padding.

The student's prefix enters each layer's attention as keys already in the QK-normed space, before
RoPE, at positions -P..-1 (``pipeline.models.layers.prefixed_attention``, as for dense LLaDA). The cached
keys of the reference's own ``past_key_value`` path live in that space too (QK-norm is applied per
token to projections of hidden states; a prefix has no hidden state). For a learned prefix the
choice loses nothing: a fixed position's RoPE is a fixed rotation, so learning the key before or
after it is a reparameterization, and normalizing a learned key would only restrict it to the
norm's fixed-RMS sphere (and add a nonlinearity to the JVP).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.layers import Attention, RMSNorm, RopeTables, prefixed_attention, upcast
from pipeline.models.mask_predictor import (MOE_FIELDS, MaskPredictor, check_shared_fields, config_from_dict,
                                            config_from_file)


@dataclasses.dataclass
class LLaDAMoEConfig:
    """The fields of a LLaDA-MoE ``config.json`` that define the network (names as in the checkpoint).

    Fields without a default must be in the file. Others are kept verbatim in ``extra``."""

    hidden_size: int
    """Model width (LLaDA-MoE-7B-A1B: 2048)."""
    num_hidden_layers: int
    """Number of decoder layers (16)."""
    num_attention_heads: int
    """Query heads (16); ``head_dim = hidden_size // num_attention_heads``."""
    vocab_size: int
    """Rows of the embedding and the output head."""
    num_experts: int
    """Routed experts per MoE layer (64)."""
    num_experts_per_tok: int
    """Experts each token is routed to (8)."""
    expert_intermediate_size: int
    """SwiGLU width of each routed expert (1024)."""
    num_key_value_heads: int | None = None
    """Key/value heads (grouped-query attention when fewer than the query heads)."""
    dense_intermediate_size: int | None = None
    """SwiGLU width of the dense layers (required when some ``moe_layer_freq`` entry is 0)."""
    shared_expert_intermediate_size: int | None = None
    """Width of the shared expert added to every MoE layer's output; null: none."""
    moe_layer_freq: list[int] | None = None
    """Per layer: 0 = dense MLP, otherwise MoE. Null: every layer is MoE."""
    norm_topk_prob: bool = False
    """Renormalize the top-k routing weights to sum to 1 (LLaDA-MoE: no)."""
    moe_router_enable_expert_bias: bool | None = None
    """A per-expert bias (buffer ``mlp.expert_bias``) added to the routing probabilities before top-k."""
    moe_router_score_function: str = "softmax"
    """Only softmax routing exists in the reference."""
    qk_layernorm: bool = True
    """RMSNorm over each head of q and k, before RoPE."""
    partial_rotary_factor: float = 1.0
    """Fraction of each head's features that RoPE rotates."""
    rope_theta: float = 50000.0
    """RoPE base."""
    rope_scaling: dict | None = None
    """Only unscaled RoPE is implemented."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    max_position_embeddings: int = 4096
    """Longest sequence (prefix excluded) the model accepts."""
    mask_token_id: int = 156895
    """[MASK] id (LLaDA-MoE's configs may not carry it: this default is LLaDA-MoE's)."""
    eos_token_id: int | None = None
    """End-of-text id (LLaDA-MoE: 156892)."""
    pad_token_id: int | None = None
    """Padding id."""
    attention_bias: bool = False
    """Biases on the q/k/v/o projections."""
    clip_qkv: float | None = None
    """Clamp q, k, v to [-clip_qkv, clip_qkv] after QK-norm."""
    hidden_act: str = "silu"
    """Activation of every SwiGLU (only silu)."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the output head."""
    routed_scaling_factor: float = 1.0
    """The reference ignores this field; any other value than 1 is refused rather than guessed at."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Other ``config.json`` fields, preserved for round trips."""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_layer_freq is None:
            self.moe_layer_freq = [1] * self.num_hidden_layers
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "num_experts", "num_experts_per_tok", "expert_intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"LLaDA-MoE config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"LLaDA-MoE config: num_experts_per_tok {self.num_experts_per_tok} > num_experts "
                             f"{self.num_experts}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("LLaDA-MoE config: hidden_size must divide into num_attention_heads heads, and those "
                             "into num_key_value_heads groups")
        if "head_dim" in self.extra and self.extra["head_dim"] != self.head_dim:
            raise ValueError(f"LLaDA-MoE config: head_dim {self.extra['head_dim']} != hidden_size // "
                             f"num_attention_heads = {self.head_dim} (the reference uses the latter)")
        if not (0 < self.partial_rotary_factor <= 1 and self.rotary_dim % 2 == 0 and self.rotary_dim > 0):
            raise ValueError(f"LLaDA-MoE config: partial_rotary_factor {self.partial_rotary_factor} gives "
                             f"{self.rotary_dim} rotary features of {self.head_dim}; need a positive even number")
        check_shared_fields(self, "LLaDA-MoE")
        if len(self.moe_layer_freq) != self.num_hidden_layers:
            raise ValueError(f"LLaDA-MoE config: moe_layer_freq has {len(self.moe_layer_freq)} entries for "
                             f"{self.num_hidden_layers} layers")
        if not all(self.is_moe_layer(i) for i in range(self.num_hidden_layers)) and not self.dense_intermediate_size:
            raise ValueError("LLaDA-MoE config: moe_layer_freq has dense layers (0) but no dense_intermediate_size")
        refused = {
            "moe_router_score_function": (self.moe_router_score_function, ("softmax",)),
            "rope_scaling": (self.rope_scaling, (None,)),
            "hidden_act": (self.hidden_act, ("silu",)),
            "routed_scaling_factor": (self.routed_scaling_factor, (1, 1.0, None)),
        }
        for key, (value, allowed) in refused.items():
            if value not in allowed:
                raise ValueError(f"LLaDA-MoE config: {key}={value!r} is not supported (expected one of {allowed})")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"LLaDA-MoE config: mask_token_id {self.mask_token_id} outside the vocabulary "
                             f"(size {self.vocab_size}); pass teacher.mask_token_id")

    # The names the rest of the pipeline uses for every architecture.
    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def embedding_size(self) -> int:
        return self.vocab_size

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    @property
    def architecture(self) -> str:
        return "llada_moe"

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_layer_freq[i] != 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LLaDAMoEConfig":
        missing = [key for key in MOE_FIELDS if key not in data]
        if missing:
            raise ValueError(f"a LLaDA-MoE config needs {', '.join(MOE_FIELDS)}; missing {', '.join(missing)}")
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data.update(self.extra)
        data.setdefault("model_type", "lladamoe")
        data.setdefault("architectures", ["LLaDAMoEModelLM"])
        return data

    @classmethod
    def from_file(cls, path: str | Path) -> "LLaDAMoEConfig":
        return config_from_file(cls, path, "llada_moe")


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: the dense MLP, each expert, the shared expert."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, width, bias=False)
        self.up_proj = nn.Linear(d, width, bias=False)
        self.down_proj = nn.Linear(width, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Router (``gate``) and routed experts. Tokens are grouped per expert with one sort, so each
    expert runs one matmul on its contiguous group (the Python loop is over experts, never tokens)."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.expert_intermediate_size) for _ in range(config.num_experts)
        )
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        else:
            self.expert_bias = None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (N, k) in h's dtype, experts (N, k) long) for tokens h (N, C).

        The choice of experts is piecewise constant in h; the weights are differentiable (also under
        forward-mode AD), as in the reference."""
        probs = torch.softmax(upcast(self.gate(h)), dim=-1)  # (N, E), float32 (float64 stays)
        if self.expert_bias is not None:
            probs = probs + self.expert_bias.to(probs.dtype)
        weights, experts = torch.topk(probs, self.config.num_experts_per_tok, dim=-1)  # (N, k)
        if self.config.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(h.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = x.reshape(-1, C)  # (N, C)
        weights, experts = self.route(h)
        return grouped_dispatch(self.experts, h, weights, experts).view(B, T, C)


def grouped_dispatch(experts: nn.ModuleList, h: torch.Tensor, weights: torch.Tensor,
                     chosen: torch.Tensor) -> torch.Tensor:
    """sum_j weights[n, j] * experts[chosen[n, j]](h[n]) for tokens h (N, C): (N, C).

    The N*k assignments are sorted by expert once; each expert then runs on one contiguous slice,
    and the outputs go back to their tokens by the inverse permutation (gathers only: forward-mode
    AD and float64 work)."""
    N, k = chosen.shape
    flat = chosen.reshape(-1)  # (N*k,)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    counts = torch.bincount(flat, minlength=len(experts)).tolist()  # the one host sync
    inputs = h[order // k]  # (N*k, C), expert-major
    outputs = torch.cat([experts[e](group) for e, group in enumerate(inputs.split(counts)) if counts[e]])
    outputs = outputs[torch.argsort(order)].view(N, k, -1)  # back to (token, slot)
    return (outputs * weights[..., None]).sum(dim=1)


def reference_dispatch(experts: nn.ModuleList, h: torch.Tensor, weights: torch.Tensor,
                       chosen: torch.Tensor) -> torch.Tensor:
    """The reference modeling code's dispatch: for every expert, find its tokens in a one-hot mask
    and ``index_add_`` its weighted output. The oracle for ``grouped_dispatch`` in tests and in
    ``benchmarks/moe_dispatch.py``; not used by the model."""
    out = torch.zeros_like(h)
    mask = F.one_hot(chosen, num_classes=len(experts)).permute(2, 1, 0)  # (E, k, N)
    for e, expert in enumerate(experts):
        slot, token = torch.where(mask[e])
        out.index_add_(0, token, expert(h[token]) * weights[token, slot, None])
    return out


class MoEAttention(nn.Module):
    """Attention with QK-norm before RoPE (names as the checkpoint's ``self_attn``)."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.config = config
        d, kv = config.hidden_size, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, kv, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, kv, bias=config.attention_bias)
        self.o_proj = nn.Linear(d, d, bias=config.attention_bias)
        if config.qk_layernorm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x, rope: RopeTables, bias, prefix, gate, attention: Attention) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, c.n_heads, c.head_dim)
        k = self.k_proj(x).view(B, T, c.n_kv_heads, c.head_dim)
        v = self.v_proj(x).view(B, T, c.n_kv_heads, c.head_dim)
        if c.qk_layernorm:  # per head, over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:
            q, k, v = (y.clamp(-c.clip_qkv, c.clip_qkv) for y in (q, k, v))
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # (B, H or Hkv, T, D)
        out = prefixed_attention(q, k, v, rope, bias, prefix, gate, attention)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, c.hidden_size))


class MoEDecoderLayer(nn.Module):
    """Pre-norm attention and MLP (sparse MoE or dense, plus the shared expert), with residuals."""

    def __init__(self, config: LLaDAMoEConfig, index: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.self_attn = MoEAttention(config)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        moe = config.is_moe_layer(index)
        self.mlp = SparseMoE(config) if moe else SwiGLU(d, config.dense_intermediate_size)
        if moe and config.shared_expert_intermediate_size is not None:
            self.shared_expert = SwiGLU(d, config.shared_expert_intermediate_size)
        else:
            self.shared_expert = None

    def forward(self, x, rope: RopeTables, bias, prefix, gate, attention: Attention) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, bias, prefix, gate, attention)
        h = self.post_attention_layernorm(x)
        out = self.mlp(h)
        if self.shared_expert is not None:
            out = out + self.shared_expert(h)
        return x + out


class LLaDAMoE(MaskPredictor):
    """The LLaDA-MoE mask predictor. ``forward`` returns logits (B, T, vocab_size)."""

    config_class = LLaDAMoEConfig

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__(config)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(MoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.config.tie_word_embeddings else self.lm_head.weight
