"""Examples to token sequences, and LLaDA's forward (masking) process.

Layout of every sequence (LLaDA's SFT data with a fixed-size prompt region)::

    [pad ... pad BOS prompt tokens][answer tokens (suffix) EOS EOS ... EOS]
     <----- prompt_length ------->  <------------- gen_length ----------->

The prompt region is left padded and its padding is excluded by ``attention_mask``; the answer
region is always attended, and its EOS padding is part of the target (the model learns where the
answer ends). Prompt tokens are never masked.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Iterable, Sequence

import torch

from pipeline.core.errors import DataError
from pipeline.data.tokenizer import encode_prompts

LAYOUT_FILE = "layout.json"


@dataclasses.dataclass(frozen=True)
class Layout:
    prompt_length: int
    gen_length: int
    pad_token_id: int
    """EOS, used for both prompt padding (masked out) and answer padding (a target)."""

    @property
    def length(self) -> int:
        return self.prompt_length + self.gen_length

    def save(self, directory: Path) -> None:
        (Path(directory) / LAYOUT_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "Layout":
        path = Path(directory) / LAYOUT_FILE
        if not path.is_file():
            raise DataError(f"{path}: not found (run the prepare_data stage)")
        return cls(**json.loads(path.read_text()))


def encode_examples(
    tokenizer,
    examples: Sequence[dict],
    layout: Layout,
    chat: bool | None = None,
    answer_suffix: str | None = None,
    source: str = "examples",
) -> dict[str, list]:
    """Columns ``input_ids`` and ``attention_mask`` (each ``layout.length`` long) for examples with
    ``prompt`` and ``answer`` fields; other fields are kept as columns."""
    prompt_ids = encode_prompts(tokenizer, [e["prompt"] for e in examples], chat=chat)
    suffix = []
    if answer_suffix is not None:
        suffix = [tokenizer.convert_tokens_to_ids(answer_suffix)]
        if suffix[0] is None or suffix[0] == tokenizer.unk_token_id:
            raise DataError(f"answer_suffix {answer_suffix!r} is not a token of the tokenizer")
    columns: dict[str, list] = {key: [] for key in examples[0]} if examples else {}
    columns.update(input_ids=[], attention_mask=[])
    for index, (example, prompt) in enumerate(zip(examples, prompt_ids)):
        answer = tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + suffix
        if len(prompt) > layout.prompt_length:
            raise DataError(
                f"{source}: example {index} has a {len(prompt)}-token prompt; prompt_length is {layout.prompt_length}"
            )
        if len(answer) > layout.gen_length:
            raise DataError(
                f"{source}: example {index} has a {len(answer)}-token answer; gen_length is {layout.gen_length}"
            )
        pad = layout.prompt_length - len(prompt)
        columns["input_ids"].append(
            [layout.pad_token_id] * pad + prompt + answer + [layout.pad_token_id] * (layout.gen_length - len(answer))
        )
        columns["attention_mask"].append([0] * pad + [1] * (layout.length - pad))
        for key, value in example.items():
            columns[key].append(value)
    return columns


def read_jsonl(path: Path, fields: tuple[str, ...], error: type[Exception] = ValueError, what: str = "data file",
               lists: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file, each required to hold string ``fields`` and non-empty lists of strings
    ``lists``; blank lines are skipped. Problems raise ``error`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{number}: not valid JSON ({err.msg})") from err
        for field in fields:
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise error(f"{path}:{number}: expected an object with a string field {field!r}")
        for field in lists:
            value = record.get(field)
            if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                raise error(f"{path}:{number}: {field!r} must be a non-empty list of strings, got {value!r}")
        records.append(record)
    if not records:
        raise error(f"{path}: no records (the file is empty)")
    return records


def read_jsonl_examples(path: Path, prompt_field: str, response_field: str) -> list[dict]:
    """``{"prompt", "answer"}`` examples from a JSONL file with the given field names."""
    records = read_jsonl(path, (prompt_field, response_field), DataError)
    return [{"prompt": r[prompt_field], "answer": r[response_field]} for r in records]


def read_hf_examples(name: str, split: str, prompt_field: str, response_field: str) -> list[dict]:
    """``{"prompt", "answer"}`` examples from a Hugging Face dataset (downloaded on first use)."""
    import datasets

    dataset = datasets.load_dataset(name, split=split)
    for field in (prompt_field, response_field):
        if field not in dataset.column_names:
            raise DataError(f"dataset {name}: no column {field!r} (columns: {dataset.column_names})")
    return [{"prompt": r[prompt_field], "answer": r[response_field]} for r in dataset]


def split_by_prompt(
    examples: Iterable[dict], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[dict]]:
    """Divide examples into train/val/test by distinct prompt, so no held-out prompt is trained on."""
    examples = list(examples)
    prompts = sorted({e["prompt"] for e in examples})
    random.Random(seed).shuffle(prompts)
    n_test = max(1, round(test_fraction * len(prompts)))
    n_val = max(1, round(val_fraction * len(prompts)))
    if n_test + n_val >= len(prompts):
        raise DataError(f"{len(prompts)} distinct prompts are too few to hold out val and test prompts")
    split_of = {p: "test" for p in prompts[:n_test]}
    split_of.update({p: "val" for p in prompts[n_test : n_test + n_val]})
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for example in examples:
        splits[split_of.get(example["prompt"], "train")].append(example)
    return splits


def split_fingerprint(split_dir: Path) -> str:
    """sha256 over the Arrow files of a split written by ``prepare_data`` (identifies its content)."""
    import hashlib

    from pipeline.core.files import file_sha256

    files = sorted(Path(split_dir).glob("*.arrow"))
    if not files:
        raise DataError(f"{split_dir}: no Arrow files (run the prepare_data stage)")
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- forward process


def sample_mask_ratio(
    batch: int, eps: float, generator: torch.Generator | None = None, device=None, stratified: bool = False
) -> torch.Tensor:
    """LLaDA's t ~ U(eps, 1] (B,). ``stratified`` draws one t from each of B equal slices of the
    interval (in random order): still uniform per sample, but a batch covers all noise levels, which
    lowers the variance of the 1/t-weighted loss."""
    u = torch.rand(batch, generator=generator, device=device)
    if stratified:
        slot = torch.randperm(batch, generator=generator, device=device)
        u = (slot + u) / batch
    return eps + (1.0 - eps) * (1.0 - u)  # 1 - u lies in (0, 1]


def forward_mask(
    x0: torch.Tensor,
    t: torch.Tensor,
    answer_start: int,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each answer token of ``x0`` (B, L) independently with probability ``t`` (B,); positions
    before ``answer_start`` (the prompt) are never masked. Returns (x_t, masked) (B, L)."""
    draws = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = draws < t[:, None]
    masked[:, :answer_start] = False
    return x0.masked_fill(masked, mask_id), masked


# ---------------------------------------------------------------------- the prepare_data stage


def load_examples(params) -> dict[str, list[dict]]:
    """train/val/test examples (``prompt``, ``answer``, and ``task`` for the built-in suite)."""
    from pipeline.data.tasks import make_splits

    if params.source == "builtin":
        splits = make_splits(params.tasks, params.seed, params.train_per_task, params.val_per_task, params.test_per_task)
        return {name: [dataclasses.asdict(e) for e in examples] for name, examples in splits.items()}
    if params.source.endswith(".jsonl"):
        examples = read_jsonl_examples(Path(params.source), params.prompt_field, params.response_field)
    else:
        examples = read_hf_examples(params.source, params.hf_split, params.prompt_field, params.response_field)
    return split_by_prompt(examples, params.val_fraction, params.test_fraction, params.seed)


def prepare_data(params, tokenizer, out_dir: Path) -> dict[str, int]:
    """Write tokenized splits (``datasets`` on disk), prompt JSONL files, the tokenizer and the layout
    into ``out_dir`` atomically. Returns rows per split."""
    import datasets

    from pipeline.core.files import atomic_directory

    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        raise DataError("the tokenizer defines neither an EOS nor a pad token")
    layout = Layout(params.prompt_length, params.gen_length, pad)
    splits = load_examples(params)
    sizes = {}
    with atomic_directory(out_dir) as tmp:
        (tmp / "prompts").mkdir()
        for name, examples in splits.items():
            columns = encode_examples(tokenizer, examples, layout, params.chat_template, params.answer_suffix,
                                      source=f"{params.source} ({name} split)")
            features = datasets.Features(
                {
                    **{key: datasets.Value("string") for key in examples[0]},
                    "input_ids": datasets.Sequence(datasets.Value("int32"), length=layout.length),
                    "attention_mask": datasets.Sequence(datasets.Value("int8"), length=layout.length),
                }
            )
            datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp / name))
            with open(tmp / "prompts" / f"{name}.jsonl", "w") as f:
                for example in examples:
                    f.write(json.dumps(example) + "\n")
            sizes[name] = len(examples)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        layout.save(tmp)
    return sizes
