"""Work on logits a bounded number of rows at a time (README: memory at LLaDA's vocabulary).

The LM head is a per-position map, so everything downstream of it (log-softmax, top-k, targets,
losses) can run on the rows that need it, a chunk at a time: at LLaDA's vocabulary (126,464) one
float32 row is 0.5 MB, and the (B, T, V) logits of a batch are gigabytes. ``map_row_chunks`` applies
a per-row function to chunks of at most ``chunk_bytes`` of float32 logits; when the function's inputs
need a gradient, each chunk is checkpointed (its logits recomputed in the backward pass), so neither
pass holds more than one chunk of (rows, V) tensors.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

LOGITS_CHUNK_BYTES = 16 * 2**20
"""Float32 logits per chunk (16 MiB: 33 rows of LLaDA's vocabulary, every row of the built-in one).
A training step holds about eight (rows, V) tensors of a chunk at once (logits, log-softmax, target,
their products), so the logit side of its peak stays near 130 MiB whatever the batch
(``benchmarks/memory.py``)."""


def rows_per_chunk(vocab_size: int, chunk_bytes: int | None = None) -> int:
    """Rows of (rows, V) float32 logits that fit in ``chunk_bytes`` (``LOGITS_CHUNK_BYTES`` when None;
    at least 1)."""
    return max(1, (LOGITS_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * vocab_size))


def map_row_chunks(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    rows: tuple[torch.Tensor, ...],
    vocab_size: int,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """``fn(*chunk)`` on consecutive row chunks of ``rows`` (tensors (N, ...) with one row per
    position), its outputs (per-row tensors (n, ...)) concatenated over the chunks. ``fn`` must be a
    deterministic function of its inputs (a checkpointed chunk is recomputed)."""
    n = rows[0].shape[0]
    step = rows_per_chunk(vocab_size, chunk_bytes)
    outputs = []
    for start in range(0, max(n, 1), step):  # one (empty) call when there are no rows
        chunk = tuple(x[start : start + step] for x in rows)
        if torch.is_grad_enabled() and any(x.requires_grad for x in chunk):
            outputs.append(checkpoint(fn, *chunk, use_reentrant=False))
        else:
            outputs.append(fn(*chunk))
    if len(outputs) == 1:
        return outputs[0]
    return tuple(torch.cat(parts) for parts in zip(*outputs))
