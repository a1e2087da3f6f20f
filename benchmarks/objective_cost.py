"""What the mode-seeking objectives cost: seconds per training step of each against the default
rollout-objective step, on the same batch of cached rollouts, each in its own process.

    python benchmarks/objective_cost.py      # needs artifacts/teacher and artifacts/cache (dvc repro)

Variants (each the default ``student`` params plus the named change):

- ``rollout``: the default (rollout objective, best of 4 Gaussian latents, greedy anchor);
- ``posterior``: a code book of 16 codes, every code scored, soft EM training 1 code per rollout;
- ``policy``: plus the policy gradient (4 samples per prompt; one teacher row per scored position);
- ``matching``: plus distribution matching (the auxiliary's step included);
- ``mean_field``: plus the mean-field reverse KL (1 context per prompt; one teacher row per answer position);
- ``mean_field_latent``: the same with the context's noise from the latent (z into the answer positions).

Run it alone: two heavy processes on a 2-core machine distort both timings.
"""

import json
import time
import warnings
from pathlib import Path

from step_timing import time_variants

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "rollout": {},
    "posterior": {"soft_prompt": {"codebook_size": 16}, "latent_draws": 16, "selection": "posterior",
                  "selection_temperature": 1.0},
    "policy": {"policy_weight": 1.0, "policy_samples": 4},
    "matching": {"matching_weight": 1.0, "matching_warmup_steps": 0},
    "mean_field": {"mean_field_weight": 1.0, "mean_field_samples": 1},
    "mean_field_latent": {"soft_prompt": {"latent_answer_positions": 7}, "mean_field_weight": 1.0,
                          "mean_field_contexts": "latent"},
}


def measure(variant: str, steps: int, batch_size: int) -> dict:
    """Runs in a child process: time ``steps`` optimizer steps of ``variant`` on one fixed batch."""
    import torch

    from pipeline.cache.loader import RolloutMiniBatches, TrainingItem
    from pipeline.cache.rollouts import open_rollouts
    from pipeline.core.params import load_section
    from pipeline.data.layout import Layout
    from pipeline.student.distillation import StudentDistillation
    from pipeline.student.model import Student
    from pipeline.student.params import StudentParams
    from pipeline.student.soft_prompt import SoftPromptConfig
    from pipeline.teacher.artifact import load_teacher

    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here: logging is a no-op
    base, _, _ = load_teacher(ROOT / "artifacts" / "teacher")
    defaults = load_section(StudentParams, "student", ROOT / "params.yaml")
    change = dict(VARIANTS[variant])
    prompt = SoftPromptConfig(**{**vars(defaults.soft_prompt), **change.pop("soft_prompt", {})})
    params = StudentParams(**{**vars(defaults), "soft_prompt": prompt, "batch_size": batch_size, **change})
    layout = Layout.load(ROOT / "data")
    cache = ROOT / "artifacts" / "cache"
    steps_of_rollouts = open_rollouts(cache, verify=False).sampler["steps"]
    module = StudentDistillation(Student(base, config=prompt), params, layout.gen_length, steps_of_rollouts,
                                 eos_id=layout.pad_token_id)
    item = TrainingItem(meanflow=None, rollouts=RolloutMiniBatches(cache, batch_size, verify=False)[0])
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)

    def step():
        loss = module.training_step(item, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return {"seconds_per_step": (time.perf_counter() - started) / steps}


def main() -> None:
    args, results = time_variants(__file__, __doc__.splitlines()[0], VARIANTS, measure,
                                  Path("metrics/benchmarks/objective_cost.json"), default_steps=5)
    if results is None:
        return
    for variant in VARIANTS:
        results[variant]["ratio_to_rollout"] = round(results[variant]["seconds_per_step"]
                                                     / results["rollout"]["seconds_per_step"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"| objective (batch {args.batch_size}) | s/step | x rollout step |")
    print("|---|---|---|")
    for variant, r in results.items():
        print(f"| {variant} | {r['seconds_per_step']:.3f} | {r['ratio_to_rollout']:.2f} |")


if __name__ == "__main__":
    main()
