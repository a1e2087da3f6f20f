"""Held-out evaluation: the teacher at 1, 2, 4, ..., ``gen_length`` steps against the one-step
student, with and without classifier-free guidance, greedy and sampled, in one run.

Every setting decodes the whole test split in batches of the same number of prompts on the same
device, so its wall seconds per sample are comparable with the others'. Forward passes per sample:
the sampler calls the network once per step, and CFG sends each row twice (conditional and
unconditional), so it counts double (a test counts the calls).

Scoring: rows of the built-in task suite (splits with a ``task`` column) are judged by their task
(``pipeline.tasks``); rows of external data count as correct when the completion equals the
reference answer (``exact_match``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from pipeline.data import Layout
from pipeline.errors import DataError
from pipeline.generate import generate, mask_predictor
from pipeline.tasks import TASKS, score
from pipeline.tokenizer import decode_answer


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way of decoding the test split."""

    model: str
    """``teacher`` or ``student``."""
    steps: int
    block_length: int
    """Semi-autoregressive block length of the sampler (the student fills the whole answer at once)."""
    cfg_scale: float
    temperature: float
    samples: int
    """Completions per prompt."""

    @property
    def forward_passes(self) -> int:
        """Network evaluations per completion: one per step, two with CFG."""
        return self.steps * (2 if self.cfg_scale > 0 else 1)

    @property
    def name(self) -> str:
        decoding = "greedy" if self.temperature == 0 else f"sampled_t{self.temperature:g}x{self.samples}"
        guidance = f"_cfg{self.cfg_scale:g}" if self.cfg_scale > 0 else ""
        return f"{self.model}_steps{self.steps}_{decoding}{guidance}"


def default_teacher_steps(gen_length: int, num_blocks: int = 1) -> list[int]:
    """``num_blocks`` times 1, 2, 4, ... below ``gen_length``, then ``gen_length`` itself (the
    sampler needs a whole number of steps per block)."""
    steps, n = [], num_blocks
    while n < gen_length:
        steps.append(n)
        n *= 2
    return steps + [gen_length]


def settings_for(teacher_steps: list[int], cfg_scale: float, temperature: float, samples: int,
                 gen_length: int, block_length: int | None = None) -> list[Setting]:
    """Teacher at each step count (blocks of ``block_length``, default the whole answer) and the
    student at one step; each greedy and sampled, each without and (when ``cfg_scale > 0``) with
    guidance."""
    guidance = [0.0] + ([cfg_scale] if cfg_scale > 0 else [])
    decodings = [(0.0, 1), (temperature, samples)]
    models = [("teacher", n, block_length or gen_length) for n in teacher_steps] + [("student", 1, gen_length)]
    return [Setting(model, steps, block, w, temp, k)
            for model, steps, block in models for w in guidance for temp, k in decodings]


def score_records(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per-task metrics (see ``pipeline.tasks.score``) of records whose ``task`` is a built-in task;
    the others are scored by exact match against ``answer`` under the name ``exact_match``."""
    builtin = [r for r in records if r.get("task") in TASKS]
    other = [r for r in records if r.get("task") not in TASKS]
    metrics = {name: m for name, m in score(builtin).items() if name != "mean"} if builtin else {}
    if other:
        hits = sum(c.strip() == r["answer"].strip() for r in other for c in r["completions"])
        metrics["exact_match"] = {"accuracy": hits / sum(len(r["completions"]) for r in other), "prompts": len(other)}
    metrics["mean"] = {"accuracy": sum(m["accuracy"] for m in metrics.values()) / len(metrics)}
    return metrics


@torch.inference_mode()
def complete_split(
    model,
    rows,
    tokenizer,
    stops: set[int],
    layout: Layout,
    steps: int,
    block_length: int | None = None,
    cfg_scale: float = 0.0,
    temperature: float = 0.0,
    samples: int = 1,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[list[dict], float]:
    """Decode every row of a tokenized split (``input_ids``, ``attention_mask``, ``prompt``,
    ``answer``, and ``task`` for the built-in suite) ``samples`` times with ``model`` (a LLaDA or a
    Student); returns records ``{"prompt", "answer", "completions"[, "task"]}`` in row order and the
    wall seconds spent in generation."""
    missing = {"input_ids", "attention_mask", "prompt", "answer"} - set(rows.column_names)
    if missing:
        raise DataError(f"the split to decode lacks the columns {sorted(missing)}")
    predictor = mask_predictor(model)
    device = next(model.parameters()).device
    mask_id = (model.base if hasattr(model, "base") else model).config.mask_token_id
    P, G = layout.prompt_length, layout.gen_length
    ids = torch.as_tensor(rows["input_ids"])[:, :P].long()  # (N, P)
    attention = torch.as_tensor(rows["attention_mask"])[:, :P].long()
    order = torch.arange(len(ids)).repeat_interleave(samples)  # (N * samples,)
    completions: list[list[str]] = [[] for _ in range(len(ids))]
    seconds = 0.0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        began = time.perf_counter()
        out = generate(predictor, ids[index].to(device), attention[index].to(device), steps=steps, gen_length=G,
                       block_length=block_length or G, temperature=temperature, cfg_scale=cfg_scale, mask_id=mask_id,
                       generator=generator)
        answers = out[:, P:].tolist()  # the copy to the host waits for the device
        seconds += time.perf_counter() - began
        for row, answer in zip(index.tolist(), answers):
            completions[row].append(decode_answer(tokenizer, answer, stops))
    records = [{"prompt": p, "answer": a, "completions": c}
               for p, a, c in zip(rows["prompt"], rows["answer"], completions)]
    if "task" in rows.column_names:
        for record, task in zip(records, rows["task"]):
            record["task"] = task
    return records, seconds


def evaluate_settings(models: dict, settings: list[Setting], rows, tokenizer, stops: set[int], layout: Layout,
                      batch_size: int, seed: int, timing_repeats: int = 1, progress=None) -> list[dict]:
    """One result row per setting: accuracy per task (and ``distinct_valid`` for many-answer tasks),
    forward passes and wall seconds per completion. ``models`` maps ``teacher``/``student`` to
    networks. One warm-up batch per (model, guidance, sampling) keeps one-off costs (allocations,
    kernel selection) out of the timings, and greedy settings (deterministic) are timed
    ``timing_repeats`` times, keeping the fastest (the least disturbed)."""
    warmup = rows.select(range(min(len(rows), batch_size)))
    for model, cfg_scale, temperature in sorted({(s.model, s.cfg_scale, s.temperature) for s in settings}):
        complete_split(models[model], warmup, tokenizer, stops, layout, steps=1, cfg_scale=cfg_scale,
                       temperature=temperature)
    results = []
    for setting in settings:
        device = next(models[setting.model].parameters()).device
        times = []
        for _ in range(timing_repeats if setting.temperature == 0 else 1):
            records, seconds = complete_split(
                models[setting.model], rows, tokenizer, stops, layout, setting.steps, setting.block_length,
                setting.cfg_scale, setting.temperature, setting.samples, batch_size,
                torch.Generator(device=device).manual_seed(seed),
            )
            times.append(seconds)
        seconds = min(times)
        metrics = score_records(records)
        results.append({
            **dataclasses.asdict(setting),
            "name": setting.name,
            "forward_passes": setting.forward_passes,
            "seconds_per_sample": seconds / (len(records) * setting.samples),
            "accuracy": {task: m["accuracy"] for task, m in metrics.items()},
            "distinct_valid": {task: m["distinct_valid"] for task, m in metrics.items() if "distinct_valid" in m},
        })
        if progress is not None:
            progress(results[-1])
    return results


def summarize(results: list[dict], gen_length: int) -> dict:
    """``metrics/eval.json``: each setting's numbers under its name, plus the one-step student's
    speedup over the teacher at ``gen_length`` steps (greedy, no guidance) and its accuracy gain over
    the one-step teacher."""
    by_key = {(r["model"], r["steps"], r["cfg_scale"], r["temperature"]): r for r in results}
    summary: dict = {"settings": {}}
    for r in results:
        entry = {"forward_passes": r["forward_passes"], "seconds_per_sample": round(r["seconds_per_sample"], 6),
                 "accuracy": {k: round(v, 4) for k, v in r["accuracy"].items()}}
        if r["distinct_valid"]:
            entry["distinct_valid"] = {k: round(v, 3) for k, v in r["distinct_valid"].items()}
        summary["settings"][r["name"]] = entry
    student = by_key.get(("student", 1, 0.0, 0.0))
    teacher_full_steps = by_key.get(("teacher", gen_length, 0.0, 0.0))
    teacher_fewest_steps = min((r for r in results if r["model"] == "teacher" and r["cfg_scale"] == 0
                                and r["temperature"] == 0), key=lambda r: r["steps"], default=None)
    if student and teacher_full_steps:
        speedup = teacher_full_steps["seconds_per_sample"] / student["seconds_per_sample"]
        summary["student_speedup_vs_teacher_gen_length"] = round(speedup, 2)
        gain = student["accuracy"]["mean"] - teacher_full_steps["accuracy"]["mean"]
        summary["student_minus_gen_length_teacher"] = round(gain, 4)
    if student and teacher_fewest_steps:
        gain = student["accuracy"]["mean"] - teacher_fewest_steps["accuracy"]["mean"]
        summary[f"student_minus_teacher_{teacher_fewest_steps['steps']}_steps"] = round(gain, 4)
    return summary


def curve_rows(results: list[dict]) -> dict[str, list[dict]]:
    """Plot data: greedy accuracy against forward passes, one list per (model, guidance); every
    series is present (empty without guidance), so DVC always finds the files it declares."""
    series: dict[str, list[dict]] = {key: [] for key in ("teacher", "teacher_cfg", "student", "student_cfg")}
    for r in results:
        if r["temperature"] == 0:
            key = r["model"] + ("_cfg" if r["cfg_scale"] > 0 else "")
            series[key].append({"forward_passes": r["forward_passes"], "seconds_per_sample": r["seconds_per_sample"],
                                **{f"accuracy_{task}": v for task, v in r["accuracy"].items()}})
    return series


def plot_accuracy(results: list[dict], path: Path) -> None:
    """PNG: greedy mean accuracy against forward passes per sample (the teacher's curve, the
    student's point), and against wall seconds per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = curve_rows(results)
    style = {"teacher": ("tab:blue", "o-"), "teacher_cfg": ("tab:blue", "s--"),
             "student": ("tab:red", "*"), "student_cfg": ("tab:orange", "*")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, rows in ((k, v) for k, v in series.items() if v):
        color, marker = style.get(key, ("gray", "x-"))
        rows = sorted(rows, key=lambda r: r["forward_passes"])
        for ax, x in zip(axes, ("forward_passes", "seconds_per_sample")):
            ax.plot([r[x] for r in rows], [r["accuracy_mean"] for r in rows], marker, color=color, label=key,
                    markersize=14 if key.startswith("student") else 6)
    for ax, label in zip(axes, ("forward passes per sample", "wall seconds per sample")):
        ax.set_xscale("log", base=2 if label.startswith("forward") else 10)
        ax.set_xlabel(label)
        ax.set_ylabel("greedy accuracy (mean over tasks)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle("held-out test split: teacher by step count vs one-step student")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(results: list[dict], temperature: float = 0.0) -> str:
    """Results at one temperature as a markdown table: accuracy per task, distinct valid completions
    (sampled settings), forward passes and milliseconds per sample."""
    rows = [r for r in results if r["temperature"] == temperature]
    tasks = [t for t in rows[0]["accuracy"] if t != "mean"] + ["mean"]
    distinct = list(rows[0]["distinct_valid"]) if temperature > 0 else []
    lines = ["| model | steps | CFG | " + " | ".join(tasks) + "".join(f" | {t} distinct" for t in distinct)
             + " | passes | ms / sample |",
             "|---" * (len(tasks) + len(distinct) + 5) + "|"]
    for r in rows:
        cells = [f"{r['accuracy'][t]:.3f}" for t in tasks] + [f"{r['distinct_valid'][t]:.2f}" for t in distinct]
        lines.append(f"| {r['model']} | {r['steps']} | {r['cfg_scale']:g} | " + " | ".join(cells)
                     + f" | {r['forward_passes']} | {1000 * r['seconds_per_sample']:.3f} |")
    return "\n".join(lines)
