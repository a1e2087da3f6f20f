"""Stage ``evaluate``: teacher and student each at 1, 2, 4, ..., gen_length steps on the held-out test
split, with and without CFG, greedy and sampled (params: ``evaluate``).

Writes ``metrics/eval.json`` (every setting's accuracy per task, distinct valid completions, forward
passes and wall seconds per sample; the student's speedup, and student minus teacher per task at each
step count) and, under ``metrics/eval/``, the plot data (``*.json``),
``accuracy_vs_forward_passes.png``, ``results.md`` (the tables the README quotes) and
``completions.jsonl`` (every completion of every setting with its judgment, for inspection).
Completions are judged by ``evaluate.scorer``.

    python stages/evaluate.py --data data --teacher artifacts/teacher --student artifacts/student \\
        --metrics metrics/eval.json --report metrics/eval

Under ``torchrun --nproc-per-node N`` (or ``srun``), each rank decodes a share of every setting's
batches on its own device and rank 0 writes the merged results, equal to one process's (seconds per
sample aside: device seconds summed over the ranks).
"""

import dataclasses
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.core.errors import ParamsError
from pipeline.core.files import atomic_write_text, require_writable, write_json
from pipeline.core.params import load_section
from pipeline.core.ranks import Ranks
from pipeline.core.stage import run_stage, stage_parser
from pipeline.data.layout import Layout, load_split
from pipeline.data.scoring import parse_scorer
from pipeline.data.tokenizer import stop_token_ids
from pipeline.evaluation.grid import completions_to_decode, evaluate_settings, forward_passes_per_prompt, settings_for
from pipeline.evaluation.params import EvaluateParams
from pipeline.evaluation.report import completion_lines, curve_rows, plot_accuracy, results_markdown, summarize
from pipeline.generation.decode import default_step_counts
from pipeline.generation.sampler import SamplerOptionError, SamplerOptions
from pipeline.student.model import Student
from pipeline.teacher.artifact import checkpoint_dir, load_teacher


def parse_args(argv=None):
    parser = stage_parser(__doc__, reads=["data", "teacher", "student"])
    parser.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"), help="every setting's numbers")
    parser.add_argument("--report", type=Path, default=Path("metrics/eval"), help="plot data, the plot, results.md")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="the split to decode (choose settings on val; the README reports test)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    ranks = Ranks.from_launcher()
    if ranks.rank == 0:
        require_writable(args.metrics, args.report)
    params = load_section(EvaluateParams, "evaluate")
    scorer = parse_scorer(params.scorer or "builtin")
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    layout = Layout.load(args.data)
    G = layout.gen_length
    keys = {"steps": "teacher_steps", "block_length": "block_length", "temperature": "temperature",
            "cfg_scale": "cfg_scale"}
    try:  # every setting's sampler options, refused before any model loads
        options = SamplerOptions(gen_length=G, steps=G, block_length=params.block_length,
                                 temperature=params.temperature, cfg_scale=params.cfg_scale)
        default = default_step_counts(G, options.num_blocks)
        steps = sorted(set(params.teacher_steps or default) | {G})
        student_steps = sorted(set(params.student_steps or default) | {1})
        for key, counts in (("teacher_steps", steps), ("student_steps", student_steps)):
            keys["steps"] = key  # which list a refused step count came from
            for n in counts:  # one step is one block
                dataclasses.replace(options, steps=n, block_length=G if n == 1 else options.block_length)
    except SamplerOptionError as err:
        raise ParamsError(f"params.yaml:evaluate.{keys[err.key]}: {err.message}") from err
    block_length = options.block_length
    ranks.join()
    device = ranks.device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher, tokenizer, record = load_teacher(args.teacher, dtype=dtype, device=device)
    student = Student.from_pretrained(args.student, base=teacher).to(device)  # shares the teacher's weights
    stops = stop_token_ids(tokenizer, teacher.config, checkpoint_dir(args.teacher, record))
    rows = load_split(args.data, args.split)
    settings = settings_for(steps, params.cfg_scale, params.temperature, params.samples, G, block_length,
                            params.noise_variants, student_latents=student.latent_dim > 0,
                            student_steps=student_steps)
    passes = forward_passes_per_prompt(settings, params.timing_repeats)
    if ranks.rank == 0:  # what the grid costs, before it is spent (LLaDA-8B: reduce the grid, README)
        print(f"evaluate: {len(settings)} settings, {passes} forward passes per prompt x {len(rows)} prompts "
              f"({args.split} split) = {passes * len(rows)}", file=sys.stderr)

    bar = tqdm(total=completions_to_decode(settings, len(rows), params.timing_repeats, params.batch_size, ranks),
               desc="evaluate" if ranks.world == 1 else f"evaluate, rank 0 of {ranks.world}", unit="completion",
               file=sys.stderr, disable=ranks.rank > 0)
    done, inspection = [], []
    def progress(result, records):  # noqa: E306
        done.append(f"{result['name']} {result['accuracy']['mean']:.3f}")
        inspection.extend(completion_lines(result["name"], records, scorer))
    def on_batch(name, completions):  # noqa: E306
        bar.set_postfix_str(f"setting {len(done) + 1}/{len(settings)} {name}" + (f"; last {done[-1]}" if done else ""))
        bar.update(completions)
    results = evaluate_settings({"teacher": teacher.eval(), "student": student.eval()}, settings, rows, tokenizer,
                                stops, layout, params.batch_size, params.seed, params.timing_repeats, progress,
                                params.num_fields, on_batch, ranks, scorer)
    bar.close()
    ranks.leave()
    if ranks.rank > 0:
        return

    summary = {"split": args.split, "prompts": len(rows), "scorer": scorer.name, "device": device.type,
               "ranks": ranks.world, "forward_passes_per_prompt": passes, **summarize(results, G)}
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.report.mkdir(parents=True, exist_ok=True)
    write_json(args.metrics, summary)
    for name, series in curve_rows(results).items():
        write_json(args.report / f"{name}.json", series)
    plot_accuracy(results, args.report / "accuracy_vs_forward_passes.png")
    tables = results_markdown(results, summary, params.temperature, params.samples, G)
    atomic_write_text(args.report / "results.md", tables)
    atomic_write_text(args.report / "completions.jsonl", "".join(inspection))
    print(tables)


if __name__ == "__main__":
    run_stage(main)
