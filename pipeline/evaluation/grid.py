"""Held-out evaluation: the teacher and the student each at 1, 2, 4, ..., ``gen_length`` steps, with
and without classifier-free guidance, greedy and sampled, in one run. This module
lays out the grid of settings and runs each through ``pipeline.generation.decode`` (which validation
during training uses too); ``pipeline.evaluation.report`` turns the results into metrics, tables and
plots.

Every setting decodes the whole test split in batches of the same number of prompts on the same
device, so its wall seconds per sample are comparable with the others'; over several processes each
decodes a share of the batches and all get the merged results. Forward passes per sample:
the sampler calls the network once per step, and CFG sends each row twice (conditional and
unconditional), so it counts double (a test counts the calls).

Scoring is ``pipeline.data.scoring``'s scorer (``evaluate.scorer``; by default rows of the built-in
task suite are judged by their task, rows of external data by exact match with the reference).
"""

from __future__ import annotations

import dataclasses

from pipeline.core.ranks import Ranks
from pipeline.data.layout import Layout
from pipeline.data.scoring import Scorer, score_records
from pipeline.generation.decode import decode_completions, records_of, shard_batches


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way of decoding the test split."""

    model: str
    """``teacher`` or ``student``."""
    steps: int
    block_length: int
    """Semi-autoregressive block length of the sampler (one step fills the whole answer at once)."""
    cfg_scale: float
    temperature: float
    samples: int
    """Completions per prompt."""
    noise: str = "per_step"
    """Sampling noise: ``per_step`` (fresh draws from a seeded generator at every step), ``fixed`` or
    ``shared`` (counter-based Gumbel fields, as stage one's ``cache.rollouts.noise``)."""

    @property
    def forward_passes(self) -> int:
        """Network evaluations per completion: one per step, two with CFG."""
        return self.steps * (2 if self.cfg_scale > 0 else 1)

    @property
    def name(self) -> str:
        decoding = "greedy" if self.temperature == 0 else f"sampled_t{self.temperature:g}"
        decoding += f"x{self.samples}" if self.samples > 1 else ""
        guidance = f"_cfg{self.cfg_scale:g}" if self.cfg_scale > 0 else ""
        noise = f"_{self.noise}_noise" if self.noise != "per_step" else ""
        return f"{self.model}_steps{self.steps}_{decoding}{guidance}{noise}"


def settings_for(teacher_steps: list[int], cfg_scale: float, temperature: float, samples: int,
                 gen_length: int, block_length: int | None = None, noise_variants: list[str] = (),
                 student_latents: bool = False, student_steps: list[int] = (1,)) -> list[Setting]:
    """Teacher at each of ``teacher_steps`` and student at each of ``student_steps`` (blocks of
    ``block_length``, default the whole answer; one step is always one block); each greedy and
    sampled, each without and (when ``cfg_scale > 0``) with guidance; then the teacher at
    ``gen_length`` steps sampled with each of ``noise_variants``; then, for a student with a latent,
    the student at each step count greedy given each of ``samples`` latents."""
    guidance = [0.0] + ([cfg_scale] if cfg_scale > 0 else [])
    decodings = [(0.0, 1), (temperature, samples)]
    block = lambda steps: gen_length if steps == 1 else block_length or gen_length  # noqa: E731
    models = [("teacher", n) for n in teacher_steps] + [("student", n) for n in student_steps]
    return [Setting(model, steps, block(steps), w, temp, k)
            for model, steps in models for w in guidance for temp, k in decodings] + [
        Setting("teacher", gen_length, block(gen_length), 0.0, temperature, samples, noise)
        for noise in noise_variants] + (
        [Setting("student", n, block(n), 0.0, 0.0, samples) for n in student_steps]
        if student_latents and samples > 1 else [])


def evaluate_settings(models: dict, settings: list[Setting], rows, tokenizer, stops: set[int], layout: Layout,
                      batch_size: int, seed: int, timing_repeats: int = 1, progress=None,
                      num_fields: int = 4, on_batch=None, ranks: Ranks = Ranks(),
                      scorer: Scorer | None = None) -> list[dict]:
    """One result row per setting: accuracy per task (and ``distinct_valid`` for many-answer tasks),
    forward passes and wall seconds per completion. ``models`` maps ``teacher``/``student`` to
    networks. One warm-up batch per (model, guidance, sampling) keeps one-off costs (allocations,
    kernel selection) out of the timings, and greedy settings (deterministic) are timed
    ``timing_repeats`` times, keeping the fastest (the least disturbed). Completions are judged by
    ``scorer`` (default ``builtin``). ``progress(result, records)`` follows each setting (its records
    for inspection), ``on_batch(setting_name, completions)`` each decoded batch.

    Over several ``ranks`` (one process each), each decodes its share of every setting's batches
    (``shard_batches``) and every rank gets the merged results, equal to one process's but for the
    seconds: the sum of the ranks' device seconds, per completion."""
    warmup = rows.select(range(min(len(rows), batch_size)))
    for model, cfg_scale, temperature in sorted({(s.model, s.cfg_scale, s.temperature) for s in settings}):
        decode_completions(models[model], warmup, tokenizer, stops, layout, steps=1, cfg_scale=cfg_scale,
                           temperature=temperature)
    results = []
    for setting in settings:
        times = []
        for _ in range(timing_repeats if setting.temperature == 0 else 1):
            completions, seconds = decode_completions(
                models[setting.model], rows, tokenizer, stops, layout, setting.steps, setting.block_length,
                setting.cfg_scale, setting.temperature, setting.samples, batch_size, setting.noise, seed,
                num_fields, (ranks.rank, ranks.world),
                on_batch=None if on_batch is None else lambda n, name=setting.name: on_batch(name, n),
            )
            times.append(seconds)
        shares = ranks.gather((completions, min(times)))
        records = records_of(rows, [c for share, _ in shares for c in share])
        metrics = score_records(records, scorer)
        results.append({
            **dataclasses.asdict(setting),
            "name": setting.name,
            "forward_passes": setting.forward_passes,
            "seconds_per_sample": sum(seconds for _, seconds in shares) / (len(records) * setting.samples),
            "accuracy": {task: m["accuracy"] for task, m in metrics.items()},
            "distinct_valid": {task: m["distinct_valid"] for task, m in metrics.items() if "distinct_valid" in m},
        })
        if progress is not None:
            progress(results[-1], records)
    return results


def forward_passes_per_prompt(settings: list[Setting], timing_repeats: int) -> int:
    """Network evaluations the grid spends on one test prompt: each setting's passes per completion
    times its completions (greedy settings ``timing_repeats`` times), the warm-up aside."""
    return sum(s.forward_passes * s.samples * (timing_repeats if s.temperature == 0 else 1) for s in settings)


def completions_to_decode(settings: list[Setting], rows: int, timing_repeats: int, batch_size: int = 1,
                          ranks: Ranks = Ranks()) -> int:
    """Completions ``evaluate_settings`` decodes in all on this rank (greedy settings are timed
    ``timing_repeats`` times), the warm-up batches aside: a progress bar's total."""
    def share(completions: int) -> int:
        return sum(len(range(completions)[batch]) for batch in shard_batches(completions, batch_size,
                                                                            (ranks.rank, ranks.world)))
    return sum(share(rows * s.samples) * (timing_repeats if s.temperature == 0 else 1) for s in settings)
