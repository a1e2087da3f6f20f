"""LLaDA's reference sampler (block decoding, low-confidence remasking, unsupervised CFG), batched,
plus one-step generation for the student, and the ``python -m pipeline.generate`` command line.

The sampler follows the official LLaDA / LLaDA-MoE ``generate`` (seeds/004): the answer region starts
fully masked; it is split into blocks filled left to right; each block gets ``steps / num_blocks``
steps, and each step commits the scheduled number of masked tokens of the current block, picking
the most confident predictions (``low_confidence``) or random ones (``random``); the others stay
masked. ``temperature > 0`` samples with Gumbel noise in float64. ``cfg_scale = w > 0`` runs the
unconditional branch (prompt replaced by mask tokens) and uses ``un + (w + 1) * (cond - un)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

# A mask predictor maps (input_ids (B, T), attention_mask (B, T) or None) to logits (B, T, V).
MaskPredictor = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Remasking = Literal["low_confidence", "random"]


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None):
    """The reference's Gumbel-max trick in float64: argmax of the result samples softmax(logits / T)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return logits.exp() / (-torch.log(noise)) ** temperature


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each step (B, steps): an even split, the remainder on the first steps."""
    total = mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base, remainder = total // steps, total % steps
    step = torch.arange(steps, device=mask_index.device)[None, :]  # (1, steps)
    return base + (step < remainder).long()


def guided_logits(
    model: MaskPredictor,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_index: torch.Tensor,
    cfg_scale: float,
    mask_id: int,
) -> torch.Tensor:
    """Logits of ``model`` on ``x``; with ``cfg_scale > 0`` unsupervised CFG against the same input
    with the prompt positions replaced by ``mask_id``."""
    if cfg_scale <= 0:
        return model(x, attention_mask)
    unconditional = x.masked_fill(prompt_index, mask_id)
    both = torch.cat((x, unconditional), dim=0)
    mask = None if attention_mask is None else torch.cat((attention_mask, attention_mask), dim=0)
    cond, un = model(both, mask).chunk(2, dim=0)
    return un + (cfg_scale + 1) * (cond - un)


@torch.no_grad()
def generate(
    model: MaskPredictor,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: Remasking = "low_confidence",
    mask_id: int = 126336,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill ``gen_length`` masked positions after ``prompt`` (B, Lp); returns (B, Lp + gen_length).

    ``attention_mask`` (B, Lp) marks real prompt tokens (left padding is 0); the answer is always
    attended. ``steps == 1`` with ``block_length == gen_length`` is one-step generation.
    """
    if gen_length < 1 or block_length < 1 or steps < 1:
        raise ValueError("gen_length, block_length and steps must be positive")
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps {steps} is not a multiple of the number of blocks {num_blocks}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
    steps_per_block = steps // num_blocks
    B, Lp = prompt.shape
    x = torch.full((B, Lp + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :Lp] = prompt
    prompt_index = x != mask_id
    if attention_mask is not None:
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(B, gen_length)), dim=1)
    positions = torch.arange(x.shape[1], device=x.device)[None, :]

    for block in range(num_blocks):
        start, end = Lp + block * block_length, Lp + (block + 1) * block_length
        schedule = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)  # (B, steps)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = guided_logits(model, x, attention_mask, prompt_index, cfg_scale, mask_id)
            x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)  # (B, T)
            if remasking == "low_confidence":
                # fp32 at least: bf16 probabilities tie often and would make the ranking arbitrary.
                p = F.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=x.device)
            x0_p = x0_p.masked_fill(positions >= end, -torch.inf)
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            # Commit the schedule[:, i] most confident positions of each row.
            order = confidence.argsort(dim=-1, descending=True, stable=True)
            chosen = positions.expand(B, -1) < schedule[:, i : i + 1]
            transfer = torch.zeros_like(mask_index).scatter(1, order, chosen)
            x = torch.where(transfer, x0, x)
    return x


def one_step_generate(model: MaskPredictor, prompt: torch.Tensor, gen_length: int, **options) -> torch.Tensor:
    """Fill the whole answer in a single forward pass (the student's inference; the teacher's baseline)."""
    return generate(model, prompt, steps=1, gen_length=gen_length, block_length=gen_length, **options)


def mask_predictor(model) -> MaskPredictor:
    """Adapt a ``LLaDA`` (teacher) or a ``Student`` (at r = 0, t = 1) to the sampler's interface."""
    from pipeline.student import Student

    if isinstance(model, Student):
        return lambda ids, mask: model(input_ids=ids, r=0.0, t=1.0, attention_mask=mask)
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask)


# ---------------------------------------------------------------------- command line


class UsageError(Exception):
    """Bad command-line input; reported as one line on stderr."""


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"{path}: prompt file not found")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UsageError(f"{path}:{number}: expected an object with a string field 'prompt'")
        prompts.append(record["prompt"])
    if not prompts:
        raise UsageError(f"{path}: no prompts (the file is empty)")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.generate",
        description="Complete JSONL prompts with a LLaDA checkpoint (multi-step) or a student (one step).",
    )
    p.add_argument("--model", required=True, type=Path, help="LLaDA checkpoint or student directory")
    p.add_argument("--prompts", required=True, type=Path, help='input JSONL, lines {"prompt": "..."}')
    p.add_argument("--out", required=True, type=Path, help="output JSONL")
    p.add_argument("--steps", type=int, help="sampling steps (default: gen length; students: 1)")
    p.add_argument("--gen-length", type=int, help="answer tokens (default: the checkpoint's, else 128)")
    p.add_argument("--block-length", type=int, help="block size (default: gen length)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--cfg-scale", type=float, default=0.0)
    p.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto",
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on GPU, float32 on CPU")
    return p


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from pipeline.checkpoint_io import CheckpointError
    from pipeline.llada import LLaDA
    from pipeline.student import Student
    from pipeline.tokenizer import load_tokenizer, stop_token_ids, decode_answer, encode_prompts

    if args.samples < 1 or args.batch_size < 1:
        raise UsageError("--samples and --batch-size must be >= 1")
    prompts = read_prompts(args.prompts)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    try:
        if Student.is_student_dir(args.model):
            model = Student.from_pretrained(args.model, dtype=dtype, device=args.device)
            base_dir, default_steps = Student.base_path_of(args.model), 1
        elif (args.model / "config.json").is_file():
            model = LLaDA.from_pretrained(args.model, dtype=dtype, device=args.device)
            base_dir, default_steps = args.model, None
        else:
            raise UsageError(f"{args.model}: neither a LLaDA checkpoint (config.json) nor a student (student_config.json)")
        tokenizer = load_tokenizer(base_dir)
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    config = (model.base if isinstance(model, Student) else model).config
    hints = generation_hints(base_dir)
    gen_length = args.gen_length or hints.get("gen_length", 128)
    steps = args.steps or default_steps or gen_length
    if default_steps == 1 and steps != 1:
        raise UsageError(f"{args.model} is a one-step student; --steps must be 1, got {steps}")
    block_length = args.block_length or gen_length

    encoded = encode_prompts(tokenizer, prompts, chat={"auto": None, "on": True, "off": False}[args.chat_template])
    for number, ids in enumerate(encoded, start=1):
        if len(ids) + gen_length > config.max_sequence_length:
            raise UsageError(
                f"{args.prompts}: prompt {number} has {len(ids)} tokens; with --gen-length {gen_length} "
                f"that exceeds the model's max_sequence_length {config.max_sequence_length}"
            )
    predictor = mask_predictor(model)
    stops = stop_token_ids(tokenizer, config, base_dir)
    pad_id = config.pad_token_id if config.pad_token_id is not None else min(stops)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    jobs = [(i, ids) for i, ids in enumerate(encoded) for _ in range(args.samples)]
    completions: list[list[str]] = [[] for _ in prompts]
    started = time.perf_counter()
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="generate", unit="batch", file=sys.stderr):
        batch = jobs[start : start + args.batch_size]
        width = max(len(ids) for _, ids in batch)
        prompt = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, ids) in enumerate(batch):  # left padding
            if ids:
                prompt[row, width - len(ids):] = torch.tensor(ids)
                mask[row, width - len(ids):] = 1
        out = generate(
            predictor, prompt.to(args.device), mask.to(args.device), steps=steps, gen_length=gen_length,
            block_length=block_length, temperature=args.temperature, cfg_scale=args.cfg_scale,
            remasking=args.remasking, mask_id=config.mask_token_id, generator=generator,
        )
        for (index, _), answer in zip(batch, out[:, width:].tolist()):
            completions[index].append(decode_answer(tokenizer, answer, stops))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "w") as f:
        for prompt_text, texts in zip(prompts, completions):
            f.write(json.dumps({"prompt": prompt_text, "completions": texts}) + "\n")
    tmp.replace(args.out)
    elapsed = time.perf_counter() - started
    print(f"wrote {len(prompts)} prompts x {args.samples} samples to {args.out} in {elapsed:.1f}s "
          f"({steps} steps, gen length {gen_length})", file=sys.stderr)


def generation_hints(checkpoint: Path) -> dict:
    """Defaults a checkpoint may suggest in ``generation_config.json`` (e.g. our built-in teacher's
    ``gen_length``); real LLaDA checkpoints suggest none."""
    path = Path(checkpoint) / "generation_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("gen_length",) if isinstance(data.get(k), int)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
