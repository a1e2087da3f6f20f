"""Examples to token sequences: the ``prepare_data`` stage (built-in tasks or external data, split
by prompt, tokenized into the layout of ``pipeline.data.layout``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from pipeline.core.errors import DataError
from pipeline.data.layout import Layout
from pipeline.data.sources import load_external
from pipeline.data.tokenizer import encode_prompts


def encode_examples(
    tokenizer,
    examples: Sequence[dict],
    layout: Layout,
    chat: bool | None = None,
    answer_suffix: str | None = None,
    source: str = "examples",
    too_long: str = "error",
    system: str | None = None,
) -> tuple[dict[str, list], int]:
    """Columns ``input_ids`` and ``attention_mask`` (each ``layout.length`` long) for examples with
    ``prompt`` and ``answer`` fields, other fields kept as columns; and the number of examples dropped
    for a prompt or answer too long for the layout (``too_long="drop"``; ``"error"`` refuses the first)."""
    prompt_ids = encode_prompts(tokenizer, [e["prompt"] for e in examples], chat=chat, system=system)
    suffix = []
    if answer_suffix is not None:
        suffix = [tokenizer.convert_tokens_to_ids(answer_suffix)]
        if suffix[0] is None or suffix[0] == tokenizer.unk_token_id:
            raise DataError(f"answer_suffix {answer_suffix!r} is not a token of the tokenizer")
    columns: dict[str, list] = {key: [] for key in examples[0]} if examples else {}
    columns.update(input_ids=[], attention_mask=[])
    dropped = 0
    for index, (example, prompt) in enumerate(zip(examples, prompt_ids)):
        answer = tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + suffix
        problem = (f"a {len(prompt)}-token prompt; prompt_length is {layout.prompt_length}"
                   if len(prompt) > layout.prompt_length else
                   f"a {len(answer)}-token answer; gen_length is {layout.gen_length}"
                   if len(answer) > layout.gen_length else None)
        if problem is not None:
            if too_long == "drop":
                dropped += 1
                continue
            raise DataError(f"{source}: example {index} has {problem} (data.too_long: drop skips such rows)")
        pad = layout.prompt_length - len(prompt)
        columns["input_ids"].append(
            [layout.pad_token_id] * pad + prompt + answer + [layout.pad_token_id] * (layout.gen_length - len(answer))
        )
        columns["attention_mask"].append([0] * pad + [1] * (layout.length - pad))
        for key, value in example.items():
            columns[key].append(value)
    return columns, dropped


def load_examples(params) -> dict[str, list[dict]]:
    """train/val/test examples (``prompt``, ``answer``, and ``task`` for the built-in suite)."""
    from pipeline.data.tasks import make_splits

    if params.source == "builtin":
        splits = make_splits(params.tasks, params.seed, params.train_per_task, params.val_per_task, params.test_per_task)
        return {name: [dataclasses.asdict(e) for e in examples] for name, examples in splits.items()}
    return load_external(params)


def prepare_data(params, tokenizer, out_dir: Path) -> dict[str, dict[str, int]]:
    """Write tokenized splits (``datasets`` on disk), prompt JSONL files, the tokenizer and the layout
    into ``out_dir`` atomically. Returns, per split, the rows written and the rows dropped as too long."""
    import datasets

    from pipeline.core.files import atomic_directory

    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        raise DataError("the tokenizer defines neither an EOS nor a pad token")
    if params.system_prompt is not None and (params.chat_template is False
                                             or not getattr(tokenizer, "chat_template", None)):
        raise DataError("data.system_prompt: needs the tokenizer's chat template (data.chat_template is off, or "
                        "the tokenizer has none)")
    layout = Layout(params.prompt_length, params.gen_length, pad)
    splits = load_examples(params)
    counts = {}
    with atomic_directory(out_dir) as tmp:
        (tmp / "prompts").mkdir()
        for name, examples in splits.items():
            where = f"{params.source} ({name} split)"
            columns, dropped = encode_examples(tokenizer, examples, layout, params.chat_template, params.answer_suffix,
                                               where, params.too_long, params.system_prompt)
            if not columns["input_ids"]:
                raise DataError(f"{where}: no rows left ({dropped} of {len(examples)} too long for prompt_length "
                                f"{layout.prompt_length} / gen_length {layout.gen_length})")
            features = datasets.Features(
                {
                    **{key: datasets.Value("string") for key in examples[0]},
                    "input_ids": datasets.Sequence(datasets.Value("int32"), length=layout.length),
                    "attention_mask": datasets.Sequence(datasets.Value("int8"), length=layout.length),
                }
            )
            datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp / name))
            with open(tmp / "prompts" / f"{name}.jsonl", "w") as f:
                for row in range(len(columns["input_ids"])):
                    f.write(json.dumps({key: columns[key][row] for key in examples[0]}) + "\n")
            counts[name] = {"rows": len(columns["input_ids"]), "dropped_too_long": dropped}
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        layout.save(tmp)
    return counts
