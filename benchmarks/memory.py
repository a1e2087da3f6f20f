"""Peak memory at LLaDA's vocabulary: does it grow with the masked positions M, or with B x T x V?

A LLaDA-shaped model (LLaDA-8B's head_dim 128, SwiGLU ratio 3, RoPE base and vocabulary of 126,464
ids, but a small trunk: 2 layers, d_model 256) in float32 on the CPU. Over a grid of batch size B,
sequence length T (prompt and answer T / 2 each) and masked fraction f of the answer (M = B f T / 2
masked positions), each of these is measured on the same batch:

* ``full_logits``: a plain forward returning the (B, T, V) logits (the yardstick);
* ``cache_fill``: stage one's teacher top-k (k = 32) on the batch (``teacher_topk``);
* ``train_no_grad_jvp`` / ``train_grad_jvp``: one MeanFlow training step (loss and backward) as
  ``StudentDistillation.meanflow_step`` runs it from the cached top-k, every row at r < t;
  ``train_checkpointed``: the no-grad-JVP step with the trunk's activations recomputed in the backward
  pass (``student.activation_checkpointing``; a label measured before it existed shows "-");
* ``rollout_step``: one rollout-objective step (loss and backward), a latent student with K = 4
  draws scored, every masked answer position a target;
* ``generation_step``: one sampler step that fills the M masked positions (``SamplerOptions.one_step``).

Method: the whole grid runs in one child process per code tree, single-threaded, with glibc's mmap
threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that every large tensor is its own mapping,
returned to the system when freed. Before each measurement the kernel's peak-RSS mark is reset
(``echo 5 > /proc/self/clear_refs``); the peak is ``VmHWM`` after the operation minus ``VmRSS``
before it: the memory the operation needed above the weights, the batch and the optimizer state.
Linux only. ``--code DIR`` imports ``pipeline`` from another checkout, e.g. the commit before the
change, so both run the same script ("before" and "after"):

    python benchmarks/memory.py                                   # this tree: the "after" numbers
    git worktree add /tmp/llada-base bc4d2de
    python benchmarks/memory.py --code /tmp/llada-base --label before
    python benchmarks/memory.py --report                          # tables, slopes, LLaDA-8B estimate

Results go to ``metrics/benchmarks/memory.json`` (one entry per label) and ``memory.md``.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, MASK_ID, D_MODEL, N_LAYERS, MLP = 126464, 126336, 256, 2, 768
BATCHES, LENGTHS, FRACTIONS = (1, 4), (128, 256), (0.25, 0.5, 1.0)
KINDS = ("full_logits", "cache_fill", "train_no_grad_jvp", "train_grad_jvp", "train_checkpointed", "rollout_step",
         "generation_step")
TOP_K, DRAWS, LATENT = 32, 4, 8
GIB = 2**30


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_above_current(operation) -> int:
    """Bytes of peak RSS that ``operation()`` adds to the process's current RSS."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kib("VmRSS")
    operation()
    return (status_kib("VmHWM") - before) * 1024


def build(B: int, T: int, fraction: float, seed: int = 0) -> dict:
    """A batch: prompt and answer T / 2 each, ``fraction`` of each answer masked (the same count per row)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    G = T // 2
    m = max(1, round(fraction * G))
    x0 = torch.randint(0, MASK_ID, (B, T), generator=g)
    order = torch.rand(B, G, generator=g).argsort(dim=1)[:, :m]  # m random answer positions per row
    masked = torch.zeros(B, T, dtype=torch.bool)
    masked.scatter_(1, T - G + order, True)
    M = int(masked.sum())
    topk_logprobs = torch.full((M, TOP_K), -5.0).half()  # 32 ids at p = e^-5: a valid top-k with a tail
    return {"x0": x0, "x_t": x0.masked_fill(masked, MASK_ID), "masked": masked, "attention_mask": torch.ones_like(x0),
            "topk_ids": torch.randint(0, VOCAB, (M, TOP_K), generator=g, dtype=torch.int32),
            "topk_logprobs": topk_logprobs, "t": torch.full((B,), fraction), "G": G, "m": m, "M": M}


def measure_grid() -> list[dict]:
    """Runs in the child: every kind at every grid point, on the ``pipeline`` found on sys.path."""
    import torch

    import pipeline
    from pipeline.cache.fill import teacher_topk
    from pipeline.cache.loader import TopKBatch
    from pipeline.data.layout import Layout
    from pipeline.generation.sampler import SamplerOptions, generate, sampler_network
    from pipeline.models.llada import LLaDA, LLaDAConfig
    from pipeline.student.distillation import StudentDistillation
    from pipeline.student.model import Student
    from pipeline.student.params import StudentParams
    from pipeline.student.rollout_objective import RolloutInterval, rollout_loss
    from pipeline.student.soft_prompt import SoftPromptConfig

    print(f"measuring {pipeline.__file__}", file=sys.stderr, flush=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LLaDAConfig(d_model=D_MODEL, n_layers=N_LAYERS, n_heads=D_MODEL // 128, mlp_hidden_size=MLP,
                         vocab_size=VOCAB, mask_token_id=MASK_ID)
    model = LLaDA(config).init_weights(generator=torch.Generator().manual_seed(0)).eval()
    soft_prompt = dict(prompt_length=8, hidden_size=64)
    students = {jvp: StudentDistillation(Student(model, config=SoftPromptConfig(latent_dim=0, **soft_prompt)),
                                         StudentParams(jvp=jvp, meanflow_weight=1.0, equal_fraction=0.0), 1)
                for jvp in ("no_grad", "grad")}
    latent_student = Student(model, config=SoftPromptConfig(latent_dim=LATENT, **soft_prompt))
    with torch.no_grad():  # an open gate, so that the soft prompt is in the graph as in training
        for student in [s.student for s in students.values()] + [latent_student]:
            student.soft_prompt.prompt_gate.fill_(0.1)

    def meanflow_step(jvp, batch):
        module = students[jvp]
        module.gen_length = batch["G"]
        rows = TopKBatch(input_ids=batch["x_t"], attention_mask=batch["attention_mask"], masked=batch["masked"],
                         t=batch["t"], x0=batch["x0"], topk_ids=batch["topk_ids"], topk_logprobs=batch["topk_logprobs"],
                         example_index=torch.arange(len(batch["t"])),
                         sample_index=torch.zeros(len(batch["t"]), dtype=torch.long))
        module.meanflow_step(rows).loss.backward()
        module.student.zero_grad(set_to_none=True)

    def checkpointed(step):
        model.checkpoint_blocks = True
        try:
            step()
        finally:
            model.checkpoint_blocks = False

    def rollout_step(batch):
        G, answer = batch["G"], batch["masked"][:, -batch["G"]:]
        B = len(batch["t"])
        interval = RolloutInterval(input_ids=batch["x_t"], attention_mask=batch["attention_mask"], targets=answer,
                                   tokens=batch["x0"][:, -G:], t=batch["t"], r=torch.zeros(B),
                                   one_step=torch.zeros(B, dtype=torch.bool))
        latents = torch.randn(B, DRAWS, LATENT, generator=torch.Generator().manual_seed(1))
        rollout_loss(latent_student, interval, latents, MASK_ID).loss.backward()
        latent_student.zero_grad(set_to_none=True)

    operations = {
        "full_logits": lambda b: model(input_ids=b["x_t"], attention_mask=b["attention_mask"]),
        "cache_fill": lambda b: teacher_topk(model, b["x_t"], b["attention_mask"], b["masked"],
                                             Layout(prompt_length=b["G"], gen_length=b["G"], pad_token_id=0), TOP_K, 0.0),
        "train_no_grad_jvp": lambda b: meanflow_step("no_grad", b),
        "train_grad_jvp": lambda b: meanflow_step("grad", b),
        "train_checkpointed": lambda b: checkpointed(lambda: meanflow_step("no_grad", b)),
        "rollout_step": rollout_step,
        "generation_step": lambda b: generate(sampler_network(model), b["x0"][:, : -b["m"]],
                                              SamplerOptions.one_step(b["m"]), mask_id=MASK_ID),
    }
    results = []
    for B in BATCHES:
        for T in LENGTHS:
            for fraction in FRACTIONS:
                batch = build(B, T, fraction)
                for kind in KINDS:
                    if kind == "full_logits" and fraction != FRACTIONS[0]:
                        continue  # no masked positions involved: once per (B, T)
                    grad = kind in ("train_no_grad_jvp", "train_grad_jvp", "train_checkpointed", "rollout_step")
                    with torch.enable_grad() if grad else torch.inference_mode():
                        peak = peak_above_current(lambda: operations[kind](batch))
                    results.append({"kind": kind, "B": B, "T": T, "fraction": fraction, "M": batch["M"],
                                    "peak_bytes": peak})
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def fit(points: list[dict]) -> dict:
    """Least squares peak = c0 + c_M M + c_BT (B T): bytes per masked position (the slope) and per
    sequence position (the (B, T, V) term, with the trunk's per-position activations)."""
    import numpy as np

    X = np.array([[1.0, p["M"], p["B"] * p["T"]] for p in points])
    y = np.array([p["peak_bytes"] for p in points], dtype=float)
    if np.linalg.matrix_rank(X) < 3:  # full_logits: M is not varied independently of B T
        X = X[:, [0, 2]]
        c0, c_bt = np.linalg.lstsq(X, y, rcond=None)[0]
        return {"c0": c0, "per_masked_position": 0.0, "per_position": c_bt}
    c0, c_m, c_bt = np.linalg.lstsq(X, y, rcond=None)[0]
    return {"c0": c0, "per_masked_position": c_m, "per_position": c_bt}


LLADA_8B = {"d_model": 4096, "T": 768, "answer": 384, "fraction": 0.25, "budget": 8 * GIB}


def largest_batch(kind: str, code: dict, after: dict) -> int:
    """LLaDA-8B's largest batch whose vocabulary-side memory fits the budget at T = 768 (answer 384, a
    quarter masked), extrapolated from the fits of this code and of the "after" code:

    * per position: what this code needs beyond "after", whose per-position cost is the trunk's alone
      (no V-sized tensor grows with T there): the (B, T, V) term, carried over as measured (same V);
    * per masked position: the same difference, plus the "after" cost, which is (M, C)-sized (hidden
      states of the masked rows), scaled to d_model 4096; except generation's, its (M, V) logits;
    * the fixed cost (the chunk working set) comes off the budget.

    Left out: the 8B trunk's own activations, identical before and after."""
    s = LLADA_8B
    if kind == "full_logits":  # all of it is the logits
        per_row = code["per_position"] * s["T"]
    else:
        width = 1 if kind == "generation_step" else s["d_model"] / D_MODEL
        per_masked = code["per_masked_position"] - after["per_masked_position"] * (1 - width)
        per_row = (per_masked * s["answer"] * s["fraction"]
                   + (code["per_position"] - after["per_position"]) * s["T"])
    return int((s["budget"] - max(code["c0"], 0.0)) // per_row)


def report(results: dict) -> str:
    labels = [label for label in ("before", "after") if label in results]
    rows = {label: {(p["kind"], p["B"], p["T"], p["fraction"]): p for p in results[label]} for label in labels}
    lines = ["Peak memory above the weights (MiB), LLaDA vocabulary 126,464, 2 layers x 256, float32, CPU:", ""]
    head = "| B | T | masked | M | full logits | " + " | ".join(
        f"{kind.replace('_', ' ')} {label}" for kind in KINDS[1:] for label in labels) + " |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for B in BATCHES:
        for T in LENGTHS:
            for fraction in FRACTIONS:
                full = rows[labels[-1]][("full_logits", B, T, FRACTIONS[0])]["peak_bytes"]
                M = rows[labels[-1]][("cache_fill", B, T, fraction)]["M"]
                cells = [f"{rows[label][(kind, B, T, fraction)]['peak_bytes'] / 2**20:.0f}"
                         if (kind, B, T, fraction) in rows[label] else "-" for kind in KINDS[1:] for label in labels]
                lines.append(f"| {B} | {T} | {fraction:g} | {M} | {full / 2**20:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Fit peak = c0 + c_M M + c_BT B T (bytes), and LLaDA-8B's largest batch whose vocabulary-side "
              "memory fits 8 GiB at T = 768 (answer 384, a quarter masked; extrapolated, see largest_batch):", "",
              "| step | code | c_M (bytes / masked position) | c_BT (bytes / position) | c0 (MiB) | "
              "at a quarter masked: peak / full logits | LLaDA-8B largest batch in 8 GiB |", "|---|---|---|---|---|---|---|"]
    fits = {}
    for label in labels:
        for kind in KINDS:
            points = [p for p in results[label] if p["kind"] == kind]
            if not points:  # measured before this kind existed
                continue
            coefficients = fit(points)
            after = fit([p for p in results["after"] if p["kind"] == kind]) if "after" in results else coefficients
            quarter = [p["peak_bytes"] / rows[label][("full_logits", p["B"], p["T"], FRACTIONS[0])]["peak_bytes"]
                       for p in points if p["fraction"] == 0.25]
            fits[f"{kind}/{label}"] = {**coefficients, "llada_8b_largest_batch": largest_batch(kind, coefficients, after),
                                       "quarter_masked_over_full_logits": [round(q, 3) for q in quarter]}
            lines.append(f"| {kind.replace('_', ' ')} | {label} | {coefficients['per_masked_position']:,.0f} | "
                         f"{coefficients['per_position']:,.0f} | {coefficients['c0'] / 2**20:.0f} | "
                         f"{min(quarter):.2f} - {max(quarter):.2f} | {fits[f'{kind}/{label}']['llada_8b_largest_batch']} |")
    results["fits"] = fits
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose pipeline package is measured")
    parser.add_argument("--label", default="after")
    parser.add_argument("--report", action="store_true", help="only write the tables from the saved results")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "benchmarks" / "memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_grid()))
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.pop("fits", None)
    if not args.report:
        env = {**os.environ, "PYTHONPATH": str(args.code.resolve()), "MALLOC_MMAP_THRESHOLD_": "65536",
               "OMP_NUM_THREADS": "1"}
        child = subprocess.run([sys.executable, __file__, "--child"], env=env, cwd=args.code, stdout=subprocess.PIPE,
                               text=True, check=True)
        results[args.label] = json.loads(child.stdout.strip().splitlines()[-1])
    table = report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
