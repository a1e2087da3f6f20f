"""Stage two's cost: seconds per MeanFlow step (JVP live) against a plain distillation step (KL of u
to v, no JVP) on the same batch, peak memory of each, and data-loader throughput against what
training consumes.

    python benchmarks/train_student.py           # needs artifacts/teacher and artifacts/cache (dvc repro)

Each variant runs in its own process, so peak RSS (CPU) or peak CUDA memory is its own. Goal for
the time ratio: <= 1.5.
"""

import dataclasses
import json
import resource
import time
from pathlib import Path

from step_timing import time_variants

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "meanflow_no_grad_jvp", "meanflow_grad_jvp")


def measure(variant: str, steps: int, batch_size: int) -> dict:
    """Runs in a child process: time ``steps`` optimizer steps of ``variant`` on one fixed batch."""
    import psutil
    import torch

    from pipeline.cache.loader import CacheMiniBatches
    from pipeline.core.params import load_section
    from pipeline.data.layout import Layout
    from pipeline.student.distillation import StudentDistillation
    from pipeline.student.meanflow import dense_logprobs, token_losses
    from pipeline.student.model import Student
    from pipeline.student.params import StudentParams
    from pipeline.teacher.artifact import load_teacher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, _, _ = load_teacher(ROOT / "artifacts" / "teacher", device=device)
    defaults = load_section(StudentParams, "student", ROOT / "params.yaml")
    jvp = "grad" if variant == "meanflow_grad_jvp" else "no_grad"
    params = StudentParams(**{**vars(defaults), "jvp": jvp, "batch_size": batch_size})
    student = Student(base, config=params.soft_prompt)
    module = StudentDistillation(student, params, Layout.load(ROOT / "data").gen_length).to(device)
    batch = CacheMiniBatches(ROOT / "artifacts" / "cache", batch_size)[0]
    batch = dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)})
    optimizer = torch.optim.AdamW(student.soft_prompt.parameters(), lr=1e-4)

    def step():
        if variant == "plain":
            v = dense_logprobs(batch.topk_ids, batch.topk_logprobs, base.config.embedding_size)
            latent = student.soft_prompt.prior_latents(0, batch.example_index).to(device) if student.latent_dim else None
            u = student(input_ids=batch.input_ids, r=batch.t, t=batch.t, attention_mask=batch.attention_mask,
                        latent=latent)
            loss = token_losses("kl", u[batch.masked], v).mean()
        else:
            loss = module.meanflow_step(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    rss_before = psutil.Process().memory_info().rss  # model, batch and optimizer in memory
    for _ in range(2):  # warm-up
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # peak RSS of this process (KiB on Linux) above its RSS once set up
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"seconds_per_step": seconds, "peak_memory_bytes": max(peak, 0), "device": device}


def loader_throughput(batch_size: int, batches: int) -> float:
    from pipeline.cache.loader import TeacherCacheDataModule

    data = TeacherCacheDataModule(ROOT / "artifacts" / "cache", batch_size)
    data.setup()
    rows, started = 0, time.perf_counter()
    for i, batch in enumerate(data.train_dataloader()):
        rows += len(batch.meanflow.t)
        if i + 1 == batches:
            break
    return rows / (time.perf_counter() - started)


def main() -> None:
    args, results = time_variants(__file__, __doc__.splitlines()[0], VARIANTS, measure,
                                  Path("metrics/benchmarks/train_student.json"), default_steps=10)
    if results is None:
        return
    plain = results["plain"]["seconds_per_step"]
    for variant in VARIANTS:
        results[variant]["ratio_to_plain"] = round(results[variant]["seconds_per_step"] / plain, 3)
    throughput = loader_throughput(args.batch_size, 50)
    consumed = args.batch_size / results["meanflow_no_grad_jvp"]["seconds_per_step"]
    results["data_loader"] = {"rows_per_second": round(throughput, 1), "training_consumes_rows_per_second": round(consumed, 1),
                              "headroom": round(throughput / consumed, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| step | s/step | x plain | peak memory (MiB) |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        r = results[variant]
        print(f"| {variant} | {r['seconds_per_step']:.3f} | {r['ratio_to_plain']:.2f} | {r['peak_memory_bytes'] / 2**20:.0f} |")
    d = results["data_loader"]
    print(f"\ndata loader {d['rows_per_second']} rows/s; training consumes {d['training_consumes_rows_per_second']} rows/s "
          f"(headroom x{d['headroom']})")


if __name__ == "__main__":
    main()
