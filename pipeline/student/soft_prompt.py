"""The trainable part of the student: (r, t) -> prefix keys/values for every attention layer."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from pipeline.core.counter_random import CODEBOOK, counter_normal, counter_uniform
from pipeline.core.params import require, require_at_least


@dataclasses.dataclass
class SoftPromptConfig:
    """``student.soft_prompt``: shape and time conditioning of the soft prompt. A saved student records it in its ``student_config.json``."""

    prompt_length: int = 8
    """P: prefix positions per layer."""
    time_features: int = 32
    """Sinusoidal features per time scalar (half sine, half cosine)."""
    max_frequency: float = 16.0
    """Largest angular frequency of the features; t lives in [0, 1]. Large values (the 1000*t of
    image diffusion) make du/dt huge under the JVP and training unstable."""
    hidden_size: int = 64
    """Width of the 2-layer MLP (its output layer has hidden_size x n_layers*2*Hkv*P*D weights)."""
    conditioning: Literal["r_t", "t_interval"] = "r_t"
    """Inputs of the time encoder: ``r_t`` embeds (r, t) (the seed's choice); ``t_interval`` embeds
    (t, t - r), which MeanFlow reports slightly better."""
    latent_dim: int = 8
    """d: a per-generation latent z ~ N(0, I_d) enters the prompt MLP beside the time features, so
    one forward pass can emit different consistent answers; 0: no latent (students
    saved before the latent existed load with 0)."""
    codebook_size: int = 0
    """0: the latent's prior is N(0, I_d). K > 0: a code book of K fixed codes (code c is
    ``counter_normal(d, CODEBOOK, c)``), uniform prior: a completion draws one code, so the latent space
    has no regions between modes to blend them (training can then infer each rollout's code,
    ``student.selection: posterior``)."""
    latent_answer_positions: int = 0
    """0: z enters the prompt MLP only. G > 0 (the data's ``gen_length``): z also enters the input of
    the answer's G positions (the last G of the sequence), through a trainable map z -> (G, model
    width) added to their embeddings (zero-initialized: the student still equals its base), so each
    answer position gets its own view of z; ``benchmarks/perm_capacity.py`` measures what the
    prompt MLP alone can express."""
    anchor: Literal["none", "zero", "flag"] = "flag"
    """A designated latent for the teacher's greedy mode, trained on the greedy rollouts without
    selection and used by greedy one-completion decoding: ``zero`` (z = 0), ``flag`` (z = 0 and a
    1 beside z in the prompt MLP's input, 0 for drawn latents), ``none`` (every completion draws z;
    students saved before the anchor existed load with it). Without a latent (``latent_dim`` 0)
    there is nothing to designate: the anchor is ``none``."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, "prompt_length", "hidden_size", "max_frequency")
        require_at_least(self, 0, "latent_dim", "codebook_size", "latent_answer_positions")
        for key in ("codebook_size", "latent_answer_positions"):
            require(not getattr(self, key) or self.latent_dim > 0, key, "needs a latent (latent_dim > 0)")
        require(self.time_features >= 2 and self.time_features % 2 == 0, "time_features", "must be an even number >= 2")
        require(self.conditioning in ("r_t", "t_interval"), "conditioning", "must be 'r_t' or 't_interval'")
        require(self.anchor in ("none", "zero", "flag"), "anchor", "must be 'none', 'zero' or 'flag'")
        if not self.latent_dim:
            self.anchor = "none"


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
    """MLP(concat(emb(a), emb(b)[, z][, anchor flag])) -> prefix (B, n_layers, 2, n_kv_heads, P, head_dim), plus a
    zero-initialized per-layer, per-head gate on the prefix attention, so that at initialization the
    student equals its base model exactly, whatever the latent z (``config.latent_dim`` > 0). Rows
marked ``anchor`` get the greedy mode's latent (``config.anchor``) in place of theirs."""

    def __init__(self, config: SoftPromptConfig, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 model_width: int | None = None):
        super().__init__()
        self.config = config
        self.prefix_shape = (n_layers, 2, n_kv_heads, config.prompt_length, head_dim)
        self.time_features = TimeFeatures(config.time_features, config.max_frequency)
        self.prompt_mlp = nn.Sequential(
            nn.Linear(2 * config.time_features + config.latent_dim + (config.anchor == "flag"), config.hidden_size),
            nn.SiLU(),
            nn.Linear(config.hidden_size, math.prod(self.prefix_shape)),
        )
        self.prompt_gate = nn.Parameter(torch.zeros(n_layers, n_heads))
        codes = counter_normal(config.latent_dim, CODEBOOK, torch.arange(config.codebook_size))  # (K, d)
        self.register_buffer("codes", codes, persistent=False)
        self.answer_embedding = None
        if config.latent_answer_positions:
            width = model_width or n_heads * head_dim
            self.answer_embedding = nn.Linear(config.latent_dim, config.latent_answer_positions * width, bias=False)
            nn.init.zeros_(self.answer_embedding.weight)

    def prior_latents(self, *keys: torch.Tensor | int) -> torch.Tensor:
        """Latents drawn from the prior as a pure function of integer ``keys`` (broadcast to shape S):
        (*S, d) standard normals ``counter_normal(d, *keys)``, or with a code book the code
        ``floor(counter_uniform(*keys) * K)`` of it."""
        K = self.config.codebook_size
        if not K:
            return counter_normal(self.config.latent_dim, *keys).to(self.codes.device)
        return self.codes[self.prior_codes(*keys)]

    def prior_codes(self, *keys: torch.Tensor | int) -> torch.Tensor:
        """Code indices (shape S, int64) drawn uniformly from the code book by ``keys``."""
        K = self.config.codebook_size
        return (counter_uniform(*keys) * K).long().clamp(max=K - 1).to(self.codes.device)

    def forward(self, r: torch.Tensor, t: torch.Tensor, latent: torch.Tensor | None = None,
                anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """r, t: (B,) in [0, 1]; latent: (B, latent_dim), required when latent_dim > 0; anchor: (B,)
        bool, rows decoded with the greedy anchor (their latent is ignored), None: none.
        Returns (prefix (B, L, 2, Hkv, P, D), gate (L, H))."""
        a, b = (r, t) if self.config.conditioning == "r_t" else (t, t - r)
        features = [self.time_features(a), self.time_features(b)]  # 2 x (B, F)
        d, B = self.config.latent_dim, r.shape[0]
        if d:
            features.append(self.effective_latent(latent, anchor, B).to(features[0].dtype))
            if self.config.anchor == "flag":
                flag = anchor if anchor is not None else torch.zeros(B, dtype=torch.bool, device=r.device)
                features.append(flag.to(features[0].dtype)[:, None])  # (B, 1)
        elif latent is not None or anchor is not None:
            raise ValueError("this soft prompt has no latent (latent_dim 0); pass latent=None and anchor=None")
        prefix = self.prompt_mlp(torch.cat(features, dim=-1))  # (B, L*2*Hkv*P*D)
        return prefix.view(B, *self.prefix_shape), self.prompt_gate

    def effective_latent(self, latent: torch.Tensor | None, anchor: torch.Tensor | None, B: int) -> torch.Tensor:
        """The checked latent (B, d), with the anchor's z = 0 on the ``anchor`` rows."""
        d = self.config.latent_dim
        if latent is None or latent.shape != (B, d):
            found = None if latent is None else tuple(latent.shape)
            raise ValueError(f"this soft prompt takes a latent of shape ({B}, {d}), got {found}")
        if anchor is not None:
            if self.config.anchor == "none":
                raise ValueError("this soft prompt has no greedy anchor (anchor: none); pass anchor=None")
            if anchor.shape != (B,):
                raise ValueError(f"anchor must be a ({B},) bool tensor, got shape {tuple(anchor.shape)}")
            latent = latent.masked_fill(anchor[:, None], 0.0)
        return latent

    def answer_inputs(self, latent: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G, width) what z adds to the embeddings of the answer's G positions
        (``latent_answer_positions``)."""
        B = latent.shape[0]
        z = self.effective_latent(latent, anchor, B).to(self.answer_embedding.weight.dtype)
        return self.answer_embedding(z).view(B, self.config.latent_answer_positions, -1)
