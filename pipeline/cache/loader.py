"""Training batches from the teacher cache: its top-k rows (``pipeline.cache.topk``) for the MeanFlow
objective and its rollouts (``pipeline.cache.rollouts``) for the rollout objective.

A top-k mini-batch is a contiguous slice of one decompressed Arrow record batch (no per-row decoding);
the rollouts (a few dozen bytes each) are read into memory once and cut into mini-batches. A training
item pairs the i-th mini-batch of each objective in use (the shorter list cycles), and Lightning's
distributed sampler gives every rank a disjoint set of items, the same number on each.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from pipeline.cache.rollouts import RolloutRows, open_rollouts
from pipeline.cache.topk import open_cache, record_batch_arrays
from pipeline.core.errors import ParamsError


@dataclasses.dataclass
class TopKBatch:
    """B cached rows (x_t, t) with the teacher's top-k at their M masked positions, for the MeanFlow
    objective. (Not frozen: Lightning moves a batch to the device field by field.)"""

    input_ids: torch.Tensor
    """(B, L) long: x_t."""
    attention_mask: torch.Tensor
    """(B, L) long."""
    x0: torch.Tensor
    """(B, L) long: the clean sequence."""
    t: torch.Tensor
    """(B,) float32: the mask ratio x_t was drawn at."""
    example_index: torch.Tensor
    """(B,) long: the training example."""
    sample_index: torch.Tensor
    """(B,) long: which (t, mask) draw of the example."""
    masked: torch.Tensor
    """(B, L) bool: the masked positions."""
    topk_ids: torch.Tensor
    """(M, k) long: the teacher's top-k ids at the masked positions, in the row-major order of ``masked``."""
    topk_logprobs: torch.Tensor
    """(M, k) float32: their log-probs."""


@dataclasses.dataclass
class RolloutBatch:
    """B cached teacher rollouts, for the rollout objective."""

    example_index: torch.Tensor
    """(B,) long."""
    rollout_index: torch.Tensor
    """(B,) long: which rollout of the example (0: greedy when ``cache.rollouts.greedy_first``)."""
    prompt_ids: torch.Tensor
    """(B, Lp) long: the left-padded prompt."""
    prompt_mask: torch.Tensor
    """(B, Lp) long: its attention mask."""
    tokens: torch.Tensor
    """(B, G) long: the rollout's answer."""
    reveal_step: torch.Tensor
    """(B, G) long: the sampler step that committed each answer position."""
    greedy: torch.Tensor
    """(B,) bool: a greedy rollout (temperature 0)."""


@dataclasses.dataclass
class TrainingItem:
    """One training step's batches: one per objective in use."""

    meanflow: TopKBatch | None = None
    rollouts: RolloutBatch | None = None


def collate_rows(arrays: dict[str, np.ndarray]) -> TopKBatch:
    """The tensors of a block of cache rows."""
    n, length = arrays["input_ids"].shape
    rows = np.repeat(np.arange(n), np.diff(arrays["offsets"]))
    masked = torch.zeros(n, length, dtype=torch.bool)
    masked[torch.from_numpy(rows), torch.from_numpy(arrays["masked_positions"].astype(np.int64))] = True
    tensor = lambda key, dtype: torch.from_numpy(np.array(arrays[key])).to(dtype)  # noqa: E731  (copy: Arrow memory is read-only)
    return TopKBatch(
        input_ids=tensor("input_ids", torch.long),
        attention_mask=tensor("attention_mask", torch.long),
        x0=tensor("x0", torch.long),
        t=tensor("t", torch.float32),
        example_index=tensor("example_index", torch.long),
        sample_index=tensor("sample_index", torch.long),
        masked=masked,
        topk_ids=tensor("topk_ids", torch.long),
        topk_logprobs=tensor("topk_logprobs", torch.float32),
    )


class CacheMiniBatches(torch.utils.data.Dataset):
    """Item i = rows [start, stop) of one record batch of the cache, collated. The cache is opened
    lazily in each worker process (memory maps do not cross process boundaries)."""

    def __init__(self, cache_dir: str | Path, batch_size: int, verify: bool = True):
        self.cache_dir, self.batch_size = Path(cache_dir), batch_size
        cache = open_cache(self.cache_dir, verify=verify)
        self.manifest = cache.manifest
        self.chunks = [
            (j, start, min(start + batch_size, rows))
            for j, (_, _, rows) in enumerate(cache.batch_index)
            for start in range(0, rows, batch_size)
        ]
        self._cache = None

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> TopKBatch:
        if self._cache is None:
            self._cache = open_cache(self.cache_dir, verify=False)
        j, start, stop = self.chunks[i]
        return collate_rows(record_batch_arrays(self._cache.record_batch(j).slice(start, stop - start)))

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}


ROLLOUT_KINDS = ("all", "greedy", "sampled")


class RolloutMiniBatches(torch.utils.data.Dataset):
    """Item i = rollouts [i * batch_size, (i + 1) * batch_size) of the cache in cache order, restricted
    to greedy (temperature 0) or sampled ones by ``kind``."""

    def __init__(self, cache_dir: str | Path, batch_size: int, kind: str = "all", verify: bool = True):
        if kind not in ROLLOUT_KINDS:
            raise ValueError(f"kind must be one of {ROLLOUT_KINDS}, got {kind!r}")
        cache = open_rollouts(cache_dir, verify=verify)
        rows = RolloutRows.concat([cache.batch(j) for j in range(cache.num_batches)])
        if kind != "all":
            rows = rows.take(np.flatnonzero((rows.temperature == 0) == (kind == "greedy")))
        if not len(rows):
            raise ParamsError(f"{cache_dir}: the cache has no {kind} rollouts (see cache.rollouts)")
        self.rows, self.batch_size = rows, batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, i: int) -> RolloutBatch:
        block = self.rows.slice(i * self.batch_size, (i + 1) * self.batch_size)
        tensor = lambda values: torch.from_numpy(np.array(values)).long()  # noqa: E731
        return RolloutBatch(example_index=tensor(block.example_index), rollout_index=tensor(block.rollout_index),
                            prompt_ids=tensor(block.prompt_ids), prompt_mask=tensor(block.prompt_mask),
                            tokens=tensor(block.tokens), reveal_step=tensor(block.reveal_step),
                            greedy=torch.from_numpy(np.asarray(block.temperature) == 0))


class TrainingItems(torch.utils.data.Dataset):
    """Item i = a ``TrainingItem`` with ``dataset[i mod len(dataset)]`` of each dataset in use
    (``meanflow``: top-k rows, ``rollouts``): every objective gets a batch at every step."""

    def __init__(self, meanflow: CacheMiniBatches | None = None, rollouts: RolloutMiniBatches | None = None):
        self.datasets = {name: d for name, d in (("meanflow", meanflow), ("rollouts", rollouts)) if d is not None}

    def __len__(self) -> int:
        return max(len(d) for d in self.datasets.values())

    def __getitem__(self, i: int) -> TrainingItem:
        return TrainingItem(**{name: d[i % len(d)] for name, d in self.datasets.items()})


class TeacherCacheDataModule(L.LightningDataModule):
    """Training items of ``batch_size`` top-k rows (``meanflow``) and/or ``batch_size`` rollouts of
    ``rollouts`` kind (``all``, ``greedy``, ``sampled``; None: no rollouts), shuffled (seeded) or in
    cache order."""

    def __init__(self, cache_dir: str | Path, batch_size: int, num_workers: int = 0, shuffle: bool = True,
                 seed: int = 0, meanflow: bool = True, rollouts: str | None = None):
        super().__init__()
        self.cache_dir, self.batch_size, self.num_workers, self.shuffle = Path(cache_dir), batch_size, num_workers, shuffle
        self.seed, self.meanflow, self.rollouts = seed, meanflow, rollouts
        self.dataset: TrainingItems | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:  # checksums are read once, by rank 0, not by every rank
            verify = rank_zero_only.rank == 0  # known from the environment before a trainer exists
            parts = {}
            if self.meanflow:
                parts["meanflow"] = CacheMiniBatches(self.cache_dir, self.batch_size, verify=verify)
            if self.rollouts is not None:
                parts["rollouts"] = RolloutMiniBatches(self.cache_dir, self.batch_size, self.rollouts, verify=verify)
            self.dataset = TrainingItems(**parts)

    def train_dataloader(self):
        # Items are whole mini-batches (batch_size=None), so the sampler is ours to choose: each rank
        # a disjoint slice of a seeded order (one rank: all of it) with the same number of steps.
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(self.dataset, world, rank, self.shuffle, self.seed)
        if trainer is not None:  # resumed mid-epoch: the checkpointed run took this epoch's first items
            sampler.skip = trainer.global_step - trainer.current_epoch * len(sampler)
        return torch.utils.data.DataLoader(self.dataset, batch_size=None, sampler=sampler,
                                           num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


# Lightning warns about any resume mid-epoch with a loader it cannot save; ResumableSampler resumes it exactly.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class ResumableSampler(torch.utils.data.DistributedSampler):
    """A rank's slice of each epoch's order, a function of (seed, epoch) alone (Lightning calls
    ``set_epoch``); the first iteration leaves out its first ``skip`` items, which a checkpointed run
    already trained on, so a resumed run sees the items an uninterrupted one would."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self):
        items = list(super().__iter__())[self.skip:]
        self.skip = 0
        return iter(items)
