"""LLaDA, implemented natively and checkpoint-compatible with the Hugging Face LLaDA layout.

A LLaMA-style transformer with fully bidirectional attention: RMSNorm, SwiGLU MLP, RoPE (rotary in
fp32), no biases, untied output head, optional grouped-query attention. Parameter names and
``config.json`` fields are exactly those of ``GSAI-ML/LLaDA-8B-*`` so that their weights load
unchanged and a model we train is itself a valid LLaDA checkpoint directory.

Differences from an autoregressive LLaMA that matter for this project:

* no causal mask; position ``i`` predicts token ``i`` (no shift); no time input;
* ``prefix``: per-layer keys/values placed in front of the sequence's keys/values *before* RoPE,
  exactly like LLaDA's own ``layer_past`` path, so the prefix takes positions ``0..P-1`` and the
  tokens ``P..P+T-1``. With ``prefix_gate`` the prefix gets its own softmax whose output is scaled
  by ``tanh(gate)`` and added (LLaMA-Adapter), so a zero gate leaves the model unchanged.
* ``attention="sdpa"`` uses the fused kernels; ``attention="math"`` is an explicit softmax
  attention, required under forward-mode AD (``torch.func.jvp``): the fused SDPA kernels have no
  forward derivative ("Trying to use forward AD with _scaled_dot_product_flash_attention").
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from pipeline.checkpoint_io import (
    CheckpointError,
    read_json,
    resolve_weight_files,
    write_sharded_safetensors,
)

Attention = Literal["sdpa", "math"]
CONFIG_NAME = "config.json"


@dataclasses.dataclass
class LLaDAConfig:
    """The fields of a LLaDA ``config.json`` that define the network (names as in the checkpoint).

    Fields this implementation does not use are kept verbatim in ``extra`` and written back on save.
    """

    d_model: int = 4096
    """Hidden size. (Defaults are LLaDA-8B's, except those a config.json must state.)"""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads; ``head_dim = d_model // n_heads``."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention when smaller than ``n_heads``)."""
    mlp_hidden_size: int | None = None
    """SwiGLU inner size; ``mlp_ratio * d_model`` when absent (LLaDA-8B: 12288)."""
    mlp_ratio: int = 4
    """Used only when ``mlp_hidden_size`` is absent."""
    vocab_size: int = 126464
    """Tokenizer vocabulary size."""
    embedding_size: int | None = None
    """Rows of the embedding and output head (``>= vocab_size``, padded for efficiency)."""
    rope_theta: float = 500000.0
    """RoPE base."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    max_sequence_length: int = 4096
    """Longest sequence (prefix excluded) the model accepts."""
    mask_token_id: int = 126336
    """Id of the [MASK] token. LLaDA's tokenizer sets no mask token: this is the source of truth."""
    eos_token_id: int | None = None
    """End-of-text id (also the padding id of LLaDA's SFT data)."""
    pad_token_id: int | None = None
    """Padding id."""
    weight_tying: bool = False
    """Share the embedding matrix with the output head."""
    input_emb_norm: bool = False
    """Scale input embeddings by ``sqrt(d_model)``."""
    scale_logits: bool = False
    """Scale logits by ``1 / sqrt(d_model)``."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Other ``config.json`` fields, preserved for round trips."""

    # Values of these keys that this implementation cannot honour; anything else is refused.
    _REQUIRED = {
        "block_type": ("llama",),
        "layer_norm_type": ("rms",),
        "activation_type": ("silu",),
        "rope_full_precision": (True,),
        "alibi": (False,),
        "rope": (True,),
        "include_bias": (False,),
        "include_qkv_bias": (False, None),
        "bias_for_layer_norm": (False, None),
        "attention_layer_norm": (False,),
        "clip_qkv": (None,),
        "multi_query_attention": (None, False),
    }

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LLaDA config: {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"LLaDA config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LLaDA config: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("LLaDA config: head_dim must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            raise ValueError(
                f"LLaDA config: embedding_size {self.embedding_size} < vocab_size {self.vocab_size}"
            )
        if not 0 <= self.mask_token_id < self.embedding_size:
            raise ValueError(
                f"LLaDA config: mask_token_id {self.mask_token_id} outside the embedding "
                f"(size {self.embedding_size})"
            )
        for key, allowed in self._REQUIRED.items():
            if key in self.extra and self.extra[key] not in allowed:
                raise ValueError(
                    f"LLaDA config: {key}={self.extra[key]!r} is not supported (expected one of {allowed})"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LLaDAConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data.update(self.extra)
        data.setdefault("model_type", "llada")
        data.setdefault("architectures", ["LLaDAModelLM"])
        data.setdefault("block_type", "llama")
        data.setdefault("layer_norm_type", "rms")
        data.setdefault("activation_type", "silu")
        data.setdefault("rope", True)
        data.setdefault("alibi", False)
        data.setdefault("include_bias", False)
        return data

    @classmethod
    def from_file(cls, path: str | Path) -> "LLaDAConfig":
        data = read_json(path)
        if data.get("model_type", "llada") != "llada":
            raise CheckpointError(f"{path}: model_type {data.get('model_type')!r} is not 'llada'")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: {err}") from err


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


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for ``positions`` (any shape S), in fp32 (fp64 if asked): each (*S, head_dim)."""
    dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim))
    freqs = positions.to(dtype)[..., None] * inv_freq  # (*S, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (*S, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., N, head_dim) in fp32 (fp64 stays fp64) and cast back."""
    dtype = x.dtype
    xf = upcast(x)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos.to(xf.dtype) + rotated * sin.to(xf.dtype)).to(dtype)


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
        cos, sin = rope_cos_sin(positions[:, None], config.head_dim, config.rope_theta)  # (B, 1, T, D)
        if P == 0:
            return cls(cos, sin, None, None)
        prefix_positions = torch.arange(-P, 0, device=device, dtype=dtype)[None, None]  # (1, 1, P)
        prefix_cos, prefix_sin = rope_cos_sin(prefix_positions, config.head_dim, config.rope_theta)
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


class LLaDABlock(nn.Module):
    """One LLaDA "llama" block: pre-norm attention and SwiGLU MLP, with residuals."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        d, kv = config.d_model, config.n_kv_heads * config.head_dim
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: "RopeTables",
        bias: torch.Tensor | None,
        prefix: torch.Tensor | None,
        gate: torch.Tensor | None,
        attention: Attention,
    ) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), rope, bias, prefix, gate, attention)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    def attention(self, x, rope: "RopeTables", bias, prefix, gate, attention: Attention) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        P = 0 if prefix is None else prefix.shape[-2]
        q = apply_rope(q, rope.cos, rope.sin)
        k = apply_rope(k, rope.cos, rope.sin)
        groups = c.n_heads // c.n_kv_heads
        if prefix is not None:
            pk = apply_rope(prefix[:, 0].to(k.dtype), rope.prefix_cos, rope.prefix_sin)  # (B, Hkv, P, D)
            pv = prefix[:, 1].to(v.dtype)
            pk = pk.repeat_interleave(groups, dim=1) if groups > 1 else pk
            pv = pv.repeat_interleave(groups, dim=1) if groups > 1 else pv
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if prefix is None:
            out = attend(q, k, v, bias, attention)
        elif gate is None:  # one softmax over [prefix; tokens], as LLaDA's layer_past
            if bias is not None:
                bias = F.pad(bias.expand(B, -1, T, -1), (P, 0))
            out = attend(q, torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2), bias, attention)
        else:  # separate prefix softmax, scaled by tanh(gate) per head (LLaMA-Adapter)
            out = attend(q, k, v, bias, attention)
            scale = torch.tanh(gate).to(out.dtype).view(1, c.n_heads, 1, 1)
            out = out + scale * attend(q, pk, pv, None, attention)
        out = out.transpose(1, 2).reshape(B, T, c.d_model)  # (B, T, C)
        return self.attn_out(out)


class LLaDA(nn.Module):
    """The LLaDA mask predictor. ``forward`` returns logits (B, T, embedding_size)."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_size, config.d_model),
                blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
            )
        )
        if not config.weight_tying:
            self.model.transformer["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.source_path: Path | None = None

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> "LLaDA":
        """Normal(0, std) for matrices, ones for norms (LLaDA's ``init_fn: normal``)."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)
        return self

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model.transformer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, T, C) of ``input_ids`` (B, T)."""
        return self.transformer["wte"](input_ids)

    @property
    def embedding_weight(self) -> torch.Tensor:
        """The input embedding matrix (embedding_size, C)."""
        return self.transformer["wte"].weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix_gate: torch.Tensor | None = None,
        attention: Attention = "sdpa",
    ) -> torch.Tensor:
        """Logits (B, T, V): ``head(hidden(...))``; arguments as ``hidden``."""
        return self.head(self.hidden(input_ids, inputs_embeds, prefix, attention_mask, prefix_gate, attention))

    def hidden(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix_gate: torch.Tensor | None = None,
        attention: Attention = "sdpa",
    ) -> torch.Tensor:
        """The trunk: final-normed hidden states (B, T, C), from which ``head`` gives logits per position.

        input_ids (B, T) or inputs_embeds (B, T, C); attention_mask (B, T), 1 = attend, covering the
        tokens only (the prefix is always visible); prefix (n_layers, 2, n_kv_heads, P, head_dim),
        shared by the batch, or (B, n_layers, 2, n_kv_heads, P, head_dim); prefix_gate
        (n_layers, n_heads) switches the prefix to gated attention.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        x, bias, prefix, rope = prepare_inputs(self.config, x, prefix, attention_mask)
        if self.config.input_emb_norm:
            x = x * self.config.d_model**0.5
        for i, block in enumerate(self.transformer["blocks"]):
            x = block(
                x,
                rope,
                bias,
                None if prefix is None else prefix[:, i],
                None if prefix_gate is None else prefix_gate[i],
                attention,
            )
        return self.transformer["ln_f"](x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of final hidden states (..., C): a per-position map, so it can run on the
        rows that need it only."""
        weight = self.transformer["wte"].weight if self.config.weight_tying else self.transformer["ff_out"].weight
        logits = F.linear(hidden, weight)
        if self.config.scale_logits:
            logits = logits / math.sqrt(self.config.d_model)
        return logits

    # ------------------------------------------------------------------ checkpoint I/O

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> "LLaDA":
        """Load a Hugging Face LLaDA directory: ``config.json`` plus ``model.safetensors`` or shards
        listed in ``model.safetensors.index.json``. ``dtype=None`` keeps the stored dtype."""
        path = Path(path)
        config = LLaDAConfig.from_file(path / CONFIG_NAME)
        files = resolve_weight_files(path)
        with torch.device("meta"):
            model = cls(config)
        expected = set(model.state_dict())
        state: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(str(file), framework="pt", device=str(device or "cpu")) as f:
                for key in f.keys():
                    if key not in expected:
                        raise CheckpointError(f"{file}: unexpected tensor {key!r} for a LLaDA with this config")
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None else tensor
        missing = expected - set(state)
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for key, tensor in state.items():
            want = tuple(model.state_dict()[key].shape)
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, config implies {want}")
        model.load_state_dict(state, strict=True, assign=True)
        model.source_path = path
        return model.eval()

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write ``config.json`` and safetensors weights (sharded above ``max_shard_bytes``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        data = self.config.to_dict()
        data["torch_dtype"] = str(next(self.parameters()).dtype).removeprefix("torch.")
        (path / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        write_sharded_safetensors(state, path, max_shard_bytes)


__all__ = ["LLaDA", "LLaDAConfig", "CheckpointError"]
