"""The trainable part of the student: (r, t) -> prefix keys/values for every attention layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.core.params import SoftPromptConfig


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
    """MLP(concat(emb(a), emb(b)[, z])) -> prefix (B, n_layers, 2, n_kv_heads, P, head_dim), plus a
    zero-initialized per-layer, per-head gate on the prefix attention, so that at initialization the
    student equals its base model exactly, whatever the latent z (``config.latent_dim`` > 0)."""

    def __init__(self, config: SoftPromptConfig, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.prefix_shape = (n_layers, 2, n_kv_heads, config.prompt_length, head_dim)
        self.time_features = TimeFeatures(config.time_features, config.max_frequency)
        self.prompt_mlp = nn.Sequential(
            nn.Linear(2 * config.time_features + config.latent_dim, config.hidden_size),
            nn.SiLU(),
            nn.Linear(config.hidden_size, math.prod(self.prefix_shape)),
        )
        self.prompt_gate = nn.Parameter(torch.zeros(n_layers, n_heads))

    def forward(self, r: torch.Tensor, t: torch.Tensor, latent: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """r, t: (B,) in [0, 1]; latent: (B, latent_dim), required when latent_dim > 0.
        Returns (prefix (B, L, 2, Hkv, P, D), gate (L, H))."""
        a, b = (r, t) if self.config.conditioning == "r_t" else (t, t - r)
        features = [self.time_features(a), self.time_features(b)]  # 2 x (B, F)
        d = self.config.latent_dim
        if d:
            if latent is None or latent.shape != (r.shape[0], d):
                found = None if latent is None else tuple(latent.shape)
                raise ValueError(f"this soft prompt takes a latent of shape ({r.shape[0]}, {d}), got {found}")
            features.append(latent.to(features[0].dtype))
        elif latent is not None:
            raise ValueError("this soft prompt has no latent (latent_dim 0); pass latent=None")
        prefix = self.prompt_mlp(torch.cat(features, dim=-1))  # (B, L*2*Hkv*P*D)
        return prefix.view(r.shape[0], *self.prefix_shape), self.prompt_gate
