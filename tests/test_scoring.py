"""The scorer registry (``pipeline.data.scoring``): each scorer on examples written from the behaviour
lm-evaluation-harness documents for its ``gsm8k`` task (strict-match and flexible-extract filters,
then exact match ignoring ``,``, ``$``, everything up to ``#### `` and a final ``.``, case-insensitive),
the registry's refusals, the params key, and the score command."""

import json

import pytest
import yaml

from pipeline.core.errors import ParamsError
from pipeline.core.params import from_mapping
from pipeline.data.scoring import configured_scorer, parse_scorer
from pipeline.evaluation.params import EvaluateParams
from pipeline.score_cli import main as score_main

GSM8K_REFERENCE = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72.\n#### 72"


@pytest.mark.parametrize("completion,strict,flexible", [
    ("48 + 24 = 72\n#### 72", True, True),
    ("#### 72.", True, True),  # a final period is ignored
    ("She sold 72 clips.", False, True),  # no '####': strict-match finds nothing
    ("#### 72\nor maybe 71", True, False),  # strict takes the first '####', flexible the last number
    ("#### 7 2", False, False),
    ("#### $72", False, True),  # strict's number pattern has no '$'; flexible's has, and '$' is ignored
    ("", False, False),
])
def test_gsm8k_strict_and_flexible(completion, strict, flexible):
    assert parse_scorer("gsm8k").correct(completion, GSM8K_REFERENCE) is strict
    assert parse_scorer("gsm8k_flexible").correct(completion, GSM8K_REFERENCE) is flexible


def test_gsm8k_ignores_thousands_separators_and_dollars():
    gsm8k, flexible = parse_scorer("gsm8k"), parse_scorer("gsm8k_flexible")
    assert gsm8k.correct("so #### 1,200", "... #### 1200") and gsm8k.correct("#### 1200", "#### 1,200")
    assert flexible.correct("The total is $1,200.", "#### 1200")
    assert gsm8k.correct("#### -3", "#### -3") and not gsm8k.correct("#### 3", "#### -3")


def test_math_boxed_takes_the_last_box_with_nested_braces():
    boxed = parse_scorer("math_boxed")
    assert boxed.correct(r"first \boxed{1}, then \boxed{\frac{1}{2}}", r"\frac{1}{2}")
    assert boxed.correct(r"\boxed{ \frac{1}{2} }", r"The answer is $\boxed{\frac{1}{2}}$.")
    assert not boxed.correct(r"\boxed{\frac{1}{2}", r"\frac{1}{2}")  # unclosed: no answer
    assert not boxed.correct(r"\frac{1}{2}", r"\frac{1}{2}")  # no box at all


def test_regex_scorer_takes_its_first_group():
    scorer = parse_scorer(r"regex:answer is (\d+)")
    assert scorer.correct("I think the answer is 42.", "42")  # the reference has no match: taken whole
    assert scorer.correct("the answer is 42", "so the answer is 42 indeed")
    assert not scorer.correct("42", "42")  # the completion must match the pattern
    assert parse_scorer(r"regex:\d+").correct("x 17 y", " 17 ")


@pytest.mark.parametrize("name,message", [
    ("gsm8", r"unknown scorer 'gsm8' \(known: builtin, exact, gsm8k, gsm8k_flexible, math_boxed, regex:<pattern>\)"),
    ("regex:(", r"'regex:\(': not a regular expression"),
])
def test_unknown_scorers_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        parse_scorer(name)
    with pytest.raises(ParamsError, match="params.yaml:evaluate.scorer: " + message):
        from_mapping(EvaluateParams, {"scorer": name}, "params.yaml:evaluate")


def test_builtin_judges_task_rows_by_task_and_other_rows_exactly():
    records = [{"prompt": "sort:cab", "answer": "abc", "task": "sort", "completions": ["abc", "acb"]},
               {"prompt": "perm:ab", "answer": "ab", "task": "perm", "completions": ["ba", "ab"]},
               {"prompt": "Q?", "answer": "#### 4", "completions": ["#### 4", "4"]}]
    builtin = parse_scorer("builtin").score_records(records)
    assert builtin["sort"]["accuracy"] == 0.5 and builtin["perm"]["distinct_valid"] == 2.0
    assert builtin["exact_match"]["accuracy"] == 0.5
    assert parse_scorer("builtin").judgments(records[1]) == [True, True]  # any permutation is valid
    gsm8k = parse_scorer("gsm8k").score_records(records)  # every row against its reference
    assert set(gsm8k) == {"gsm8k", "mean"} and gsm8k["gsm8k"]["accuracy"] == pytest.approx(1 / 6)


def test_the_stages_read_the_scorer_from_the_evaluate_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"scorer": "gsm8k_flexible"}}))
    assert configured_scorer(path).name == "gsm8k_flexible"
    path.write_text(yaml.safe_dump({"evaluate": {}}))
    assert configured_scorer(path).name == "builtin"
    path.write_text(yaml.safe_dump({"evaluate": {"scorer": 3}}))
    with pytest.raises(ParamsError, match="evaluate.scorer: must be a string"):
        configured_scorer(path)


def test_score_command_with_a_reference_field(tmp_path, capsys):
    path = tmp_path / "out.jsonl"
    lines = [{"prompt": "Q1", "gold": "#### 5", "completions": ["so #### 5", "#### 6"]},
             {"prompt": "Q2", "gold": "#### 1,000", "completions": ["#### 1000", "1000"]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert score_main([str(path), "--scorer", "gsm8k", "--reference-field", "gold"]) == 0
    assert json.loads(capsys.readouterr().out)["gsm8k"]["accuracy"] == 0.5
    assert score_main([str(path), "--scorer", "gsm8k"]) == 2  # no 'answer' field
    assert "'answer'" in capsys.readouterr().err
    assert score_main([str(path)]) == 2  # builtin: not task prompts, no reference
    assert "not a built-in task prompt" in capsys.readouterr().err
    assert score_main([str(path), "--scorer", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: --scorer unknown scorer 'nope'")
