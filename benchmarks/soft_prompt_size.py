"""What the student's soft prompt costs on real bases: LLaDA-8B and LLaDA-MoE-7B-A1B.

Counts the trainable parameters of the soft prompt built with the default ``student.soft_prompt``
params (modules on the meta device: nothing allocated), and derives the memory training needs for
them: fp32 weights, gradients and AdamW's two moments (16 bytes per parameter), and the prefix
keys/values one row carries (n_layers x 2 x Hkv x P x head_dim values; the MeanFlow JVP carries a
tangent of the same size). Arithmetic from the architectures' shapes, not a measurement.

    python benchmarks/soft_prompt_size.py    # writes metrics/benchmarks/soft_prompt_size.json
"""

import argparse
import json
import math
from pathlib import Path

import torch

from pipeline.student.soft_prompt import SoftPrompt, SoftPromptConfig

# The shapes that size the prefix, and the base's parameter count (its weights are counted in bf16).
BASES = {
    "LLaDA-8B": dict(n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, base_params=8.0e9),
    "LLaDA-MoE-7B-A1B": dict(n_layers=16, n_heads=16, n_kv_heads=16, head_dim=128, base_params=7.0e9),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("metrics/benchmarks/soft_prompt_size.json"))
    args = parser.parse_args()
    config = SoftPromptConfig()
    rows = []
    for name, b in BASES.items():
        with torch.device("meta"):
            prompt = SoftPrompt(config, b["n_layers"], b["n_heads"], b["n_kv_heads"], b["head_dim"])
        params = sum(p.numel() for p in prompt.parameters())
        prefix_values = math.prod(prompt.prefix_shape)
        rows.append(dict(
            base=name, prompt_length=config.prompt_length, hidden_size=config.hidden_size, latent_dim=config.latent_dim,
            soft_prompt_params=params, fraction_of_base=params / b["base_params"],
            weights_mb=4 * params / 2**20, training_state_mb=16 * params / 2**20,
            prefix_values_per_row=prefix_values, prefix_kb_per_row_fp32=4 * prefix_values / 2**10,
            base_weights_gb_bf16=2 * b["base_params"] / 2**30,
        ))
    print("| base | soft prompt params | of the base | fp32 weights | weights + grads + AdamW | prefix per row (fp32) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['base']} | {r['soft_prompt_params'] / 1e6:.1f}M | {100 * r['fraction_of_base']:.2f}% | "
              f"{r['weights_mb']:.0f} MB | {r['training_state_mb']:.0f} MB | {r['prefix_kb_per_row_fp32']:.0f} KB |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"soft_prompt": config.__dict__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
