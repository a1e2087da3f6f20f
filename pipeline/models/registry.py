"""The one entry point that loads any supported checkpoint: the config decides the architecture.

``config.json`` with ``model_type: llada`` (and no expert fields) is dense LLaDA
(``pipeline.models.llada``); ``model_type: lladamoe``, ``architectures: [LLaDAMoEModelLM]`` or expert fields
is LLaDA-MoE (``pipeline.models.llada_moe``), whatever its ``model_type`` says.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.errors import CheckpointError
from pipeline.models.checkpoint_io import read_json
from pipeline.models.llada import LLaDA
from pipeline.models.llada_moe import LLaDAMoE
from pipeline.models.mask_predictor import CONFIG_NAME, MaskPredictor, architecture_of

ARCHITECTURES: dict[str, type[MaskPredictor]] = {"llada": LLaDA, "llada_moe": LLaDAMoE}


def model_class(path: str | Path) -> type[MaskPredictor]:
    """The class that loads the checkpoint directory ``path``, from its ``config.json``."""
    file = Path(path) / CONFIG_NAME
    data = read_json(file)
    architecture = architecture_of(data)
    if architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"{file}: model_type {data.get('model_type')!r} / architectures {data.get('architectures')!r} is "
            "neither LLaDA nor LLaDA-MoE"
        )
    return ARCHITECTURES[architecture]


def load_model(path: str | Path, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> MaskPredictor:
    """A LLaDA or LLaDA-MoE checkpoint directory, loaded (``dtype=None`` keeps the stored dtype)."""
    return model_class(path).from_pretrained(path, dtype=dtype, device=device)
