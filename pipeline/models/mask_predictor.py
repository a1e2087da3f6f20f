"""What every architecture the pipeline distils shares: the mask predictor's interface and its
checkpoint directory I/O.

A ``MaskPredictor`` maps token ids (or input embeddings) to logits at every position, with no time
input and no shift (position ``i`` predicts token ``i``). Its trunk (``hidden``) is a stack of
blocks that accept per-layer prefix keys/values (the student's soft prompt); its ``head`` is a
per-position map, so the logits can be computed on the rows that need them only. LLaDA
(``pipeline.models.llada``) and LLaDA-MoE (``pipeline.models.llada_moe``) are its two implementations;
``pipeline.models.registry.load_model`` picks one from a checkpoint's ``config.json``.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from torch import nn

from pipeline.core.errors import CheckpointError
from pipeline.models.checkpoint_check import check_weight_files
from pipeline.models.checkpoint_io import read_json, resolve_weight_files, write_sharded_safetensors
from pipeline.models.layers import Attention, prepare_inputs

CONFIG_NAME = "config.json"
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "expert_intermediate_size")
"""The fields without which a LLaDA-MoE config cannot be built (and whose presence marks one)."""


def architecture_of(data: dict[str, Any]) -> str:
    """``"llada_moe"`` or ``"llada"`` for a ``config.json``'s content, else ``""``.

    Real LLaDA-MoE configs may say ``model_type: llada``; their ``architectures`` entry
    (``LLaDAMoEModelLM``) or expert fields decide. Dense LLaDA configs may omit both keys."""
    architectures = data.get("architectures") or []
    names = architectures if isinstance(architectures, list) else [architectures]
    if data.get("model_type") == "lladamoe" or any("MoE" in str(n) for n in names) or any(k in data for k in MOE_FIELDS):
        return "llada_moe"
    if data.get("model_type", "llada") == "llada":
        return "llada"
    return ""


class MaskPredictor(nn.Module, abc.ABC):
    """Base class. Subclasses set ``config_class`` and build ``blocks`` (each called as
    ``block(x, rope, bias, prefix, gate, attention)``), ``final_norm``, ``embedding`` (nn.Embedding)
    and ``head_weight``."""

    config_class: type

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.source_path: Path | None = None
        self.checkpoint_blocks = False
        """Activation checkpointing: with gradients on, each block's activations are recomputed in the
        backward pass instead of kept (``student.activation_checkpointing``)."""

    # ------------------------------------------------------------------ subclass parts

    @property
    @abc.abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""

    @property
    @abc.abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm applied after the last block."""

    @property
    @abc.abstractmethod
    def embedding(self) -> nn.Embedding:
        """The input embedding."""

    @property
    @abc.abstractmethod
    def head_weight(self) -> torch.Tensor:
        """The output head (embedding_size, C)."""

    def scale_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Input embeddings as the first block sees them (identity unless the architecture scales)."""
        return x

    # ------------------------------------------------------------------ the network

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Normal(0, std) for matrices, ones for vectors (norm weights); buffers untouched."""
        for p in self.parameters():
            with torch.no_grad():
                if p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)
        return self

    @property
    def embedding_weight(self) -> torch.Tensor:
        """The input embedding matrix (embedding_size, C)."""
        return self.embedding.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, T, C) of ``input_ids`` (B, T)."""
        return self.embedding(input_ids)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """Logits (B, T, V): ``head(hidden(...))``; arguments as ``hidden``."""
        return self.head(self.hidden(*args, **kwargs))

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
        x = self.scale_inputs(x)
        recompute = self.checkpoint_blocks and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            inputs = (x, rope, bias, None if prefix is None else prefix[:, i],
                      None if prefix_gate is None else prefix_gate[i], attention)
            x = torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False) if recompute else block(*inputs)
        return self.final_norm(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of final hidden states (..., C): a per-position map, so it can run on the
        rows that need it only."""
        return F.linear(hidden, self.head_weight)

    # ------------------------------------------------------------------ checkpoint I/O

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> "MaskPredictor":
        """Load a Hugging Face checkpoint directory: ``config.json`` plus ``model.safetensors`` or
        shards listed in ``model.safetensors.index.json``. ``dtype=None`` keeps the stored dtype."""
        path = Path(path)
        config = cls.config_class.from_file(path / CONFIG_NAME)
        files = resolve_weight_files(path)
        with torch.device("meta"):
            model = cls(config)
        check_weight_files(files, {name: tuple(t.shape) for name, t in model.state_dict().items()})
        state: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(str(file), framework="pt", device=str(device or "cpu")) as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None else tensor
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


def check_shared_fields(config, name: str) -> None:
    """What both architectures' configs must satisfy: RoPE's base and the norm's epsilon are finite
    and positive (NaN or 0 would make every output NaN, which then looks like a training problem),
    and the mask token is not the end-of-sequence token (every answer would end at its first
    masked position)."""
    for key in ("rope_theta", "rms_norm_eps"):
        value = getattr(config, key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
            raise ValueError(f"{name} config: {key} must be a finite number > 0, got {value!r}")
    if config.eos_token_id is not None and config.mask_token_id == config.eos_token_id:
        raise ValueError(f"{name} config: mask_token_id {config.mask_token_id} is the eos_token_id")


def config_from_dict(config_class, data: dict[str, Any]):
    """A config dataclass from a ``config.json``'s content: its own fields by name, everything else
    kept verbatim in ``extra`` (written back on save)."""
    names = {f.name for f in dataclasses.fields(config_class)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    return config_class(**known, extra={k: v for k, v in data.items() if k not in names})


def config_from_file(config_class, path: str | Path, architecture: str):
    """``config_class`` built from the JSON at ``path``, refusing another architecture's config.
    Errors name the file."""
    data = read_json(path)
    found = architecture_of(data)
    if found != architecture:
        described = found or f"model_type {data.get('model_type')!r}"
        raise CheckpointError(f"{path}: a {described} config, not {architecture}")
    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err
