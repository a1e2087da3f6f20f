"""The processes a launcher started (``torchrun``, SLURM's ``srun``) and how a stage that is not a
Lightning run splits work over them: stage two's Trainer takes its ranks from Lightning, the
evaluation from ``Ranks.from_launcher`` (each rank decodes a share, rank 0 gathers and writes).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import torch

from pipeline.core.errors import ParamsError


def launcher_world(env: Mapping[str, str] = os.environ) -> tuple[int, str] | None:
    """(processes the launcher started in all, how it says so), or None when the stage was started
    directly. The same rules as Lightning's ``TorchElasticEnvironment`` and ``SLURMEnvironment``."""
    if "TORCHELASTIC_RUN_ID" in env:
        return int(env["WORLD_SIZE"]), f"torchrun started WORLD_SIZE={env['WORLD_SIZE']}"
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return int(env["SLURM_NTASKS"]), f"srun started SLURM_NTASKS={env['SLURM_NTASKS']}"
    return None


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place among the launcher's: ``rank`` of ``world``, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_launcher(cls, env: Mapping[str, str] = os.environ) -> "Ranks":
        """torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, or srun's ``SLURM_PROCID``/``SLURM_NTASKS``/
        ``SLURM_LOCALID`` (the batch script then sets ``MASTER_ADDR`` and ``MASTER_PORT``, which
        torchrun sets itself); one process when started directly."""
        world = launcher_world(env)
        if world is None or world[0] == 1:
            return cls()
        if "TORCHELASTIC_RUN_ID" in env:
            return cls(int(env["RANK"]), world[0], int(env["LOCAL_RANK"]))
        missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in env]
        if missing:
            raise ParamsError(f"{world[1]} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                              "set: the processes cannot find each other (export MASTER_ADDR=<first node> "
                              "MASTER_PORT=<free port> in the batch script, or run each task under torchrun)")
        return cls(int(env["SLURM_PROCID"]), world[0], int(env.get("SLURM_LOCALID", 0)))

    def device(self) -> torch.device:
        """This rank's GPU when there is one, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def join(self) -> None:
        """Join the process group (NCCL on GPU, gloo on CPU) when there is more than one rank."""
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group(backend, rank=self.rank, world_size=self.world,
                                                 init_method="env://")

    def leave(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank (picklable values)."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world
        torch.distributed.all_gather_object(gathered, value)
        return gathered
