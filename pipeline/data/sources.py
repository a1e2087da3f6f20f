"""External data as it ships: a Hugging Face hub dataset (with its config name and revision), a local
file or folder of parquet/json/jsonl/csv, or a ``save_to_disk`` folder, read into train/val/test
examples ``{"prompt", "answer"}``.

The dataset's own splits are used when it has several (``data.train_split``, ``data.test_split``, and
``data.val_split`` or a held-out fraction of the training prompts); a dataset of one split is divided
by prompt (``split_by_prompt``). A prompt is the row's ``data.prompt_field``, or ``data.prompt_template``
filled with the row's fields (``"Question: {question}"``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

from pipeline.core.errors import DataError
from pipeline.data.jsonl import read_jsonl

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
"""``datasets`` builders of local data files, by suffix."""


def split_by_prompt(examples: Iterable[dict], val_fraction: float, test_fraction: float, seed: int,
                    names: tuple[str, ...] = ("train", "val", "test")) -> dict[str, list[dict]]:
    """Divide examples into train/val/test by distinct prompt, so no held-out prompt is trained on
    (``names`` without ``test``: train and val only, ``test_fraction`` ignored)."""
    examples = list(examples)
    prompts = sorted({e["prompt"] for e in examples})
    random.Random(seed).shuffle(prompts)
    n_test = max(1, round(test_fraction * len(prompts))) if "test" in names else 0
    n_val = max(1, round(val_fraction * len(prompts)))
    if n_test + n_val >= len(prompts):
        raise DataError(f"{len(prompts)} distinct prompts are too few to hold out "
                        + ("val and test prompts" if n_test else "val prompts"))
    split_of = {p: "test" for p in prompts[:n_test]}
    split_of.update({p: "val" for p in prompts[n_test: n_test + n_val]})
    splits: dict[str, list[dict]] = {name: [] for name in names}
    for example in examples:
        splits[split_of.get(example["prompt"], "train")].append(example)
    return splits


def prompt_of(row: dict, params) -> str:
    """The prompt of a row: ``data.prompt_template`` filled with its fields, or its ``data.prompt_field``."""
    if params.prompt_template is None:
        return row[params.prompt_field]
    try:
        return params.prompt_template.format_map(row)
    except KeyError as err:
        raise DataError(f"data.prompt_template: field {err.args[0]!r} is not in the rows "
                        f"(fields: {', '.join(map(str, row))})") from err
    except (ValueError, IndexError) as err:
        raise DataError(f"data.prompt_template: {err} (fields are written {{name}}; a literal brace is {{{{)") from err


def examples_of(rows, params, where: str) -> list[dict]:
    """``{"prompt", "answer"}`` of every row (a ``datasets.Dataset`` or a list of mappings), the
    fields checked on the first row."""
    rows = list(rows) if not hasattr(rows, "column_names") else rows
    fields = list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0]) if len(rows) else []
    needed = [params.response_field] + ([params.prompt_field] if params.prompt_template is None else [])
    for key, field in zip(("response_field", "prompt_field"), needed):
        if field not in fields:
            raise DataError(f"data.{key}: {where} has no field {field!r} (fields: {', '.join(fields)})")
    return [{"prompt": str(prompt_of(row, params)), "answer": str(row[params.response_field])} for row in rows]


def load_dataset_dict(params) -> dict:
    """The source's splits as ``{name: rows}``: a ``save_to_disk`` folder, a local data file or folder
    (``datasets.load_dataset`` by suffix, or the folder's own layout and README configs), or a hub id
    (with ``data.hf_config`` and ``data.hf_revision``)."""
    import datasets

    source = Path(params.source)
    if source.is_dir() and ((source / "dataset_dict.json").is_file() or (source / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(source))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if source.is_file():
        builder = BUILDERS.get(source.suffix.lower())
        if builder is None:
            raise DataError(f"data.source: {source}: not a data file this stage reads "
                            f"({', '.join(BUILDERS)}, or a folder)")
        return dict(call_datasets(lambda: datasets.load_dataset(builder, data_files=str(source)), params))
    looks_local = source.is_absolute() or params.source.startswith(".") or source.suffix.lower() in BUILDERS
    if looks_local and not source.exists():
        raise DataError(f"data.source: {source}: no such file or folder")
    return dict(call_datasets(lambda: datasets.load_dataset(params.source, name=params.hf_config,
                                                            revision=params.hf_revision), params))


def call_datasets(load, params):
    """``load()`` with the errors ``datasets`` raises for a source, a config or a revision it cannot
    find turned into one line naming the key."""
    try:
        return load()
    except ValueError as err:
        message = str(err).splitlines()[0]
        key = "hf_config" if "config" in message.lower() else "source"
        raise DataError(f"data.{key}: {params.source}"
                        + (f" (config {params.hf_config!r})" if key == "hf_config" else "") + f": {message}") from err
    except (FileNotFoundError, ConnectionError, OSError) as err:
        what = f"revision {params.hf_revision!r} of " if params.hf_revision else ""
        raise DataError(f"data.source: cannot load {what}{params.source!r} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'not found'})") from err
    except Exception as err:  # datasets' own errors (DatasetNotFoundError, ...), no common base class
        if type(err).__module__.split(".")[0] not in ("datasets", "huggingface_hub", "fsspec"):
            raise
        raise DataError(f"data.source: cannot load {params.source!r} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no message'})") from err


def load_external(params) -> dict[str, list[dict]]:
    """train/val/test examples of an external source (see the module's docstring)."""
    if params.source.endswith(".jsonl") and Path(params.source).is_file():
        # Our own reader: errors name the line (datasets' JSON reader names none).
        fields = () if params.prompt_template is not None else (params.prompt_field,)
        rows = read_jsonl(Path(params.source), (*fields, params.response_field), DataError)
        splits = {"train": rows}
    else:
        splits = load_dataset_dict(params)
    if len(splits) == 1:
        (name, rows), = splits.items()
        examples = examples_of(rows, params, f"{params.source} ({name} split)")
        return split_by_prompt(examples, params.val_fraction, params.test_fraction, params.seed)
    for key in ("train_split", "test_split", "val_split"):
        name = getattr(params, key)
        if name is not None and name not in splits:
            raise DataError(f"data.{key}: {params.source} has no split {name!r} (splits: {', '.join(splits)})")
    chosen = {"train": examples_of(splits[params.train_split], params, f"{params.source} ({params.train_split} split)"),
              "test": examples_of(splits[params.test_split], params, f"{params.source} ({params.test_split} split)")}
    if params.val_split is not None:
        chosen["val"] = examples_of(splits[params.val_split], params, f"{params.source} ({params.val_split} split)")
    else:
        chosen.update(split_by_prompt(chosen["train"], params.val_fraction, 0.0, params.seed, ("train", "val")))
    return {name: chosen[name] for name in ("train", "val", "test")}
