"""Layers shared by both architectures (LLaDA, LLaDA-MoE): RMSNorm, RoPE, attention with a prefix.

Attention is bidirectional (no causal mask). ``attention="sdpa"`` uses the fused kernels;
``attention="math"`` is an explicit softmax attention, required under forward-mode AD
(``torch.func.jvp``): the fused SDPA kernels have no forward derivative ("Trying to use forward AD
with _scaled_dot_product_flash_attention").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Attention = Literal["sdpa", "math"]


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled (LLaDA's ``RMSLayerNorm``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = upcast(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 to fp32 for numerically sensitive ops; fp32 and fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for ``positions`` (any shape S), in fp32 (fp64 if asked): each (*S, rotary_dim)."""
    dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=dtype) / rotary_dim))
    freqs = positions.to(dtype)[..., None] * inv_freq  # (*S, rotary_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (*S, rotary_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., N, head_dim) in fp32 (fp64 stays fp64) and cast back. Tables narrower than
    ``head_dim`` (partial rotary) rotate the first ``cos.shape[-1]`` features and pass the rest."""
    dtype = x.dtype
    xf = upcast(x)
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        xf, passed = xf[..., :rotary], xf[..., rotary:]
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = xf * cos.to(xf.dtype) + rotated * sin.to(xf.dtype)
    if rotary < x.shape[-1]:
        out = torch.cat((out, passed), dim=-1)
    return out.to(dtype)


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Explicit attention with composite ops only, so forward-mode AD works through it.

    q: (B, H, T, D), k/v: (B, H, S, D), bias: additive, broadcastable to (B, H, T, S).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(upcast(scores), dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


def attend(q, k, v, bias, attention: Attention) -> torch.Tensor:
    if attention == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if attention == "math":
        return softmax_attention(q, k, v, bias)
    raise ValueError(f"attention must be 'sdpa' or 'math', got {attention!r}")


@dataclasses.dataclass
class RopeTables:
    """cos/sin for the tokens (B or 1, 1, T, D) and the prefix (1, 1, P, D), computed once per forward."""

    cos: torch.Tensor
    sin: torch.Tensor
    prefix_cos: torch.Tensor | None
    prefix_sin: torch.Tensor | None

    @classmethod
    def build(cls, config, T: int, P: int, attention_mask, device, dtype) -> "RopeTables":
        """Real tokens take positions 0, 1, ... in order (left padding does not count), and the
        prefix the P positions just before them. Relative to the first real token this is LLaDA's
        ``layer_past`` placement (prefix 0..P-1, tokens P..P+T-1); counting from it keeps the
        prefix-token distance independent of padding, and keeps token-token rotations bitwise
        identical with and without a prefix (fp RoPE at large positions is not shift invariant)."""
        if attention_mask is None:
            positions = torch.arange(T, device=device, dtype=dtype)[None]  # (1, T)
        else:
            positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0).to(dtype)  # (B, T)
        cos, sin = rope_cos_sin(positions[:, None], config.rotary_dim, config.rope_theta)  # (B, 1, T, R)
        if P == 0:
            return cls(cos, sin, None, None)
        prefix_positions = torch.arange(-P, 0, device=device, dtype=dtype)[None, None]  # (1, 1, P)
        prefix_cos, prefix_sin = rope_cos_sin(prefix_positions, config.rotary_dim, config.rope_theta)
        return cls(cos, sin, prefix_cos, prefix_sin)


def prepare_inputs(config, x, prefix, attention_mask):
    """Checks and per-forward tables shared by every block: returns (x (B, T, C), the additive
    attention bias (B, 1, 1, T) or None, the prefix as (B, L, 2, Hkv, P, D) or None, RopeTables).
    ``config`` needs n_layers, n_kv_heads, head_dim, rope_theta and max_sequence_length."""
    B, T, _ = x.shape
    if T > config.max_sequence_length:
        raise ValueError(f"sequence length {T} exceeds max_sequence_length {config.max_sequence_length}")
    bias = None
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T)
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~keep, torch.finfo(x.dtype).min)
    if prefix is not None:
        if prefix.dim() == 5:
            prefix = prefix.unsqueeze(0).expand(B, *prefix.shape)
        expected = (config.n_layers, 2, config.n_kv_heads)
        if prefix.dim() != 6 or tuple(prefix.shape[1:4]) != expected or prefix.shape[-1] != config.head_dim:
            raise ValueError(
                f"prefix must be (B, {expected[0]}, 2, {expected[2]}, P, {config.head_dim}), "
                f"got {tuple(prefix.shape)}"
            )
    rope = RopeTables.build(
        config, T, 0 if prefix is None else prefix.shape[-2], attention_mask, x.device,
        torch.float64 if x.dtype == torch.float64 else torch.float32,
    )
    return x, bias, prefix, rope


def prefixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: "RopeTables",
    bias: torch.Tensor | None,
    prefix: torch.Tensor | None,
    gate: torch.Tensor | None,
    attention: Attention,
) -> torch.Tensor:
    """Bidirectional attention of the tokens over [prefix; tokens], RoPE applied here: (B, H, T, D).

    q (B, H, T, D) and k, v (B, Hkv, T, D) are the projections *before* RoPE (and after any QK-norm);
    prefix (B, 2, Hkv, P, D) holds keys/values in that same space, rotated at positions -P..-1.
    Without ``gate`` one softmax covers [prefix; tokens] (LLaDA's ``layer_past``); with ``gate`` (H,)
    the prefix gets its own softmax, scaled by tanh(gate) per head and added (LLaMA-Adapter)."""
    B, H, T, _ = q.shape
    groups = H // k.shape[1]
    q = apply_rope(q, rope.cos, rope.sin)
    k = apply_rope(k, rope.cos, rope.sin)
    if prefix is not None:
        P = prefix.shape[-2]
        pk = apply_rope(prefix[:, 0].to(k.dtype), rope.prefix_cos, rope.prefix_sin)  # (B, Hkv, P, D)
        pv = prefix[:, 1].to(v.dtype)
        pk = pk.repeat_interleave(groups, dim=1) if groups > 1 else pk
        pv = pv.repeat_interleave(groups, dim=1) if groups > 1 else pv
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if prefix is None:
        return attend(q, k, v, bias, attention)
    if gate is None:  # one softmax over [prefix; tokens], as LLaDA's layer_past
        if bias is not None:
            bias = F.pad(bias.expand(B, -1, T, -1), (P, 0))
        return attend(q, torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2), bias, attention)
    out = attend(q, k, v, bias, attention)  # separate prefix softmax, scaled by tanh(gate) per head
    scale = torch.tanh(gate).to(out.dtype).view(1, H, 1, 1)
    return out + scale * attend(q, pk, pv, None, attention)
