"""How stage two runs on N nodes x M devices: the launcher's world (torchrun, SLURM's srun), the
Trainer's options from ``student`` params, and the loggers.

Lightning takes its ranks from the launcher; what it does not check up front is whether the params
describe the world the launcher started. Here a mismatch is one error line naming both numbers
(``torchrun --nproc-per-node 2`` with ``devices: 1`` used to train two independent copies), and
``devices: auto`` means the processes the launcher started on each node.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Mapping

from pipeline.core.errors import ParamsError
from pipeline.core.ranks import launcher_world

STRATEGIES = ("auto", "ddp")
"""The strategies tested with every objective (tests/test_distillation.py): one process, and DDP over
processes on one or several nodes (gloo on CPU, NCCL on GPU)."""

LOGGERS = {"dvclive": None, "csv": None, "tensorboard": "tensorboard", "wandb": "wandb"}
"""``student.logger`` values and the package each needs beyond the project's own."""


def resolve_devices(devices: int | str, num_nodes: int, env: Mapping[str, str] = os.environ) -> int | str:
    """The Trainer's ``devices``: ``student.devices`` checked against the launcher's world, or, for
    ``auto`` under a launcher, the processes it started per node."""
    world = launcher_world(env)
    if world is None:
        if num_nodes > 1:
            raise ParamsError(f"params.yaml:student.num_nodes: {num_nodes} nodes need a launcher that starts the "
                              "processes on every node (torchrun --nnodes, or srun --nodes); none was found")
        return devices
    size, started = world
    if devices == "auto":
        if size % num_nodes:
            raise ParamsError(f"params.yaml:student.num_nodes: {num_nodes} does not divide the {size} processes "
                              f"the launcher started ({started})")
        return size // num_nodes
    if devices * num_nodes != size:
        raise ParamsError(f"params.yaml:student.devices: {devices} x student.num_nodes {num_nodes} = "
                          f"{devices * num_nodes} processes, but {started}; set student.devices: auto (what the "
                          f"launcher gave) or launch {devices * num_nodes}")
    return devices


def check_logger(logger: str) -> None:
    """Refuse a ``student.logger`` (one of ``LOGGERS``: ``StudentParams`` checks that) whose package is
    not installed, with the install hint."""
    package = LOGGERS[logger]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ParamsError(f"params.yaml:student.logger: {logger} needs the {package} package: "
                          f"pip install {package}")


def loggers(logger: str, metrics_dir: Path, logs_dir: Path, resume: bool = False) -> list:
    """DVCLive into ``metrics_dir`` (what dvc.yaml declares and ``dvc plots`` reads; a resumed run
    continues its files), always; and the ``student.logger`` chosen besides it into ``logs_dir``."""
    from dvclive.lightning import DVCLiveLogger

    chosen = [DVCLiveLogger(dir=str(metrics_dir), save_dvc_exp=False, dvcyaml=False, resume=resume)]
    if logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        chosen.append(CSVLogger(str(logs_dir), name="csv"))
    elif logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        chosen.append(TensorBoardLogger(str(logs_dir), name="tensorboard"))
    elif logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        chosen.append(WandbLogger(project="llada-meanflow", save_dir=str(logs_dir)))
    return chosen


def trainer_options(params, on_gpu: bool, env: Mapping[str, str] = os.environ) -> dict:
    """The Trainer's keyword arguments that ``student`` params set (``StudentParams``, which already
    refuses a strategy outside ``STRATEGIES``)."""
    return {
        "accelerator": "auto",
        "devices": resolve_devices(params.devices, params.num_nodes, env),
        "num_nodes": params.num_nodes,
        "strategy": params.strategy,
        "precision": params.precision or ("bf16-mixed" if on_gpu else "32-true"),
        "accumulate_grad_batches": params.accumulate_grad_batches,
        "log_every_n_steps": params.log_every_n_steps,
        "gradient_clip_val": 1.0,
    }
