"""The student: a frozen LLaDA plus a trainable soft prompt conditioned on the interval (r, t).

``student(x_t, r, t)`` is the average velocity u (logits). The base model is shared, never copied:
the teacher is ``student.base`` without a prefix. Saved students hold only the soft prompt, what finds
the base checkpoint again (as given, hub id and revision, absolute path) with its fingerprint, and
the layout the student was trained for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.errors import CheckpointError
from pipeline.core.files import atomic_directory, file_sha256
from pipeline.models.checkpoint_io import checkpoint_fingerprint, looks_like_hub_id, read_json, resolve_checkpoint
from pipeline.models.layers import Attention
from pipeline.models.mask_predictor import MaskPredictor
from pipeline.models.registry import load_model
from pipeline.student.soft_prompt import SoftPrompt, SoftPromptConfig

STUDENT_CONFIG = "student_config.json"
SOFT_PROMPT_WEIGHTS = "soft_prompt.safetensors"
FORMAT = "llada-meanflow-student"


def as_time(value: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A time argument (float, 0-d or (B,) tensor) as a (B,) tensor in the dtype of ``like``."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() == 0:
        return value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"time must be a scalar or shape ({batch},), got {tuple(value.shape)}")
    return value


class Student(nn.Module):
    """``Student(base, prompt_length=8, latent_dim=0, **soft_prompt_options)`` (options as
    ``SoftPromptConfig``; without a latent unless asked), or ``Student(base, config=...)``."""

    def __init__(self, base: MaskPredictor, prompt_length: int = 8, config: SoftPromptConfig | None = None,
                 latent_dim: int = 0, **options):
        super().__init__()
        config = config or SoftPromptConfig(prompt_length=prompt_length, latent_dim=latent_dim, **options)
        c = base.config
        self.base = base.requires_grad_(False).eval()
        self.soft_prompt = SoftPrompt(config, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim,
                                      model_width=base.embedding_weight.shape[-1])
        dtype = next(base.parameters()).dtype
        device = next(base.parameters()).device
        self.soft_prompt.to(device=device, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
        self.trained_for: dict[str, int] = {}
        """The layout the student was trained for (``prompt_length``, ``gen_length``, ``block_length``),
        as saved; decoding another length warns (``pipeline.generation.decode.check_answer_length``)."""

    @property
    def soft_prompt_config(self) -> SoftPromptConfig:
        return self.soft_prompt.config

    @property
    def latent_dim(self) -> int:
        return self.soft_prompt_config.latent_dim

    @property
    def has_anchor(self) -> bool:
        return self.soft_prompt_config.anchor != "none"

    def train(self, mode: bool = True) -> "Student":
        super().train(mode)
        self.base.eval()  # frozen: never in training mode
        return self

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """Average-velocity logits u(x_t, r, t, z): (B, T, V), ``head(hidden(...))``; arguments as ``hidden``."""
        return self.head(self.hidden(*args, **kwargs))

    def hidden(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        r: float | torch.Tensor = 0.0,
        t: float | torch.Tensor = 1.0,
        attention_mask: torch.Tensor | None = None,
        attention: Attention = "sdpa",
        latent: torch.Tensor | None = None,
        anchor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The base's final hidden states (B, T, C) under the soft prompt of (r, t, z); ``head`` maps
        any rows of them to logits. r, t: floats or (B,) tensors; latent: (B, latent_dim) when the soft
        prompt has one (``pipeline.generation.noise.completion_latents`` draws it); anchor: (B,) bool,
        rows decoded with the greedy anchor (``SoftPromptConfig.anchor``)."""
        ref = inputs_embeds if inputs_embeds is not None else input_ids
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds")
        weight = self.soft_prompt.prompt_gate
        r, t = as_time(r, ref.shape[0], weight), as_time(t, ref.shape[0], weight)
        prefix, gate = self.soft_prompt(r, t, latent, anchor)
        base_dtype = self.base.embedding_weight.dtype
        G = self.soft_prompt_config.latent_answer_positions
        if G:  # z also enters the answer positions' inputs
            embeds = inputs_embeds if inputs_embeds is not None else self.base.embed(input_ids)  # (B, T, C)
            if embeds.shape[1] <= G:
                raise ValueError(f"this student adds z to the last {G} positions (the answer); the sequence has "
                                 f"only {embeds.shape[1]}")
            answer = embeds[:, -G:] + self.soft_prompt.answer_inputs(latent, anchor).to(embeds.dtype)
            input_ids, inputs_embeds = None, torch.cat((embeds[:, :-G], answer), dim=1)
        return self.base.hidden(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            prefix=prefix.to(base_dtype),
            prefix_gate=gate,
            attention_mask=attention_mask,
            attention=attention,
        )

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of hidden states (..., C): the frozen base's head (the soft prompt acts in
        the trunk only), so it can run on the rows that need it only."""
        return self.base.head(hidden)

    # ------------------------------------------------------------------ checkpoint I/O

    def soft_prompt_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.soft_prompt.state_dict().items()}

    def save_pretrained(self, path: str | Path, base: str | None = None, base_revision: str | None = None,
                        trained_for: dict[str, int] | None = None) -> None:
        """Write the soft prompt (with its sha256, checked on load) and what finds the base checkpoint
        again: ``base`` as the user gave it (a path relative to the working directory, an absolute
        path or a hub id; default: the path the base was loaded from) with the hub ``base_revision``,
        the base's absolute path, and its fingerprint; and the layout it was ``trained_for``
        (``prompt_length``, ``gen_length``, ``block_length``). The frozen base is never copied."""
        path = Path(path)
        source = self.base.source_path
        if source is None:
            raise CheckpointError("the student's base model was not loaded from a checkpoint directory; "
                                  "save it with save_pretrained and reload it first")
        meta = {
            "format": FORMAT,
            "soft_prompt": dataclasses.asdict(self.soft_prompt_config),
            "base": str(source) if base is None else base,
            **({"base_revision": base_revision} if base_revision else {}),
            "base_absolute": str(source.resolve()),
            "base_path": os.path.relpath(source.resolve(), path.resolve()),  # what earlier versions read
            "base_fingerprint": checkpoint_fingerprint(source),
            **({"trained_for": dict(trained_for)} if trained_for else {}),
        }
        with atomic_directory(path) as tmp:
            save_file(self.soft_prompt_state_dict(), str(tmp / SOFT_PROMPT_WEIGHTS), metadata={"format": "pt"})
            meta["soft_prompt_sha256"] = file_sha256(tmp / SOFT_PROMPT_WEIGHTS)
            (tmp / STUDENT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    @staticmethod
    def is_student_dir(path: str | Path) -> bool:
        return (Path(path) / STUDENT_CONFIG).is_file()

    @staticmethod
    def base_path_of(path: str | Path) -> Path:
        """The base checkpoint directory a saved student points to, the first of these whose
        fingerprint is the recorded one: its ``base`` as given (relative to the working directory),
        the base's absolute path at save time, the path relative to the student (students saved
        before the others existed), or a hub id at its recorded revision. Run from another directory,
        the given path may name another checkpoint; the fingerprint tells them apart."""
        meta = read_json(Path(path) / STUDENT_CONFIG)
        given = meta.get("base") if isinstance(meta.get("base"), str) else None
        candidates = [Path(given)] if given else []
        for key, where in (("base_absolute", None), ("base_path", Path(path))):
            if isinstance(meta.get(key), str):
                candidates.append((where / meta[key]).resolve() if where is not None else Path(meta[key]))
        if not candidates:
            raise CheckpointError(f"{Path(path) / STUDENT_CONFIG}: damaged (no base); save the student again")
        found = [c for c in candidates if c.is_dir()]
        for candidate in found:
            if checkpoint_fingerprint(candidate) == meta.get("base_fingerprint"):
                return candidate
        if given and looks_like_hub_id(given) and not Path(given).exists():
            return resolve_checkpoint(given, revision=meta.get("base_revision"))
        if found:  # none has the recorded fingerprint: from_pretrained names the first and both fingerprints
            return found[0]
        raise CheckpointError(f"{path}: the student's base checkpoint is not found (tried "
                              f"{', '.join(dict.fromkeys(map(str, candidates)))}); pass the base directory: "
                              "--base DIR, or Student.from_pretrained(path, base=DIR)")

    @staticmethod
    def trained_for_of(path: str | Path) -> dict[str, int]:
        """The layout a saved student was trained for (empty for students saved before it was recorded)."""
        value = read_json(Path(path) / STUDENT_CONFIG).get("trained_for")
        return dict(value) if isinstance(value, dict) else {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base: MaskPredictor | str | Path | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> "Student":
        """Load a saved student. ``base`` (a loaded LLaDA or a directory) overrides the recorded base
        path; either way its fingerprint must equal the one recorded at save time."""
        path = Path(path)
        meta = read_json(path / STUDENT_CONFIG)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path / STUDENT_CONFIG}: not a {FORMAT} file")
        missing = [key for key in ("soft_prompt", "base_fingerprint") if key not in meta]
        if missing or not isinstance(meta["soft_prompt"], dict):
            raise CheckpointError(f"{path / STUDENT_CONFIG}: damaged (missing or malformed: "
                                  f"{', '.join(missing) or 'soft_prompt'}); save the student again")
        if not isinstance(base, MaskPredictor):
            base_dir = resolve_checkpoint(base) if base is not None else cls.base_path_of(path)
            base = load_model(base_dir, dtype=dtype, device=device)
        if base.source_path is None:
            raise CheckpointError("the base model was not loaded from a checkpoint directory")
        found = checkpoint_fingerprint(base.source_path)
        if found != meta["base_fingerprint"]:
            raise CheckpointError(
                f"{path}: the student was trained on a base with fingerprint {meta['base_fingerprint']}, "
                f"but {base.source_path} has fingerprint {found}"
            )
        try:
            # Students saved before the latent (or the anchor) existed have none.
            config = SoftPromptConfig(**{"latent_dim": 0, "anchor": "none", **meta["soft_prompt"]})
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path / STUDENT_CONFIG}: {err}") from err
        student = cls(base, config=config)
        student.trained_for = cls.trained_for_of(path)
        weights = path / SOFT_PROMPT_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{weights}: file not found")
        recorded = meta.get("soft_prompt_sha256")  # students saved before the digest existed have none
        if recorded is not None and file_sha256(weights) != recorded:
            raise CheckpointError(f"{weights}: checksum differs from the one recorded in {STUDENT_CONFIG} (the file is "
                                  "damaged); save or train the student again")
        try:
            state = load_file(str(weights), device="cpu")
        except Exception as err:  # safetensors raises its own error type (and OSError) for a damaged file
            raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from err
        try:
            student.soft_prompt.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{path / SOFT_PROMPT_WEIGHTS}: does not match its config ({err})") from err
        return student.eval()
