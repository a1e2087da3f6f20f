"""The counter-based key spaces (``pipeline.core.counter_random``): no two draws of the pipeline can
get the same keys, and the code draws from the paths the table states."""

import itertools

import torch

from pipeline.core import counter_random as cr
from pipeline.generation.decode import batch_generator
from pipeline.generation.noise import CounterNoise, completion_latents, completion_seeds, field_seeds

ANY, NATURAL = "any integer", "an integer >= 0"

# Each family shares its first keys (a run's seed, a row's noise seed, a training row's identity);
# after them, a path is a tuple of stream constants and variables.
FAMILIES = {
    "run seed": {
        "completion noise seed": (cr.COMPLETION_SEED, NATURAL, NATURAL),
        "shared field seed": (cr.FIELD_SEED, NATURAL),
        "completion latent": (cr.COMPLETION_LATENT, NATURAL, NATURAL, NATURAL),
        "completion code": (cr.COMPLETION_LATENT, NATURAL, NATURAL),
        "decoded batch's generator": (cr.DECODE_BATCH, NATURAL),
        "likelihood masks": (cr.LIKELIHOOD_MASK, ANY),
    },
    "row noise seed": {
        "Gumbel field per step": (NATURAL, NATURAL, NATURAL),
        "Gumbel field, fixed": (NATURAL, NATURAL),
        "random remasking": (cr.REMASK, NATURAL, NATURAL),
    },
    "training row": {
        "r, first": (cr.R_FIRST,),
        "r, second": (cr.R_SECOND,),
        "MeanFlow latent": (cr.MEANFLOW_LATENT, NATURAL),
        "rollout steps": (cr.ROLLOUT_STEPS, NATURAL),
        "rollout latents": (cr.ROLLOUT_LATENT, NATURAL, NATURAL),
        "rollout codes": (cr.ROLLOUT_LATENT, NATURAL),
        "posterior draws trained": (cr.POSTERIOR_DRAW, NATURAL),
        "policy latent": (cr.POLICY_LATENT, NATURAL),
        "policy code": (cr.POLICY_LATENT,),
        "policy answer samples": (cr.POLICY_SAMPLE, NATURAL, NATURAL),
        "matching latent": (cr.MATCHING_LATENT, NATURAL),
        "matching code": (cr.MATCHING_LATENT,),
        "matching sample": (cr.MATCHING_SAMPLE, NATURAL),
        "matching t": (cr.MATCHING_MASK,),
        "matching order": (cr.MATCHING_MASK, NATURAL),
        "mean-field latent": (cr.MEAN_FIELD_LATENT, NATURAL),
        "mean-field code": (cr.MEAN_FIELD_LATENT,),
        "mean-field contexts": (cr.MEAN_FIELD_SAMPLE, NATURAL, NATURAL),
    },
}


def can_match(a, b) -> bool:
    """Whether one key of path ``a`` and one of path ``b`` can be equal."""
    if isinstance(a, str) and isinstance(b, str):
        return True
    if isinstance(a, str) or isinstance(b, str):
        constant, kind = (b, a) if isinstance(a, str) else (a, b)
        return kind == ANY or constant >= 0
    return a == b


def test_no_two_paths_of_a_family_can_give_the_same_keys():
    for family, paths in FAMILIES.items():
        for (name_a, a), (name_b, b) in itertools.combinations(paths.items(), 2):
            collide = len(a) == len(b) and all(can_match(x, y) for x, y in zip(a, b))
            assert not collide, f"{family}: {name_a} {a} and {name_b} {b} can give the same keys"


def test_the_code_draws_from_the_stated_paths():
    seed, example, draw = 7, torch.tensor([3, 4]), torch.tensor([0, 2])
    assert torch.equal(completion_seeds(seed, example, draw), cr.counter_hash(seed, cr.COMPLETION_SEED, example, draw))
    assert torch.equal(field_seeds(seed, draw), cr.counter_hash(seed, cr.FIELD_SEED, draw))
    assert torch.equal(completion_latents(seed, example, draw, 3),
                       cr.counter_normal(3, seed, cr.COMPLETION_LATENT, example, draw))
    batch_seed = int(cr.counter_hash(seed, cr.DECODE_BATCH, 5)) & (2**63 - 1)
    assert torch.equal(torch.rand(4, generator=batch_generator(seed, 5, "cpu")),
                       torch.rand(4, generator=torch.Generator().manual_seed(batch_seed)))
    seeds = torch.tensor([11, 12])
    where = torch.ones(2, 3, dtype=torch.bool)
    position, token = torch.arange(3).repeat(2)[:, None], torch.arange(5)[None, :]
    row = seeds.repeat_interleave(3)[:, None]
    assert torch.equal(CounterNoise(seeds).gumbel_uniforms(where, 5, step=2, offset=0),
                       cr.counter_uniform(row, 2, position, token))
    assert torch.equal(CounterNoise(seeds, fixed=True).gumbel_uniforms(where, 5, step=2, offset=0),
                       cr.counter_uniform(row, position, token))
    assert torch.equal(CounterNoise(seeds).remask_uniforms((2, 3), "cpu", step=1, offset=0),
                       cr.counter_uniform(seeds[:, None], cr.REMASK, 1, torch.arange(3)[None, :]).float())
