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

from pipeline.llada import upcast

# A mask predictor maps (input_ids (B, T), attention_mask (B, T) or None) to logits (B, T, V).
MaskPredictor = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Remasking = Literal["low_confidence", "random"]


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None):
    """Gumbel-max in float64: the argmax of the result samples softmax(logits / T).

    The reference computes ``exp(logits) / (-log u) ** T``; this is its logarithm divided by T (same
    argmax), which cannot overflow when guidance makes logits large."""
    if temperature == 0:
        return logits
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return logits.to(torch.float64) / temperature - torch.log(-torch.log(noise))


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
    window: slice = slice(None),
) -> torch.Tensor:
    """Logits of ``model`` on ``x`` at positions ``window``; with ``cfg_scale > 0`` unsupervised CFG
    against the same input with the prompt positions replaced by ``mask_id``."""
    if cfg_scale <= 0:
        return model(x, attention_mask)[:, window]
    unconditional = x.masked_fill(prompt_index, mask_id)
    both = torch.cat((x, unconditional), dim=0)
    mask = None if attention_mask is None else torch.cat((attention_mask, attention_mask), dim=0)
    cond, un = model(both, mask)[:, window].chunk(2, dim=0)
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

    Two deliberate departures from the reference: the mask token is never predicted (the reference
    can "commit" [MASK], which leaves the position masked, spends that step's budget and is revisited
    in later blocks; a trained LLaDA does not do this, a random one does), and noise (Gumbel, ``random`` remasking) is drawn only
    for the current block, never for the whole (B, T, V) logits (10 GB in float64 for LLaDA-8B at
    B = 32): with temperature > 0 the draws differ from the reference's, not their distribution.
    Otherwise the output equals the reference's exactly (tested).
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
    rank = torch.arange(block_length, device=x.device)[None, :]  # (1, block)

    for block in range(num_blocks):
        window = slice(Lp + block * block_length, Lp + (block + 1) * block_length)
        schedule = num_transfer_tokens(x[:, window] == mask_id, steps_per_block)  # (B, steps)
        for i in range(steps_per_block):
            current = x[:, window]  # (B, block)
            mask_index = current == mask_id
            logits = guided_logits(model, x, attention_mask, prompt_index, cfg_scale, mask_id, window)
            logits[..., mask_id] = -torch.inf  # committing [MASK] would be a wasted no-op
            x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)  # (B, block)
            if remasking == "low_confidence":
                # fp32 at least: bf16 probabilities tie often and would make the ranking arbitrary.
                p = F.softmax(upcast(logits), dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape, generator=generator, device=x.device)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            # Commit the schedule[:, i] most confident masked positions of each row.
            order = confidence.argsort(dim=-1, descending=True, stable=True)
            transfer = torch.zeros_like(mask_index).scatter(1, order, rank < schedule[:, i : i + 1])
            x[:, window] = torch.where(transfer, x0, current)
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
    from pipeline.data import read_jsonl

    return [record["prompt"] for record in read_jsonl(path, ("prompt",), UsageError, "prompt file")]


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


def check_sampling_options(args: argparse.Namespace, gen_length: int, steps: int, block_length: int) -> None:
    """Refuse bad sampling options before any weights are loaded (minutes for LLaDA-8B)."""
    for flag, value in (("--gen-length", gen_length), ("--steps", steps), ("--block-length", block_length),
                        ("--samples", args.samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.temperature < 0 or args.cfg_scale < 0:
        raise UsageError("--temperature and --cfg-scale must be >= 0")
    if gen_length % block_length:
        raise UsageError(f"--gen-length {gen_length} is not a multiple of --block-length {block_length}")
    if steps % (gen_length // block_length):
        raise UsageError(f"--steps {steps} is not a multiple of the number of blocks {gen_length // block_length}")


def load_model(path: Path, dtype: torch.dtype, device: str):
    """(model, base checkpoint directory) for a student directory, a LLaDA directory or a Hugging
    Face id."""
    from pipeline.checkpoint_io import resolve_checkpoint
    from pipeline.llada import LLaDA
    from pipeline.student import Student

    if Student.is_student_dir(path):
        return Student.from_pretrained(path, dtype=dtype, device=device), Student.base_path_of(path)
    path = resolve_checkpoint(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: neither a LLaDA checkpoint (config.json) nor a student (student_config.json)")
    return LLaDA.from_pretrained(path, dtype=dtype, device=device), path


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) (B, W) with each row right-aligned."""
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, tokens in enumerate(batch):
        if tokens:
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
    return ids, mask


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from pipeline.errors import CheckpointError
    from pipeline.student import Student
    from pipeline.tokenizer import decode_answer, encode_prompts, load_tokenizer, stop_token_ids

    hf_logging.set_verbosity_error()
    prompts = read_prompts(args.prompts)
    is_student = Student.is_student_dir(args.model)
    try:
        hints = generation_hints(Student.base_path_of(args.model) if is_student else args.model)
        gen_length = args.gen_length if args.gen_length is not None else hints.get("gen_length", 128)
        steps = args.steps if args.steps is not None else (1 if is_student else gen_length)
        block_length = args.block_length if args.block_length is not None else gen_length
        check_sampling_options(args, gen_length, steps, block_length)
        if is_student and steps != 1:
            raise UsageError(f"{args.model} is a one-step student; --steps must be 1, got {steps}")
        dtype = getattr(torch, args.dtype) if args.dtype else (
            torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
        model, base_dir = load_model(args.model, dtype, args.device)
        tokenizer = load_tokenizer(base_dir)
        config = (model.base if is_student else model).config
        stops = stop_token_ids(tokenizer, config, base_dir)
        encoded = encode_prompts(tokenizer, prompts, chat={"auto": None, "on": True, "off": False}[args.chat_template])
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    for number, ids in enumerate(encoded, start=1):
        if len(ids) + gen_length > config.max_sequence_length:
            raise UsageError(
                f"{args.prompts}: prompt {number} has {len(ids)} tokens; with --gen-length {gen_length} "
                f"that exceeds the model's max_sequence_length {config.max_sequence_length}"
            )
    predictor = mask_predictor(model)
    pad_id = config.pad_token_id if config.pad_token_id is not None else min(stops)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    # Similar lengths share a batch (less padding); results go back to input order.
    jobs = sorted(((i, ids) for i, ids in enumerate(encoded) for _ in range(args.samples)), key=lambda j: len(j[1]))
    completions: list[list[str]] = [[] for _ in prompts]
    started = time.perf_counter()
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="generate", unit="batch", file=sys.stderr):
        batch = jobs[start : start + args.batch_size]
        prompt, mask = left_pad([ids for _, ids in batch], pad_id)
        out = generate(
            predictor, prompt.to(args.device), mask.to(args.device), steps=steps, gen_length=gen_length,
            block_length=block_length, temperature=args.temperature, cfg_scale=args.cfg_scale,
            remasking=args.remasking, mask_id=config.mask_token_id, generator=generator,
        )
        for (index, _), answer in zip(batch, out[:, prompt.shape[1]:].tolist()):
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
    from pipeline.checkpoint_io import read_json

    path = Path(checkpoint) / "generation_config.json"
    if not path.is_file():
        return {}
    data = read_json(path)
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
