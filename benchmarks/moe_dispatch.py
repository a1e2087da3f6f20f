"""Expert dispatch of one LLaDA-MoE-7B-A1B MoE layer: grouped (the model's) against the reference
modeling code's loop.

One layer at the real shape (hidden 2048, 64 experts of width 1024, top-8 routing, float32 on CPU),
and a narrow one (hidden 256, width 128) where the dispatch rather than the expert weights costs;
random weights, routed once; then both dispatches on the same routing, best of ``--repeats`` wall
times each, outputs checked equal. ``grouped_dispatch`` sorts the N x 8 assignments by expert once
and runs each expert on one contiguous slice; ``reference_dispatch`` scans a one-hot mask per
expert and ``index_add_``s. Both do the same matmuls; the difference is the dispatch around them.

    python benchmarks/moe_dispatch.py          # about 2 minutes on 2 CPU cores; writes metrics/benchmarks/moe_dispatch.json
"""

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline.core.cpu_numerics import pin_cpu_numerics
from pipeline.models.llada_moe import LLaDAMoEConfig, SparseMoE, grouped_dispatch, reference_dispatch

LLADA_MOE_7B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, vocab_size=157184,
                    num_experts=64, num_experts_per_tok=8, expert_intermediate_size=1024)
SHAPES = {"llada_moe_7b": LLADA_MOE_7B, "narrow": {**LLADA_MOE_7B, "hidden_size": 256, "expert_intermediate_size": 128}}


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 1024], help="tokens per batch (B x T)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("metrics/benchmarks/moe_dispatch.json"))
    args = parser.parse_args()
    pin_cpu_numerics()
    rows = []
    for shape, fields in SHAPES.items():
        torch.manual_seed(0)
        config = LLaDAMoEConfig(**fields)
        moe = SparseMoE(config)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        rows += measure(shape, moe, args.tokens, args.repeats)
    print("\n| shape | tokens | experts used | grouped (ms) | reference loop (ms) | speedup |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['tokens']} | {r['experts_used']} | {r['grouped_ms']} | {r['reference_loop_ms']} | "
              f"{r['speedup']}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"shapes": SHAPES, "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def measure(shape: str, moe: SparseMoE, tokens: list[int], repeats: int) -> list[dict]:
    rows = []
    with torch.no_grad():
        for n in tokens:
            h = torch.randn(n, moe.config.hidden_size)
            weights, chosen = moe.route(h)
            grouped = grouped_dispatch(moe.experts, h, weights, chosen)
            reference = reference_dispatch(moe.experts, h, weights, chosen)
            error = (grouped - reference).abs().max().item() / reference.abs().max().item()
            t_grouped = best_time(lambda: grouped_dispatch(moe.experts, h, weights, chosen), repeats)
            t_reference = best_time(lambda: reference_dispatch(moe.experts, h, weights, chosen), repeats)
            rows.append(dict(shape=shape, tokens=n, experts_used=int(chosen.unique().numel()), grouped_ms=round(1e3 * t_grouped, 2),
                             reference_loop_ms=round(1e3 * t_reference, 2),
                             speedup=round(t_reference / t_grouped, 2), max_relative_difference=error))
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
