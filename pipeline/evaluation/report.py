"""The evaluation's outputs from its result rows (``pipeline.evaluation.grid.evaluate_settings``):
``metrics/eval.json``, the plot data, the PNG and the markdown tables."""

from __future__ import annotations

import io
import json
from pathlib import Path

from pipeline.core.files import atomic_write_bytes
from pipeline.data.scoring import Scorer


def summarize(results: list[dict], gen_length: int) -> dict:
    """``metrics/eval.json``: each setting's numbers under its name, plus the one-step student's
    speedup over the teacher at ``gen_length`` steps (greedy, no guidance), its accuracy gain over
    the one-step teacher, the wall time of one student pass over one teacher pass, and, at every
    step count both decoded greedily without guidance, student minus teacher accuracy per task."""
    by_key = {(r["model"], r["steps"], r["cfg_scale"], r["temperature"]): r for r in results
              if r.get("noise", "per_step") == "per_step" and (r["temperature"] > 0 or r["samples"] == 1)}
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
                                and r["temperature"] == 0 and r["samples"] == 1),
                               key=lambda r: r["steps"], default=None)
    if student and teacher_full_steps:
        speedup = teacher_full_steps["seconds_per_sample"] / student["seconds_per_sample"]
        summary["student_speedup_vs_teacher_gen_length"] = round(speedup, 2)
        gain = student["accuracy"]["mean"] - teacher_full_steps["accuracy"]["mean"]
        summary["student_minus_gen_length_teacher"] = round(gain, 4)
    if student and teacher_fewest_steps:
        gain = student["accuracy"]["mean"] - teacher_fewest_steps["accuracy"]["mean"]
        summary[f"student_minus_teacher_{teacher_fewest_steps['steps']}_steps"] = round(gain, 4)
    summary["student_minus_teacher_by_steps"] = {
        str(steps): {task: round(value - by_key[("teacher", steps, 0.0, 0.0)]["accuracy"][task], 4)
                     for task, value in r["accuracy"].items()}
        for (model, steps, cfg, temperature), r in sorted(by_key.items())
        if model == "student" and cfg == 0 and temperature == 0 and ("teacher", steps, 0.0, 0.0) in by_key}
    teacher_one_pass = by_key.get(("teacher", 1, 0.0, 0.0))
    if student and teacher_one_pass:  # the soft prompt's MLP and P prefix keys per layer, per pass
        cost = student["seconds_per_sample"] / teacher_one_pass["seconds_per_sample"]
        summary["student_pass_cost_vs_teacher_pass"] = round(cost, 3)
    return summary


def curve_rows(results: list[dict]) -> dict[str, list[dict]]:
    """Plot data: greedy accuracy against forward passes, one list per (model, guidance); every
    series is present (empty without guidance), so DVC always finds the files it declares."""
    series: dict[str, list[dict]] = {key: [] for key in ("teacher", "teacher_cfg", "student", "student_cfg")}
    for r in results:
        if r["temperature"] == 0 and r["samples"] == 1:
            key = r["model"] + ("_cfg" if r["cfg_scale"] > 0 else "")
            series[key].append({"forward_passes": r["forward_passes"], "seconds_per_sample": r["seconds_per_sample"],
                                **{f"accuracy_{task}": v for task, v in r["accuracy"].items()}})
    return series


def plot_accuracy(results: list[dict], path: Path) -> None:
    """PNG: greedy mean accuracy against forward passes per sample (the teacher's curve and the
    student's), and against wall seconds per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = curve_rows(results)
    style = {"teacher": ("tab:blue", "o-"), "teacher_cfg": ("tab:blue", "s--"),
             "student": ("tab:red", "*-"), "student_cfg": ("tab:orange", "*--")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, rows in ((k, v) for k, v in series.items() if v):
        color, marker = style.get(key, ("gray", "x-"))
        rows = sorted(rows, key=lambda r: r["forward_passes"])
        for ax, x in zip(axes, ("forward_passes", "seconds_per_sample")):
            ax.plot([r[x] for r in rows], [r["accuracy_mean"] for r in rows], marker, color=color, label=key,
                    markersize=12 if key.startswith("student") else 6)
    for ax, label in zip(axes, ("forward passes per sample", "wall seconds per sample")):
        ax.set_xscale("log", base=2 if label.startswith("forward") else 10)
        ax.set_xlabel(label)
        ax.set_ylabel("greedy accuracy (mean over tasks)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle("held-out test split: teacher and student by step count")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, image.getvalue())


def markdown_table(results: list[dict], several: bool = False) -> str:
    """The single-completion (greedy) or the several-completions settings as a markdown table:
    accuracy per task, distinct valid completions, temperature and noise (several), forward passes and
    milliseconds per sample. A latent student's greedy completions given several latents are in the
    second table, at temperature 0."""
    rows = [r for r in results if (r["samples"] > 1 or r["temperature"] > 0) == several]
    tasks = [t for t in rows[0]["accuracy"] if t != "mean"] + ["mean"]
    distinct = list(rows[0]["distinct_valid"]) if several else []
    lines = ["| model | steps | CFG | " + ("T | noise | " if several else "") + " | ".join(tasks)
             + "".join(f" | {t} distinct" for t in distinct) + " | passes | ms / sample |",
             "|---" * (len(tasks) + len(distinct) + 5 + 2 * several) + "|"]
    for r in rows:
        cells = [f"{r['accuracy'][t]:.3f}" for t in tasks] + [f"{r['distinct_valid'][t]:.2f}" for t in distinct]
        decoding = f"{r['temperature']:g} | {r.get('noise', 'per_step') if r['temperature'] > 0 else 'latents'} | "
        lines.append(f"| {r['model']} | {r['steps']} | {r['cfg_scale']:g} | " + (decoding if several else "")
                     + " | ".join(cells) + f" | {r['forward_passes']} | {1000 * r['seconds_per_sample']:.3f} |")
    return "\n".join(lines)


def difference_table(by_steps: dict[str, dict[str, float]]) -> str:
    """Student minus teacher greedy accuracy per task at each step count, as markdown (empty without rows)."""
    if not by_steps:
        return ""
    tasks = list(next(iter(by_steps.values())))
    lines = ["Student minus teacher, greedy, at the same step count\n", "| steps | " + " | ".join(tasks) + " |",
             "|---" * (len(tasks) + 1) + "|"]
    lines += [f"| {steps} | " + " | ".join(f"{diff[t]:+.3f}" for t in tasks) + " |" for steps, diff in by_steps.items()]
    return "\n".join(lines) + "\n\n"


def results_markdown(results: list[dict], summary: dict, temperature: float, samples: int, gen_length: int) -> str:
    """``results.md``: the greedy table, the sampled table, student minus teacher by step count and
    the one-step student's speedup (``summary`` is ``metrics/eval.json``'s content)."""
    return (f"Greedy, {summary['prompts']} held-out prompts ({summary.get('split', 'test')} split)\n\n{markdown_table(results)}\n\n"
            f"{samples} completions per prompt: sampled at temperature {temperature:g} (noise: per_step, fixed or "
            f"shared), or the student greedy given {samples} latents (T 0)\n\n"
            f"{markdown_table(results, several=True)}\n\n"
            f"{difference_table(summary.get('student_minus_teacher_by_steps', {}))}"
            + timing_line(summary, gen_length))


def timing_line(summary: dict, gen_length: int) -> str:
    """The one-step student's speedup and pass cost, as far as the grid measured them (the cost needs
    the teacher at one step, which a reduced grid may leave out)."""
    parts = []
    if summary.get("student_speedup_vs_teacher_gen_length") is not None:
        parts.append(f"One-step student speedup over the teacher at {gen_length} steps: "
                     f"{summary['student_speedup_vs_teacher_gen_length']}x")
    if summary.get("student_pass_cost_vs_teacher_pass") is not None:
        parts.append(f"one student pass costs {summary['student_pass_cost_vs_teacher_pass']}x one teacher pass")
    return "; ".join(parts) + f" ({summary['device']})\n" if parts else ""


def completion_lines(setting: str, records: list[dict], scorer: Scorer) -> list[str]:
    """JSONL lines of ``completions.jsonl``: per prompt of a setting, its reference, every completion
    and the scorer's judgment of each (what to read when a number looks wrong)."""
    return [json.dumps({"setting": setting, "prompt": r["prompt"], "reference": r["answer"],
                        **({"task": r["task"]} if "task" in r else {}), "completions": r["completions"],
                        "correct": scorer.judgments(r)}) + "\n" for r in records]
