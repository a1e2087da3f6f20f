"""Counter-based randomness: numbers that are pure functions of integer keys.

``counter_hash(k1, k2, ...)`` chains SplitMix64 over its keys; ``counter_uniform`` maps the hash to
[0, 1). A draw depends only on its keys, never on the batch, process or device it is computed in, so
a row's randomness survives resharding, resumption and DDP, and a Gumbel field over (position,
token id) can be regenerated anywhere from its seed instead of being stored.

Every counter-based draw of the pipeline, as its key path (names are filled in per draw; the
numbers are the stream constants below, which keep paths of the same shape apart)::

    under a run's seed (stage one's rollouts: cache.seed; decoding: evaluate.seed, --seed)
      completion noise seed     (seed, COMPLETION_SEED, example, draw)
      shared field seed         (seed, FIELD_SEED, field)
      completion latent         (seed, COMPLETION_LATENT, example, draw, 2j | 2j + 1)
      completion code           (seed, COMPLETION_LATENT, example, draw)
      decoded batch's generator (seed, DECODE_BATCH, batch)  (the seed of a torch.Generator)
      likelihood masks          (seed, LIKELIHOOD_MASK, digest of the token pair)  (a torch.Generator's seed)
    under a row's noise seed (one of the seeds above)
      Gumbel field, per step    (row seed, step >= 0, position, token id)
      Gumbel field, fixed       (row seed, position, token id)
      random remasking          (row seed, REMASK, step, position)
    under a training row (student.seed, epoch, example, sample or rollout index)
      r, first and second       (..., R_FIRST) and (..., R_SECOND)
      MeanFlow latent           (..., MEANFLOW_LATENT, 2j | 2j + 1)
      rollout steps k, k'       (..., ROLLOUT_STEPS, j)
      rollout latents           (..., ROLLOUT_LATENT, draw, 2j | 2j + 1)
      rollout codes             (..., ROLLOUT_LATENT, draw)
      posterior draws trained   (..., POSTERIOR_DRAW, j)
      policy latent             (..., POLICY_LATENT, 2j | 2j + 1), or its code (..., POLICY_LATENT)
      policy answer samples     (..., POLICY_SAMPLE, sample, position)
      matching latent           (..., MATCHING_LATENT, 2j | 2j + 1), or its code (..., MATCHING_LATENT)
      matching sample           (..., MATCHING_SAMPLE, position)
      matching re-mask          (..., MATCHING_MASK) for t, (..., MATCHING_MASK, position) for the order
      mean-field latent         (..., MEAN_FIELD_LATENT, 2j | 2j + 1), or its code (..., MEAN_FIELD_LATENT)
      mean-field contexts       (..., MEAN_FIELD_SAMPLE, sample, position)
    the student's code book (part of the network, so under no seed; CODEBOOK < 0)
      code c                    (CODEBOOK, c, 2j | 2j + 1)

``tests/test_counter_random.py`` checks that no two paths can give the same keys.
"""

from __future__ import annotations

import torch

# Streams under a run's seed.
COMPLETION_SEED, FIELD_SEED, COMPLETION_LATENT, DECODE_BATCH, LIKELIHOOD_MASK = 1, 2, 3, 4, 5
# Under a row's noise seed, in the place of the step (steps count from 0).
REMASK = -1
# Under a training row's keys.
(R_FIRST, R_SECOND, MEANFLOW_LATENT, ROLLOUT_STEPS, ROLLOUT_LATENT, POSTERIOR_DRAW, POLICY_LATENT, POLICY_SAMPLE,
 MATCHING_LATENT, MATCHING_SAMPLE, MATCHING_MASK, MEAN_FIELD_LATENT, MEAN_FIELD_SAMPLE) = range(1, 14)
# The code book's first key: negative, so no run seed (>= 0) can give its keys.
CODEBOOK = -2


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer on int64 tensors (wrapping arithmetic; logical shifts via masks)."""

    def shift(z: torch.Tensor, n: int) -> torch.Tensor:
        return (z >> n) & ((1 << (64 - n)) - 1)

    def signed(c: int) -> int:
        return c - (1 << 64) if c >= 1 << 63 else c

    z = x + signed(0x9E3779B97F4A7C15)
    z = (z ^ shift(z, 30)) * signed(0xBF58476D1CE4E5B9)
    z = (z ^ shift(z, 27)) * signed(0x94D049BB133111EB)
    return z ^ shift(z, 31)


def counter_hash(*keys: torch.Tensor | int) -> torch.Tensor:
    """64 pseudo-random bits (as int64) per element of the broadcast integer keys."""
    state = torch.zeros((), dtype=torch.int64)
    for key in keys:
        key = torch.as_tensor(key, dtype=torch.int64)
        state = _splitmix64(state.to(key.device) ^ key)
    return state


def counter_uniform(*keys: torch.Tensor | int) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, 53 random bits), one per element of the broadcast int64 keys:
    the same row gets the same draw whatever the batch, rank or device it lands on."""
    state = counter_hash(*keys)
    return ((state >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)


def counter_normal(dim: int, *keys: torch.Tensor | int) -> torch.Tensor:
    """Standard normals (float32), shape broadcast(keys) + (dim,): component j from the uniforms of
    keys + (2j,) and keys + (2j + 1,) by Box-Muller, so a latent is a pure function of its keys."""
    j = torch.arange(dim, dtype=torch.int64)
    keys = tuple(torch.as_tensor(k, dtype=torch.int64)[..., None] for k in keys)  # each (..., 1)
    u1 = counter_uniform(*keys, 2 * j)
    u2 = counter_uniform(*keys, 2 * j + 1)
    return (torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * torch.pi * u2)).float()
