"""External data as it ships (``pipeline.data.sources``): a dataset folder with named configs and its
own train/test splits (the shape of ``openai/gsm8k``), single data files of each format, a
``save_to_disk`` folder, prompt templates and system prompts, rows too long for the layout, and the
one-line errors for a config, a split or a template field the data lacks."""

import json

import datasets
import pytest

from pipeline.core.errors import DataError
from pipeline.data.params import DataParams
from pipeline.data.prepare import prepare_data
from pipeline.data.sources import load_external
from pipeline.data.tasks import ALPHABET
from pipeline.data.tokenizer import build_char_tokenizer


def gsm8k_row(i: int) -> dict:
    return {"question": f"add:{i}+{i}=", "answer": f"{i}+{i}\n#### {2 * i}"}


@pytest.fixture()
def gsm8k_folder(tmp_path):
    """A dataset folder as the hub serves openai/gsm8k: configs ``main`` and ``socratic`` declared
    in README.md, each with train and test files."""
    root = tmp_path / "gsm8k"
    for config, offset in (("main", 0), ("socratic", 1000)):
        (root / config).mkdir(parents=True)
        for split, numbers in (("train", range(40)), ("test", range(40, 52))):
            (root / config / f"{split}.jsonl").write_text(
                "".join(json.dumps(gsm8k_row(offset + i)) + "\n" for i in numbers))
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        f"  - split: test\n    path: {c}/test.jsonl\n" for c in ("main", "socratic")) + "---\n")
    return root


def params(source, **overrides) -> DataParams:
    return DataParams(source=str(source), **{"prompt_field": "question", "response_field": "answer",
                                             "val_fraction": 0.1, **overrides})


def test_official_splits_of_a_named_config(gsm8k_folder):
    splits = load_external(params(gsm8k_folder, hf_config="main"))
    assert [len(splits[name]) for name in ("train", "val", "test")] == [36, 4, 12]  # val: 10% of train
    assert splits["test"][0] == {"prompt": "add:40+40=", "answer": "40+40\n#### 80"}  # the test file, untouched
    assert not {e["prompt"] for e in splits["train"]} & {e["prompt"] for e in splits["val"]}
    socratic = load_external(params(gsm8k_folder, hf_config="socratic"))
    assert socratic["test"][0]["prompt"] == "add:1040+1040="
    with_val = load_external(params(gsm8k_folder, hf_config="main", train_split="train", test_split="test",
                                    val_split=None, prompt_template="Q {question} A"))
    assert with_val["test"][0]["prompt"] == "Q add:40+40= A"


@pytest.mark.parametrize("overrides,message", [
    ({"hf_config": "mian"}, r"data.hf_config: .*gsm8k \(config 'mian'\): .*mian"),
    ({"hf_config": "main", "test_split": "validation"},
     r"data.test_split: .*gsm8k has no split 'validation' \(splits: train, test\)"),
    ({"hf_config": "main", "prompt_template": "Question: {problem}"},
     r"data.prompt_template: field 'problem' is not in the rows \(fields: question, answer\)"),
    ({"hf_config": "main", "response_field": "solution"},
     r"data.response_field: .*\(train split\) has no field 'solution' \(fields: question, answer\)"),
])
def test_what_the_data_lacks_is_one_line_naming_the_key(gsm8k_folder, overrides, message):
    with pytest.raises(DataError, match=message) as raised:
        load_external(params(gsm8k_folder, **overrides))
    assert "\n" not in str(raised.value)


def test_an_unreachable_hub_dataset_is_one_line(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as on a machine without the hub
    with pytest.raises(DataError, match=r"data.source: cannot load 'openai/gsm8k' \(ConnectionError: "):
        load_external(params("openai/gsm8k", hf_config="main"))


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", ".jsonl"])
def test_single_files_of_each_format_are_split_by_prompt(tmp_path, suffix):
    rows = datasets.Dataset.from_list([gsm8k_row(i) for i in range(30)])
    path = tmp_path / f"data{suffix}"
    {".parquet": rows.to_parquet, ".csv": rows.to_csv, ".json": rows.to_json,
     ".jsonl": rows.to_json}[suffix](str(path))
    splits = load_external(params(path, test_fraction=0.1))
    assert [len(splits[name]) for name in ("train", "val", "test")] == [24, 3, 3]
    assert {e["answer"] for s in splits.values() for e in s} == {gsm8k_row(i)["answer"] for i in range(30)}


def test_a_saved_dataset_dict_keeps_its_splits(tmp_path):
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_list([gsm8k_row(i) for i in range(20)]),
                                  "test": datasets.Dataset.from_list([gsm8k_row(i) for i in range(20, 25)])})
    saved.save_to_disk(str(tmp_path / "saved"))
    splits = load_external(params(tmp_path / "saved"))
    assert len(splits["test"]) == 5 and len(splits["train"]) + len(splits["val"]) == 20
    with pytest.raises(DataError, match="data.source: .*missing.parquet: no such file or folder"):
        load_external(params(tmp_path / "missing.parquet"))


def test_too_long_rows_are_dropped_and_counted(gsm8k_folder, tmp_path):
    """Answers ``i+i\n#### 2i`` take 13 tokens up to i = 49 and 14 from i = 50 (test rows 50 and 51)."""
    tokenizer = build_char_tokenizer(ALPHABET + "#\n ")
    layout = {"hf_config": "main", "prompt_length": 12, "gen_length": 13}
    with pytest.raises(DataError, match=r"\(test split\): example 10 has a 14-token answer; gen_length is 13 "
                                        r"\(data.too_long: drop skips such rows\)"):
        prepare_data(params(gsm8k_folder, **layout), tokenizer, tmp_path / "data")
    counts = prepare_data(params(gsm8k_folder, too_long="drop", **layout), tokenizer, tmp_path / "data")
    assert counts == {"train": {"rows": 36, "dropped_too_long": 0}, "val": {"rows": 4, "dropped_too_long": 0},
                      "test": {"rows": 10, "dropped_too_long": 2}}
    test = datasets.load_from_disk(str(tmp_path / "data" / "test"))
    assert test["prompt"] == [f"add:{i}+{i}=" for i in range(40, 50)]
    assert len((tmp_path / "data" / "prompts" / "test.jsonl").read_text().splitlines()) == 10


def test_a_system_prompt_goes_through_the_chat_template(gsm8k_folder, tmp_path):
    tokenizer = build_char_tokenizer(ALPHABET + "#\n <>|")
    overrides = {"hf_config": "main", "prompt_length": 40, "gen_length": 14, "system_prompt": "be brief"}
    with pytest.raises(DataError, match="data.system_prompt: needs the tokenizer's chat template"):
        prepare_data(params(gsm8k_folder, **overrides), tokenizer, tmp_path / "data")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'][0] }}|{{ m['content'] }}>{% endfor %}"
                               "{% if add_generation_prompt %}|{% endif %}")
    prepare_data(params(gsm8k_folder, **overrides), tokenizer, tmp_path / "data")
    row = datasets.load_from_disk(str(tmp_path / "data" / "test"))[0]
    prompt = tokenizer.decode([t for t, m in zip(row["input_ids"][:40], row["attention_mask"]) if m])
    assert prompt == "<s|be brief><u|add:40+40=>|" and row["prompt"] == "add:40+40="
