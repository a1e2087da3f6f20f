"""The trainable part of the student: (r, t) -> prefix keys/values for every attention layer."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

Conditioning = Literal["r_t", "t_interval"]


@dataclasses.dataclass
class SoftPromptConfig:
    """Shape and time conditioning of the soft prompt."""

    prompt_length: int = 8
    """P: prefix positions per layer."""
    time_features: int = 32
    """Sinusoidal features per time scalar (half sine, half cosine)."""
    max_frequency: float = 16.0
    """Largest angular frequency of the features; t lives in [0, 1]. Large values (the 1000*t of
    image diffusion) make du/dt huge under the JVP and training unstable."""
    hidden_size: int = 256
    """Width of the 2-layer MLP."""
    conditioning: Conditioning = "r_t"
    """Inputs of the time encoder: ``r_t`` embeds (r, t) (the seed's choice); ``t_interval`` embeds
    (t, t - r), which MeanFlow reports slightly better."""

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ValueError(f"soft prompt: prompt_length must be >= 1, got {self.prompt_length}")
        if self.time_features < 2 or self.time_features % 2:
            raise ValueError(f"soft prompt: time_features must be an even number >= 2, got {self.time_features}")
        if not self.max_frequency >= 1.0:
            raise ValueError(f"soft prompt: max_frequency must be >= 1, got {self.max_frequency}")
        if self.hidden_size < 1:
            raise ValueError(f"soft prompt: hidden_size must be >= 1, got {self.hidden_size}")
        if self.conditioning not in ("r_t", "t_interval"):
            raise ValueError(f"soft prompt: conditioning must be 'r_t' or 't_interval', got {self.conditioning!r}")


class TimeFeatures(nn.Module):
    """Sinusoidal features of a scalar in [0, 1]: frequencies log-spaced in [1, max_frequency]."""

    def __init__(self, features: int, max_frequency: float) -> None:
        super().__init__()
        freqs = torch.exp(torch.linspace(0.0, math.log(max_frequency), features // 2))
        self.register_buffer("frequencies", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.frequencies.to(t.dtype)[None, :]  # (B, F/2)
        return torch.cat((angles.sin(), angles.cos()), dim=-1)  # (B, F)


class SoftPrompt(nn.Module):
    """MLP(concat(emb(a), emb(b))) -> prefix (B, n_layers, 2, n_kv_heads, P, head_dim), plus a
    zero-initialized per-layer, per-head gate on the prefix attention, so that at initialization the
    student equals its base model exactly."""

    def __init__(self, config: SoftPromptConfig, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.prefix_shape = (n_layers, 2, n_kv_heads, config.prompt_length, head_dim)
        self.time_features = TimeFeatures(config.time_features, config.max_frequency)
        self.prompt_mlp = nn.Sequential(
            nn.Linear(2 * config.time_features, config.hidden_size),
            nn.SiLU(),
            nn.Linear(config.hidden_size, math.prod(self.prefix_shape)),
        )
        self.prompt_gate = nn.Parameter(torch.zeros(n_layers, n_heads))

    def forward(self, r: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r, t: (B,) in [0, 1]. Returns (prefix (B, L, 2, Hkv, P, D), gate (L, H))."""
        a, b = (r, t) if self.config.conditioning == "r_t" else (t, t - r)
        features = torch.cat((self.time_features(a), self.time_features(b)), dim=-1)  # (B, 2F)
        prefix = self.prompt_mlp(features)  # (B, L*2*Hkv*P*D)
        return prefix.view(r.shape[0], *self.prefix_shape), self.prompt_gate
