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
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import CheckpointError
from pipeline.models.layers import Attention, RMSNorm, RopeTables, prefixed_attention
from pipeline.models.mask_predictor import MaskPredictor, check_shared_fields, config_from_dict, config_from_file


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
        check_shared_fields(self, "LLaDA")
        for key, allowed in self._REQUIRED.items():
            if key in self.extra and self.extra[key] not in allowed:
                raise ValueError(
                    f"LLaDA config: {key}={self.extra[key]!r} is not supported (expected one of {allowed})"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Features of each head that RoPE rotates (all of them in LLaDA)."""
        return self.head_dim

    @property
    def architecture(self) -> str:
        return "llada"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LLaDAConfig":
        return config_from_dict(cls, data)

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
        return config_from_file(cls, path, "llada")


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
        out = prefixed_attention(q, k, v, rope, bias, prefix, gate, attention)  # (B, H, T, D)
        return self.attn_out(out.transpose(1, 2).reshape(B, T, c.d_model))


class LLaDA(MaskPredictor):
    """The LLaDA mask predictor. ``forward`` returns logits (B, T, embedding_size)."""

    config_class = LLaDAConfig

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
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

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model.transformer

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer["blocks"]

    @property
    def final_norm(self) -> nn.Module:
        return self.transformer["ln_f"]

    @property
    def embedding(self) -> nn.Embedding:
        return self.transformer["wte"]

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.config.weight_tying else self.transformer["ff_out"].weight

    def scale_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.config.d_model**0.5 if self.config.input_emb_norm else x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().head(hidden)
        return logits / math.sqrt(self.config.d_model) if self.config.scale_logits else logits


__all__ = ["LLaDA", "LLaDAConfig", "CheckpointError", "Attention"]
