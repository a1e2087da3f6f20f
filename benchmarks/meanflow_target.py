"""How good is the MeanFlow target at the one-step inference point?

On the held-out test prompts with the whole answer masked (t = 1), decode argmax of the teacher's v,
of the student's u(r = 0, t = 1), and of the target u_tgt = v - (t - r) du/dt for t - r in
{1, 0.5, 0.25} and both tangents, with du/dt the JVP of the initial student (= the teacher: zero
gate) and of the trained one. If argmax u_tgt at t - r = 1 scores below argmax v, the one-step
regression target is worse than the teacher's own one-step prediction. Prints a markdown table and
writes JSON. Float64 throughout.

    python benchmarks/meanflow_target.py        # needs artifacts/teacher, artifacts/student (dvc repro)
"""

import argparse
import json
from pathlib import Path

import datasets
import torch

from pipeline.core.cpu_numerics import pin_cpu_numerics
from pipeline.data.layout import Layout
from pipeline.data.scoring import score_records
from pipeline.data.tokenizer import decode_answer
from pipeline.generation.noise import completion_latents
from pipeline.student.meanflow import MeanFlowOptions, meanflow_loss
from pipeline.student.model import Student
from pipeline.teacher.artifact import load_teacher

ROOT = Path(__file__).resolve().parents[1]


def accuracy(logits: torch.Tensor, rows, tokenizer, layout: Layout, mask_id: int) -> dict[str, float]:
    """Task accuracy of the argmax of answer logits (B, gen_length, V)."""
    logits = logits.clone()
    logits[..., mask_id] = -torch.inf  # as the sampler: never commit [MASK]
    answers = logits.argmax(-1).tolist()
    records = [{"task": task, "prompt": prompt, "answer": answer,
                "completions": [decode_answer(tokenizer, ids, {layout.pad_token_id})]}
               for task, prompt, answer, ids in zip(rows["task"], rows["prompt"], rows["answer"], answers)]
    return {task: round(m["accuracy"], 3) for task, m in score_records(records).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("metrics/benchmarks/meanflow_target.json"))
    args = parser.parse_args()
    pin_cpu_numerics()  # the same arithmetic as the stages whose outputs this is compared with
    base, tokenizer, _ = load_teacher(ROOT / "artifacts" / "teacher", dtype=torch.float64)
    layout = Layout.load(ROOT / "data")
    rows = datasets.load_from_disk(str(ROOT / "data" / "test"))
    mask_id, P = base.config.mask_token_id, layout.prompt_length
    x = torch.as_tensor(rows["input_ids"]).long()
    x[:, P:] = mask_id  # (B, T): the answer fully masked, the inference point
    attention_mask = torch.as_tensor(rows["attention_mask"]).long()
    masked = torch.zeros_like(x, dtype=torch.bool)
    masked[:, P:] = True
    t = torch.ones(len(x), dtype=torch.float64)
    trained = Student.from_pretrained(ROOT / "artifacts" / "student", base=base).double()
    students = {"initial student (= teacher)": Student(base, config=trained.config).double(), "trained student": trained}

    # A latent student is read at each prompt's first latent, as the evaluation's greedy row does.
    latent = None
    if trained.latent_dim:
        latent = completion_latents(0, torch.arange(len(x)), torch.zeros(len(x), dtype=torch.long),
                                    trained.latent_dim).double()
    with torch.no_grad():
        v = base(input_ids=x, attention_mask=attention_mask).log_softmax(-1)  # (B, T, V)
    results = {"teacher v": accuracy(v[:, P:], rows, tokenizer, layout, mask_id)}
    for name, student in students.items():
        with torch.no_grad():
            u = student(input_ids=x, r=0.0, t=1.0, attention_mask=attention_mask, latent=latent)
        results[f"{name}: u(r=0, t=1)"] = accuracy(u[:, P:], rows, tokenizer, layout, mask_id)
        for kind in ("linear", "seed"):
            for gap in (1.0, 0.5, 0.25):
                with torch.no_grad():  # the target only: no gradient wanted
                    out = meanflow_loss(student, x, attention_mask, masked, t, t - gap, v[masked],
                                        MeanFlowOptions(tangent=kind), layout.gen_length, latent=latent,
                                        keep_target=True)
                target = out.target.view(len(x), layout.gen_length, -1)  # every answer position is masked
                results[f"{name}: u_tgt, {kind}, t - r = {gap:g}"] = accuracy(target, rows, tokenizer, layout, mask_id)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    tasks = list(results["teacher v"])
    print("| argmax of | " + " | ".join(tasks) + " |")
    print("|---" * (len(tasks) + 1) + "|")
    for name, scores in results.items():
        print(f"| {name} | " + " | ".join(f"{scores[task]:.2f}" for task in tasks) + " |")


if __name__ == "__main__":
    main()
