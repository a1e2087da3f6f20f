"""``python -m pipeline.generate_cli``: complete JSONL prompts with a LLaDA checkpoint (multi-step) or
a student (one step by default, any ``--steps``), with the options of LLaDA's sampler
(``pipeline.generation.sampler``), its two EOS options included.

Input lines are JSON objects holding the prompt in ``--prompt-field`` (``prompt``); each output line
is its input line plus ``completions`` (each the answer up to the first EOS), in input order. A
student is called with each step's interval u(x_t, r, t). A student with a latent decodes
completion d of prompt i given its own z ~ N(0, I) drawn from ``--seed`` (so ``--samples 4`` gives
four latents), greedily or at ``--temperature``; greedy decoding of one completion uses its greedy
anchor, when it has one.

The output grows chunk by chunk (appended and flushed), so a failure keeps what was done, and a rerun
with the same ``--out`` carries on after the prompts it already holds (``--overwrite`` starts afresh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from pipeline.core.cpu_numerics import pin_cpu_numerics
from pipeline.core.errors import CheckpointError, OutputError
from pipeline.core.files import output_error, storage_errno
from pipeline.core.params import SEED_LIMIT
from pipeline.data.jsonl import numbered_records
from pipeline.data.tokenizer import (decode_answer, encode_prompts, eos_and_eot_ids, load_tokenizer, stop_token_ids,
                                     unknown_characters)
from pipeline.generation.decode import check_answer_length, completion_network, decoding_defaults, left_pad, uses_anchor
from pipeline.generation.sampler import SamplerOptionError, SamplerOptions, generate
from pipeline.models.checkpoint_io import resolve_checkpoint
from pipeline.models.registry import load_model, model_class
from pipeline.student.model import Student

CHUNK_BATCHES = 16
"""Batches decoded between two appends to the output."""
STDIO = "-"
"""``--prompts -`` reads standard input, ``--out -`` writes standard output."""


class UsageError(Exception):
    """Bad command-line input; reported as one line on stderr."""


@dataclass(frozen=True)
class PromptLine:
    """One input record: its line number in the input, the record, and its prompt."""

    number: int
    record: dict
    prompt: str


def read_prompts(source: Path, field: str) -> tuple[str, list[PromptLine]]:
    """(the input's name for messages, its records) from a JSONL file or, for ``-``, standard input.
    Each non-blank line must be an object with a string ``field``; problems name the line."""
    if str(source) == STDIO:
        name, data = "<stdin>", sys.stdin.buffer.read()
    elif not source.is_file():
        raise UsageError(f"{source}: prompt file not found")
    else:
        name, data = str(source), source.read_bytes()
    hint = " (--prompt-field)" if field != "prompt" else ""
    lines = [PromptLine(number, record, record[field])
             for number, record in numbered_records(data, name, (field,), UsageError, hint=hint)]
    if not lines:
        raise UsageError(f"{name}: no records (the prompt file is empty)")
    return name, lines


def output_record(line: PromptLine, completions: list[str]) -> dict:
    """The output line of ``line``: its fields (a reference answer, a task, ...) and ``completions``;
    ``prompt`` too when it has none (another ``--prompt-field``), as ``score_cli`` reads it."""
    record = dict(line.record)
    record.setdefault("prompt", line.prompt)
    record["completions"] = completions
    return record


def check_output_path(path: Path, prompts: Path) -> None:
    """Refuse an ``--out`` that cannot be written before any generating (minutes on a large model)."""
    if path.is_dir():
        raise UsageError(f"--out {path}: is a directory; give a file path")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {path}: cannot create it ({parent} is not a writable directory)")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"--out {path}: the file is not writable")
    if str(prompts) != STDIO and path.exists() and path.resolve() == prompts.resolve():
        raise UsageError(f"--out {path}: is the --prompts file; give another path")


def resume_point(path: Path, lines: list[PromptLine], name: str, field: str, samples: int) -> tuple[int, int]:
    """(prompts ``path`` already holds, bytes of its complete lines). Output line k belongs to input
    record k, and holds its prompt and ``samples`` completions; anything else is another run's file
    and is refused. A last line without its newline is one a crash cut short: it is dropped and redone."""
    if not path.exists():
        return 0, 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    done = data[:keep].split(b"\n")[:-1]
    redo = "pass --overwrite to replace it, or choose another --out"
    if len(done) > len(lines):
        raise UsageError(f"--out {path}: holds {len(done)} lines for the {len(lines)} prompts of {name}; {redo}")
    for k, (raw, line) in enumerate(zip(done, lines), start=1):
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        completions = record.get("completions") if isinstance(record, dict) else None
        if not (isinstance(completions, list) and all(isinstance(c, str) for c in completions)):
            raise UsageError(f"--out {path}:{k}: not an output line of this command (no completions); {redo}")
        if record.get(field) != line.prompt:
            raise UsageError(f"--out {path}:{k}: holds another prompt than {name}:{line.number}; {redo}")
        if len(completions) != samples:
            raise UsageError(f"--out {path}:{k}: holds {len(completions)} completions, not --samples {samples}; "
                             f"{redo}")
    return len(done), keep


@contextmanager
def output_errors(path: Path | None) -> Iterator[None]:
    """A storage failure (a full disk, a quota, ...) on ``--out`` (None: stdout) as one line saying
    what it left: the chunks appended before, or nothing."""
    try:
        yield
    except Exception as err:
        code = storage_errno(err)
        if code is None:
            raise
        if path is None:
            raise OutputError(f"<stdout>: cannot write ({os.strerror(code)})") from err
        if not (path.is_file() and path.stat().st_size):
            raise output_error(path, code) from err
        raise OutputError(f"{path}: cannot write ({os.strerror(code)}); the prompts completed before stay there: "
                          "free space or choose a writable path, then rerun to carry on") from err


@contextmanager
def appending(path: Path, keep: int) -> Iterator[Callable[[str], None]]:
    """A function appending text to ``path``, after its first ``keep`` bytes (the rest, a line cut
    short or an output to replace, is cut off). Each call's text reaches the file at once (unbuffered)
    or, on a failure, not at all: the file is cut back to its last complete call, and a file this
    created that is still empty is removed."""
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "r+b" if keep else "wb", buffering=0) as file:
        file.truncate(keep)
        end = file.seek(keep)

        def append(text: str) -> None:
            nonlocal end
            view = memoryview(text.encode())
            try:
                while view:
                    view = view[file.write(view):]
            except BaseException:
                with contextlib.suppress(OSError):  # a failing disk may refuse this too; the first error is the one
                    file.truncate(end)
                raise
            end = file.tell()

        try:
            yield append
        except BaseException:
            if created and end == 0:
                file.close()
                path.unlink(missing_ok=True)
            raise


@contextmanager
def printing(stream) -> Iterator[Callable[[str], None]]:
    """A function writing text to ``stream`` (standard output) and flushing it."""
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    yield write


def check_known_characters(tokenizer, lines: list[PromptLine], name: str, system: str | None) -> None:
    """Refuse prompts (and a system prompt) with characters the tokenizer would silently turn into its
    unknown token."""
    texts = [(f"{name}:{line.number}", line.prompt) for line in lines]
    for where, text in ([("--system-prompt", system)] if system is not None else []) + texts:
        unknown = unknown_characters(tokenizer, text)
        if unknown:
            raise UsageError(f"{where}: the tokenizer has no token for {', '.join(map(repr, unknown))} "
                             "(it would become the unknown token)")


def encode(tokenizer, prompts: list[str], chat: bool | None, system: str | None) -> list[list[int]]:
    """Token ids of each prompt (``encode_prompts``), with ``system`` as a system message before the
    user's in the chat template."""
    if system is not None and not getattr(tokenizer, "chat_template", None):
        raise UsageError("--system-prompt: the tokenizer has no chat template to put a system message in")
    try:
        return encode_prompts(tokenizer, prompts, chat=chat, system=system)
    except CheckpointError:
        raise
    except Exception as err:  # jinja's TemplateError: a template without a system role
        if system is None:
            raise
        raise UsageError(f"--system-prompt: the chat template refuses a system message ({err})") from err


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.generate_cli",
        description="Complete JSONL prompts with a LLaDA checkpoint (multi-step) or a student (one step by default).",
    )
    p.add_argument("--model", required=True, type=Path, help="LLaDA checkpoint or student directory")
    p.add_argument("--base", type=Path, help="a student's base checkpoint (directory or hub id), when not where "
                   "the student records it")
    p.add_argument("--prompts", required=True, type=Path, help='input JSONL, lines {"prompt": "..."}; - for stdin')
    p.add_argument("--prompt-field", default="prompt", help="the input field holding the prompt (default: prompt)")
    p.add_argument("--out", required=True, type=Path,
                   help="output JSONL, appended chunk by chunk; a rerun carries on after its lines; - for stdout")
    p.add_argument("--overwrite", action="store_true", help="replace --out instead of carrying on after its lines")
    p.add_argument("--steps", type=int, help="sampling steps (default: gen length; students: 1)")
    p.add_argument("--gen-length", type=int,
                   help="answer tokens (default: what a student was trained for, or the checkpoint's, else 128)")
    p.add_argument("--block-length", type=int,
                   help="block size (default: what a student was trained for at several steps, else gen length)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--cfg-scale", type=float, default=0.0)
    p.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence")
    p.add_argument("--logits-eos-inf", action="store_true", help="never generate EOS (LLaDA's logits_eos_inf)")
    p.add_argument("--confidence-eos-eot-inf", action="store_true",
                   help="commit EOS and <|eot_id|> predictions last (LLaDA's confidence_eos_eot_inf)")
    p.add_argument("--mask-id", type=int, help="the mask token id (default: the config's mask_token_id)")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto",
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--system-prompt", help="a system message before each prompt (needs the chat template)")
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
                              temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking,
                              logits_eos_inf=args.logits_eos_inf, confidence_eos_eot_inf=args.confidence_eos_eot_inf)
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


def base_checkpoint(path: Path, base: Path | None = None) -> Path:
    """The LLaDA checkpoint directory behind ``--model``: a student's base (``--base`` when given),
    a LLaDA directory, or a Hugging Face id downloaded (config, tokenizer and weights)."""
    if Student.is_student_dir(path):
        return resolve_checkpoint(base) if base is not None else Student.base_path_of(path)
    path = resolve_checkpoint(path)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: neither a LLaDA checkpoint (config.json) nor a student (student_config.json)")
    return path


def load_config(checkpoint: Path):
    """A checkpoint's config (its ``config.json`` only: the weights load later)."""
    return model_class(checkpoint).config_class.from_file(checkpoint / "config.json")


def mask_token_id(override: int | None, config, tokenizer) -> int:
    """``--mask-id`` when given (checked as the teacher stage checks its ``mask_token_id``), else the config's."""
    if override is None:
        return config.mask_token_id
    if not 0 <= override < config.embedding_size:
        raise UsageError(f"--mask-id {override}: outside the model's embedding (size {config.embedding_size})")
    if override in {tokenizer.eos_token_id, tokenizer.bos_token_id, config.eos_token_id} - {None}:
        raise UsageError(f"--mask-id {override}: is the EOS or BOS token")
    return override


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    to_stdout = str(args.out) == STDIO
    name, lines = read_prompts(args.prompts, args.prompt_field)
    if not to_stdout:
        check_output_path(args.out, args.prompts)
    if args.system_prompt is not None and args.chat_template == "off":
        raise UsageError("--system-prompt: goes into the chat template, which --chat-template off turns off")
    done, keep = (0, 0) if to_stdout or args.overwrite else resume_point(args.out, lines, name, args.prompt_field,
                                                                         args.samples)
    is_student = Student.is_student_dir(args.model)
    if args.base is not None and not is_student:
        raise UsageError(f"--base: only a student has a base; {args.model} is not a student directory")
    try:
        # Defaults: the layout a student was trained for, else the checkpoint's hint, else 128 tokens.
        trained = Student.trained_for_of(args.model) if is_student else {}
        gen_length, steps, block_length = decoding_defaults(base_checkpoint(args.model, args.base), trained, is_student,
                                                            args.gen_length, args.steps, args.block_length)
        options = sampler_options(args, gen_length, steps, block_length)
        dtype = getattr(torch, args.dtype) if args.dtype else (
            torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
        # Everything but the weights first: a bad prompt or option is refused in seconds, not after minutes.
        base_dir = base_checkpoint(args.model, args.base)
        config = load_config(base_dir)
        tokenizer = load_tokenizer(base_dir)
        mask_id = mask_token_id(args.mask_id, config, tokenizer)
        stops = stop_token_ids(tokenizer, config, base_dir)
        eos_id, eot_id = eos_and_eot_ids(tokenizer, config, base_dir)
        encoded = encode(tokenizer, [line.prompt for line in lines],
                         {"auto": None, "on": True, "off": False}[args.chat_template], args.system_prompt)
        check_known_characters(tokenizer, lines, name, args.system_prompt)
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    for line, ids in zip(lines, encoded):
        if len(ids) + gen_length > config.max_sequence_length:
            raise UsageError(f"{name}:{line.number}: the prompt has {len(ids)} tokens; with --gen-length {gen_length} "
                             f"that exceeds the model's max_sequence_length {config.max_sequence_length}")
    if done == len(lines):
        print(f"{args.out} already holds all {done} prompts; nothing to do (--overwrite redoes them)", file=sys.stderr)
        return
    if done:
        print(f"{args.out} holds the first {done} of {len(lines)} prompts; carrying on after them", file=sys.stderr)
    try:
        model = Student.from_pretrained(args.model, base=base_dir, dtype=dtype, device=args.device) if is_student \
            else load_model(base_dir, dtype=dtype, device=args.device)
        check_answer_length(model, gen_length, block_length)
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    anchor = uses_anchor(model, args.temperature, args.samples)
    pad_id = config.pad_token_id if config.pad_token_id is not None else min(stops)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    # Prompts go in chunks of input order (about CHUNK_BATCHES batches each); within a chunk similar
    # lengths share a batch (less padding). Each chunk's lines are appended to --out as soon as it is
    # done: memory stays bounded, the file shows progress, and a failure keeps the finished chunks.
    per_chunk = max(1, CHUNK_BATCHES * args.batch_size // args.samples)
    chunks = [range(first, min(first + per_chunk, len(lines))) for first in range(done, len(lines), per_chunk)]
    batches = sum(-(-len(chunk) * args.samples // args.batch_size) for chunk in chunks)
    started = time.perf_counter()
    records_out = sys.stdout
    output = printing(records_out) if to_stdout else appending(args.out, keep)
    # Anything printed to stdout by the libraries goes to stderr: with --out -, stdout holds the records only.
    with contextlib.redirect_stdout(sys.stderr), output_errors(None if to_stdout else args.out), output as write, \
            tqdm(total=batches, desc="generate", unit="batch", file=sys.stderr) as bar:
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
                out_ids = generate(predictor, prompt.to(args.device), options, mask_id=mask_id, eos_id=eos_id,
                                   eot_id=eot_id, attention_mask=mask.to(args.device), generator=generator)
                for (index, _, _), answer in zip(batch, out_ids[:, prompt.shape[1]:].tolist()):
                    completions[index].append(decode_answer(tokenizer, answer, stops))
                bar.update(1)
            write("".join(json.dumps(output_record(lines[i], completions[i])) + "\n" for i in chunk))
    elapsed = time.perf_counter() - started
    print(f"wrote {len(lines) - done} prompts x {args.samples} samples to {'<stdout>' if to_stdout else args.out} "
          f"in {elapsed:.1f}s ({steps} steps, gen length {gen_length})", file=sys.stderr)


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
