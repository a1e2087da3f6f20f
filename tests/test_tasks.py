"""The built-in task suite: prompt formats, validity rules, disjoint seeded splits, the scorer."""

import re
from collections import Counter

import pytest

from pipeline.data.tasks import TASKS, lexicon, make_splits, score, task_of
from pipeline.score_cli import main

FORMATS = {
    "add": r"add:(\d{3})\+(\d{3})=",
    "sort": r"sort:[a-z]{6}",
    "perm": r"perm:[a-z]{5}",
    "word": r"word:\d",
}


@pytest.fixture(scope="module")
def splits():
    return make_splits(list(TASKS), seed=3, train_per_task=3000, val_per_task=40, test_per_task=60)


def test_prompt_formats_and_answers_are_valid(splits):
    for example in splits["train"] + splits["test"]:
        assert re.fullmatch(FORMATS[example.task], example.prompt), example
        assert TASKS[example.task].is_valid(example.prompt, example.answer), example
        assert task_of(example.prompt).name == example.task
        if example.task == "add":  # fixed width: digit columns align, carries included
            a, b = re.fullmatch(FORMATS["add"], example.prompt).groups()
            assert example.answer == f"{int(a) + int(b):04d}" and len(example.answer) == 4
    perm = [e for e in splits["train"] if e.task == "perm"]
    assert all(len(set(e.prompt[5:])) == 5 for e in perm)  # distinct letters


def test_validity_rules():
    assert TASKS["add"].is_valid("add:999+001=", "1000") and not TASKS["add"].is_valid("add:999+001=", "0100")
    assert TASKS["add"].is_valid("add:012+034=", "0046")
    assert not TASKS["add"].is_valid("add:012+034=", "46")  # the answer is zero padded to 4 digits
    assert TASKS["sort"].is_valid("sort:dcbaaz", "aabcdz") and not TASKS["sort"].is_valid("sort:dcbaaz", "abcdz")
    assert TASKS["perm"].is_valid("perm:abcde", "edcba") and not TASKS["perm"].is_valid("perm:abcde", "abcdd")
    assert TASKS["word"].is_valid("word:6", "night") and not TASKS["word"].is_valid("word:6", "stone")
    assert len(lexicon()) == 10 and all(len(words) == 6 for words in lexicon().values())


def test_held_out_prompts_never_trained_on(splits):
    train = {e.prompt for e in splits["train"]}
    for split in ("val", "test"):
        for example in splits[split]:
            if example.task != "word":  # ten prompts in all: held out by design impossible
                assert example.prompt not in train
    test = [e.prompt for e in splits["test"] if e.task != "word"]
    assert len(test) == len(set(test))
    assert {e.prompt for e in splits["test"] if e.task == "word"} == {f"word:{d}" for d in range(10)}


def test_train_split_interleaves_the_tasks(splits):
    assert [e.task for e in splits["train"][:8]] == list(TASKS) * 2  # a prefix is balanced
    assert Counter(e.task for e in splits["train"]) == {name: 3000 for name in TASKS}


def test_splits_are_seeded(splits):
    again = make_splits(list(TASKS), seed=3, train_per_task=3000, val_per_task=40, test_per_task=60)
    assert again == splits
    other = make_splits(list(TASKS), seed=4, train_per_task=3000, val_per_task=40, test_per_task=60)
    assert other["test"] != splits["test"]


def test_add_operands_cover_the_range(splits):
    operands = [int(x) for e in splits["train"] if e.task == "add"
                for x in re.fullmatch(FORMATS["add"], e.prompt).groups()]
    assert min(operands) < 10 and max(operands) > 989  # small operands are zero padded, not shorter
    carries = sum(int(e.answer[0]) for e in splits["train"] if e.task == "add")
    assert 0.4 < carries / 3000 < 0.6  # a + b >= 1000 about half the time


def test_many_answer_tasks_have_many_training_answers(splits):
    perm_answers = Counter(e.answer for e in splits["train"] if e.task == "perm")
    word_answers = Counter((e.prompt, e.answer) for e in splits["train"] if e.task == "word")
    assert len(perm_answers) > 2000
    assert len(word_answers) == 60  # every word of every digit occurs


def test_scorer():
    records = [
        {"prompt": "add:001+002=", "completions": ["0003", "3"]},
        {"prompt": "perm:abcde", "completions": ["edcba", "edcba", "abcde", "xbcde"]},
        {"prompt": "word:4", "completions": ["mint", "mist", "must", "dust"]},
    ]
    metrics = score(records)
    assert metrics["add"]["accuracy"] == 0.5
    assert metrics["perm"] == {"accuracy": 0.75, "prompts": 1, "distinct_valid": 2.0}
    assert metrics["word"]["distinct_valid"] == 4.0
    assert metrics["mean"]["accuracy"] == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    with pytest.raises(ValueError, match="not a prompt"):
        score([{"prompt": "mul:2*3=", "completions": ["6"]}])


def test_score_command(tmp_path, capsys):
    path = tmp_path / "out.jsonl"
    path.write_text('{"prompt": "sort:bca", "completions": ["abc"]}\n')
    assert main([str(path)]) == 0
    assert '"accuracy": 1.0' in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "word:1", "completions": ["at"]}\n\n{"prompt": "word:2", "completions": ["x"],}\n',
     r"completions.jsonl:3: not valid JSON"),
    ('{"prompt": "word:1", "completions": "cat"}\n', r"completions.jsonl:1: 'completions' must be a non-empty list"),
    ('{"prompt": "word:1", "completions": []}\n', r"completions.jsonl:1: 'completions' must be a non-empty list"),
    ("\n", r"completions.jsonl: no records"),
])
def test_score_command_refuses_bad_files_naming_the_line(tmp_path, capsys, text, message):
    """Bad JSON on line 3 (not 1), a string scored letter by letter, no completions (a division by
    zero), an empty file (``{}``, exit 0): each one ``error:`` line naming the file and line."""
    path = tmp_path / "completions.jsonl"
    path.write_text(text)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert re.search(message, err), err
