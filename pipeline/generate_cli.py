"""``python -m pipeline.generate_cli``: complete JSONL prompts with a LLaDA checkpoint (multi-step) or
a student (one step by default, any ``--steps``), with the options of LLaDA's sampler
(``pipeline.generation.sampler``).

Input lines are ``{"prompt": "..."}``; output lines ``{"prompt": "...", "completions": [...]}`` in
input order, each completion the answer up to the first EOS. A student is called with each step's
interval u(x_t, r, t). A student with a latent decodes completion d of prompt i given its own
z ~ N(0, I) drawn from ``--seed`` (so ``--samples 4`` gives four latents), greedily or at
``--temperature``; greedy decoding of one completion uses its greedy anchor, when it has one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from pipeline.core.cpu_numerics import pin_cpu_numerics
from pipeline.core.errors import CheckpointError, OutputError
from pipeline.core.files import writing
from pipeline.core.params import SEED_LIMIT
from pipeline.data.jsonl import read_jsonl
from pipeline.data.tokenizer import decode_answer, encode_prompts, load_tokenizer, stop_token_ids, unknown_characters
from pipeline.generation.decode import check_answer_length, completion_network, uses_anchor
from pipeline.generation.sampler import SamplerOptionError, SamplerOptions, generate
from pipeline.models.checkpoint_io import read_json, resolve_checkpoint
from pipeline.models.registry import load_model
from pipeline.student.model import Student

CHUNK_BATCHES = 16
"""Batches decoded between two appends to the output."""


class UsageError(Exception):
    """Bad command-line input; reported as one line on stderr."""


def read_prompts(path: Path) -> list[str]:
    return [record["prompt"] for record in read_jsonl(path, ("prompt",), UsageError, "prompt file")]


def check_output_path(path: Path) -> None:
    """Refuse an ``--out`` that cannot be written before any generating (minutes on a large model)."""
    if path.is_dir():
        raise UsageError(f"--out {path}: is a directory; give a file path")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {path}: cannot create it ({parent} is not a writable directory)")


def check_known_characters(tokenizer, prompts: list[str], path: Path) -> None:
    """Refuse prompts with characters the tokenizer would silently turn into its unknown token."""
    lines = [n for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    for line, prompt in zip(lines, prompts):
        unknown = unknown_characters(tokenizer, prompt)
        if unknown:
            raise UsageError(f"{path}:{line}: the tokenizer has no token for {', '.join(map(repr, unknown))} "
                             "(it would become the unknown token)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.generate_cli",
        description="Complete JSONL prompts with a LLaDA checkpoint (multi-step) or a student (one step by default).",
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


def sampler_options(args: argparse.Namespace, gen_length: int, steps: int, block_length: int) -> SamplerOptions:
    """The sampler's options (and the seed and device), refused before any weights are loaded
    (minutes for LLaDA-8B)."""
    for flag, value in (("--samples", args.samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    check_device(args.device)
    try:
        return SamplerOptions(gen_length=gen_length, steps=steps, block_length=block_length,
                              temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking)
    except SamplerOptionError as err:
        raise UsageError(f"--{err.key.replace('_', '-')}: {err.message}") from err


def check_device(name: str) -> None:
    """Refuse a ``--device`` torch cannot parse, or an accelerator this machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name}: not a device torch knows ({err})") from err
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if device.type != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        raise UsageError(f"--device {name}: no {device.type} device is available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def load_student_or_llada(path: Path, dtype: torch.dtype, device: str):
    """(model, base checkpoint directory) for a student directory, a LLaDA directory or a Hugging
    Face id."""
    if Student.is_student_dir(path):
        return Student.from_pretrained(path, dtype=dtype, device=device), Student.base_path_of(path)
    path = resolve_checkpoint(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: neither a LLaDA checkpoint (config.json) nor a student (student_config.json)")
    return load_model(path, dtype=dtype, device=device), path


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

    hf_logging.set_verbosity_error()
    prompts = read_prompts(args.prompts)
    check_output_path(args.out)
    is_student = Student.is_student_dir(args.model)
    try:
        hints = generation_hints(Student.base_path_of(args.model) if is_student else args.model)
        gen_length = args.gen_length if args.gen_length is not None else hints.get("gen_length", 128)
        steps = args.steps if args.steps is not None else (1 if is_student else gen_length)
        block_length = args.block_length if args.block_length is not None else gen_length
        options = sampler_options(args, gen_length, steps, block_length)
        dtype = getattr(torch, args.dtype) if args.dtype else (
            torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
        model, base_dir = load_student_or_llada(args.model, dtype, args.device)
        check_answer_length(model, gen_length)
        tokenizer = load_tokenizer(base_dir)
        config = (model.base if is_student else model).config
        stops = stop_token_ids(tokenizer, config, base_dir)
        check_known_characters(tokenizer, prompts, args.prompts)
        encoded = encode_prompts(tokenizer, prompts, chat={"auto": None, "on": True, "off": False}[args.chat_template])
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    for number, ids in enumerate(encoded, start=1):
        if len(ids) + gen_length > config.max_sequence_length:
            raise UsageError(
                f"{args.prompts}: prompt {number} has {len(ids)} tokens; with --gen-length {gen_length} "
                f"that exceeds the model's max_sequence_length {config.max_sequence_length}"
            )
    anchor = uses_anchor(model, args.temperature, args.samples)
    pad_id = config.pad_token_id if config.pad_token_id is not None else min(stops)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    # Prompts go in chunks of input order (about CHUNK_BATCHES batches each); within a chunk similar
    # lengths share a batch (less padding). Each chunk's records are appended to a temporary sibling
    # of --out as soon as it is done, which is renamed to --out at the end: memory stays bounded, the
    # temporary shows progress, and --out is never seen half written.
    per_chunk = max(1, CHUNK_BATCHES * args.batch_size // args.samples)
    chunks = [range(first, min(first + per_chunk, len(prompts))) for first in range(0, len(prompts), per_chunk)]
    batches = sum(-(-len(chunk) * args.samples // args.batch_size) for chunk in chunks)
    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        with writing(args.out), partial.open("w") as out, tqdm(total=batches, desc="generate", unit="batch",
                                                               file=sys.stderr) as bar:
            for chunk in chunks:
                jobs = sorted(((i, draw, encoded[i]) for i in chunk for draw in range(args.samples)),
                              key=lambda j: len(j[2]))
                completions: dict[int, list[str]] = {i: [] for i in chunk}
                for start in range(0, len(jobs), args.batch_size):
                    batch = jobs[start : start + args.batch_size]
                    prompt, mask = left_pad([ids for _, _, ids in batch], pad_id)
                    # Completion d of prompt i decodes given its own z, a function of (--seed, i, d), or the anchor.
                    index, draws = (torch.tensor([job[n] for job in batch]) for n in (0, 1))
                    predictor = completion_network(model, args.seed, index, draws, anchor)
                    out_ids = generate(predictor, prompt.to(args.device), options, mask_id=config.mask_token_id,
                                       attention_mask=mask.to(args.device), generator=generator)
                    for (index, _, _), answer in zip(batch, out_ids[:, prompt.shape[1]:].tolist()):
                        completions[index].append(decode_answer(tokenizer, answer, stops))
                    bar.update(1)
                out.writelines(json.dumps({"prompt": prompts[i], "completions": completions[i]}) + "\n" for i in chunk)
                out.flush()
        os.replace(partial, args.out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    elapsed = time.perf_counter() - started
    print(f"wrote {len(prompts)} prompts x {args.samples} samples to {args.out} in {elapsed:.1f}s "
          f"({steps} steps, gen length {gen_length})", file=sys.stderr)


def generation_hints(checkpoint: Path) -> dict:
    """Defaults a checkpoint may suggest in ``generation_config.json`` (e.g. our built-in teacher's
    ``gen_length``); real LLaDA checkpoints suggest none."""
    path = Path(checkpoint) / "generation_config.json"
    if not path.is_file():
        return {}
    data = read_json(path)
    return {k: data[k] for k in ("gen_length",) if isinstance(data.get(k), int)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pin_cpu_numerics()  # the same arithmetic as the stages whose outputs this is compared with
    try:
        run(args)
    except (UsageError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
