"""Examples to token sequences: the ``prepare_data`` stage (built-in tasks or external data, split
by prompt, tokenized into the layout of ``pipeline.data.layout``)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.core.errors import DataError
from pipeline.data.jsonl import read_jsonl
from pipeline.data.layout import Layout
from pipeline.data.tokenizer import encode_prompts


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
