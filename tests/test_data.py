"""Tokenizer, sequence layout, external JSONL data, and LLaDA's forward masking."""

import json

import datasets
import pytest
import torch

from pipeline.data.layout import Layout, forward_mask, sample_mask_ratio
from pipeline.data.params import DataParams
from pipeline.data.prepare import DataError, encode_examples, prepare_data
from pipeline.data.sources import load_external, split_by_prompt
from pipeline.data.tasks import ALPHABET
from pipeline.data.tokenizer import BOS, EOS, MASK, build_char_tokenizer, decode_answer, load_tokenizer

LAYOUT = Layout(prompt_length=8, gen_length=5, pad_token_id=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(ALPHABET)


def test_char_tokenizer_round_trip_through_transformers(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    assert [loaded.convert_tokens_to_ids(t) for t in (EOS, BOS, MASK)] == [0, 1, 2]
    assert (loaded.eos_token_id, loaded.mask_token_id, loaded.pad_token_id) == (0, 2, 0)
    ids = loaded("add:12+7=")["input_ids"]
    assert ids[0] == 1 and len(ids) == 10  # BOS + one id per character
    assert loaded.decode(ids, skip_special_tokens=True) == "add:12+7="
    assert decode_answer(loaded, loaded("ab", add_special_tokens=False)["input_ids"] + [0, 5, 0], {0}) == "ab"
    assert len(loaded) == 4 + len(set(ALPHABET))


def test_layout_pads_left_and_right(tokenizer):
    layout = Layout(prompt_length=12, gen_length=6, pad_token_id=0)
    columns, dropped = encode_examples(tokenizer, [{"prompt": "word:3", "answer": "river"}], layout)
    assert dropped == 0
    tokens = tokenizer.convert_ids_to_tokens(columns["input_ids"][0])
    assert tokens == [EOS] * 5 + [BOS, *"word:3"] + [*"river", EOS]
    assert columns["attention_mask"][0] == [0] * 5 + [1] * 13


@pytest.mark.parametrize("field,value,message", [("prompt", "sort:abcdefgh", "prompt_length"), ("answer", "abcdef", "gen_length")])
def test_too_long_examples_are_refused(tokenizer, field, value, message):
    example = {"prompt": "word:1", "answer": "plant", field: value}
    with pytest.raises(DataError, match=f"example 0 .*{message}.*data.too_long: drop"):
        encode_examples(tokenizer, [example], LAYOUT, source="x.jsonl")
    columns, dropped = encode_examples(tokenizer, [example, {"prompt": "word:1", "answer": "plant"}], LAYOUT,
                                       too_long="drop")
    assert dropped == 1 and columns["answer"] == ["plant"] and len(columns["input_ids"]) == 1


def test_jsonl_source_end_to_end(tokenizer, tmp_path):
    rows = [{"question": f"add:{i}+1=", "reply": str(i + 1)} for i in range(60)]
    rows += [{"question": "add:0+1=", "reply": "1"}]  # a repeated prompt stays in one split
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = DataParams(source=str(source), prompt_field="question", response_field="reply",
                        val_fraction=0.1, test_fraction=0.1, prompt_length=12, gen_length=4)
    counts = prepare_data(params, tokenizer, tmp_path / "data")
    sizes = {name: c["rows"] for name, c in counts.items()}
    assert sum(sizes.values()) == 61 and sizes["test"] >= 6 and not any(c["dropped_too_long"] for c in counts.values())
    splits = {name: datasets.load_from_disk(str(tmp_path / "data" / name)) for name in sizes}
    train_prompts = set(splits["train"]["prompt"])
    assert not train_prompts & set(splits["test"]["prompt"]) and not train_prompts & set(splits["val"]["prompt"])
    row = splits["train"][0]
    assert len(row["input_ids"]) == 16 and tokenizer.decode(row["input_ids"][12:], skip_special_tokens=True) == row["answer"]
    assert Layout.load(tmp_path / "data") == Layout(12, 4, 0)
    (tmp_path / "data" / "layout.json").write_text('{"prompt_length": 12, "gen_length": 5, "pad_token_id": 0}')
    with pytest.raises(DataError, match=r"layout.json: says prompt_length 12 \+ gen_length 5 = 17 tokens, but "
                                        r"\w+/ holds sequences of 16"):
        Layout.load(tmp_path / "data")  # a lying layout used to train a teacher on the wrong answer length
    Layout(12, 4, 0).save(tmp_path / "data")
    assert load_tokenizer(tmp_path / "data" / "tokenizer").mask_token_id == tokenizer.mask_token_id
    lines = (tmp_path / "data" / "prompts" / "test.jsonl").read_text().splitlines()
    assert len(lines) == sizes["test"] and "prompt" in json.loads(lines[0])


def jsonl_examples(path):
    return load_external(DataParams(source=str(path), val_fraction=0.3, test_fraction=0.3))


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: expected an object with a string field 'response'"):
        jsonl_examples(path)
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        jsonl_examples(path)


def test_jsonl_lines_end_at_newlines_only_and_bad_utf8_names_the_line(tmp_path):
    """JSON allows U+2028, U+0085 and a form feed unescaped inside a string; str.splitlines() used to
    cut such a record in two ("not valid JSON"). Invalid UTF-8 used to be a traceback."""
    path = tmp_path / "data.jsonl"
    prompts = ["a\u2028b", "c\u0085d", "e\x0cf"]
    path.write_bytes("".join(json.dumps({"prompt": p, "response": "x"}, ensure_ascii=False) + "\r\n"
                             for p in prompts).encode())
    assert sorted(e["prompt"] for split in jsonl_examples(path).values() for e in split) == sorted(prompts)
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match="data.jsonl:2: not valid UTF-8"):
        jsonl_examples(path)


def test_split_by_prompt_needs_enough_prompts():
    with pytest.raises(DataError, match="too few"):
        split_by_prompt([{"prompt": "a", "answer": "b"}] * 5, 0.1, 0.1, seed=0)


def test_forward_mask():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(3, 40, (4000, 13), generator=g)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0]).repeat(1000)
    x_t, masked = forward_mask(x0, t, answer_start=8, mask_id=2, generator=g)
    assert not masked[:, :8].any() and torch.equal(x_t[:, :8], x0[:, :8])
    assert torch.equal(x_t[masked], torch.full_like(x_t[masked], 2)) and torch.equal(x_t[~masked], x0[~masked])
    rate = masked[:, 8:].float().mean(1).view(1000, 4).mean(0)
    assert torch.allclose(rate, torch.tensor([0.0, 0.3, 0.7, 1.0]), atol=0.02)
    ratio = sample_mask_ratio(10000, eps=0.05, generator=g)
    assert ratio.min() >= 0.05 and ratio.max() <= 1.0 and abs(ratio.mean().item() - 0.525) < 0.01


def test_chat_template_and_generation_config_stops(tokenizer, tmp_path):
    from pipeline.data.tokenizer import encode_prompts, stop_token_ids
    from pipeline.models.llada import LLaDAConfig

    chat = build_char_tokenizer(ALPHABET + "<>|")
    chat.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}|{% endif %}"
    (ids,) = encode_prompts(chat, ["ab"])  # template found: applied, no BOS added
    assert chat.decode(ids) == "<ab>|" and ids[0] != chat.bos_token_id
    (plain,) = encode_prompts(chat, ["ab"], chat=False)
    assert plain[0] == chat.bos_token_id
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    config = LLaDAConfig(d_model=8, n_layers=1, n_heads=2, vocab_size=len(tokenizer), mask_token_id=2, eos_token_id=3)
    assert stop_token_ids(tokenizer, config, tmp_path) == {0, 3, 7}


def test_a_killed_prepare_data_leaves_nothing_the_next_run_keeps(tokenizer, tmp_path):
    """The temporaries a killed writer left beside data/ (its process gone, or an older version's
    nameless ones) are deleted by the next run; a live writer's are kept; git ignores them."""
    import fnmatch
    import os
    import subprocess
    import sys
    from pathlib import Path

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, old_style, live = (tmp_path / name for name in (f".data.tmp-{int(gone.stdout)}-x1", ".data.tmp-ab12cd",
                                                          f".data.tmp-{os.getpid()}-x2"))
    for stale in (dead, old_style, live):
        (stale / "train").mkdir(parents=True)
    prepare_data(DataParams(tasks=["word"], train_per_task=4, val_per_task=1, test_per_task=1), tokenizer,
                 tmp_path / "data")
    assert not dead.exists() and not old_style.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", live.name])
    patterns = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    for name in (dead.name, old_style.name, ".data.old-123"):
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_a_damaged_split_or_layout_is_a_data_error(tmp_path):
    """A truncated Arrow file of a saved split, or a cut-short layout.json, names the file instead of
    ending in a pyarrow or JSON traceback in whichever stage reads it."""
    import datasets

    from pipeline.core.errors import DataError
    from pipeline.data.layout import Layout, load_split

    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 50}).save_to_disk(str(tmp_path / "val"))
    assert len(load_split(tmp_path, "val")) == 50
    arrow = next((tmp_path / "val").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(DataError, match=r"val: a damaged split .*rerun the prepare_data stage"):
        load_split(tmp_path, "val")
    with pytest.raises(DataError, match=r"test: not found"):
        load_split(tmp_path, "test")
    Layout(14, 7, 0).save(tmp_path)
    assert Layout.load(tmp_path) == Layout(14, 7, 0)
    (tmp_path / "layout.json").write_text('{"prompt_length": 14, "gen_len')
    with pytest.raises(DataError, match="layout.json: damaged"):
        Layout.load(tmp_path)
    (tmp_path / "layout.json").write_text('{"prompt_length": 14, "gen_length": -7, "pad_token_id": 0}')
    with pytest.raises(DataError, match="layout.json: damaged"):
        Layout.load(tmp_path)
