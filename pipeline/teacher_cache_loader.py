"""Training batches from the teacher cache (``pipeline.teacher_cache``).

A mini-batch is a contiguous slice of one decompressed Arrow record batch (no per-row decoding), and
Lightning's distributed sampler gives every rank a disjoint set of mini-batches, the same number on
each.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

from pipeline.teacher_cache import open_cache, record_batch_arrays


def collate_rows(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors of a block of cache rows: per row (B,) / (B, L), ``masked`` (B, L) bool, and the
    teacher's top-k (M, k) in the row-major order of ``masked``."""
    n, length = arrays["input_ids"].shape
    rows = np.repeat(np.arange(n), np.diff(arrays["offsets"]))
    masked = torch.zeros(n, length, dtype=torch.bool)
    masked[torch.from_numpy(rows), torch.from_numpy(arrays["masked_positions"].astype(np.int64))] = True
    tensor = lambda key, dtype: torch.from_numpy(np.array(arrays[key])).to(dtype)  # noqa: E731  (copy: Arrow memory is read-only)
    return {
        "input_ids": tensor("input_ids", torch.long),
        "attention_mask": tensor("attention_mask", torch.long),
        "x0": tensor("x0", torch.long),
        "t": tensor("t", torch.float32),
        "example_index": tensor("example_index", torch.long),
        "sample_index": tensor("sample_index", torch.long),
        "masked": masked,
        "topk_ids": tensor("topk_ids", torch.long),
        "topk_logprobs": tensor("topk_logprobs", torch.float32),
    }


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

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._cache is None:
            self._cache = open_cache(self.cache_dir, verify=False)
        j, start, stop = self.chunks[i]
        return collate_rows(record_batch_arrays(self._cache.record_batch(j).slice(start, stop - start)))

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}


class TeacherCacheDataModule(L.LightningDataModule):
    """The cache's mini-batches of ``batch_size`` rows, shuffled (seeded) or in cache order."""

    def __init__(self, cache_dir: str | Path, batch_size: int, num_workers: int = 0, shuffle: bool = True,
                 seed: int = 0):
        super().__init__()
        self.cache_dir, self.batch_size, self.num_workers, self.shuffle = Path(cache_dir), batch_size, num_workers, shuffle
        self.seed = seed
        self.dataset: CacheMiniBatches | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:  # checksums are read once, by rank 0, not by every rank
            verify = self.trainer is None or self.trainer.is_global_zero
            self.dataset = CacheMiniBatches(self.cache_dir, self.batch_size, verify=verify)

    def train_dataloader(self):
        # Items are whole mini-batches (batch_size=None), so the sampler is ours to choose: under
        # DDP a DistributedSampler gives each rank a disjoint slice and (padding by repetition) the
        # same number of steps; Lightning calls its set_epoch.
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(
                self.dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
                shuffle=self.shuffle, seed=self.seed,
            )
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=sampler, shuffle=self.shuffle if sampler is None else None,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )
