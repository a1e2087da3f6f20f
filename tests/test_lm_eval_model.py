"""lm-eval's ``llada_mf`` model (``pipeline.lm_eval_model``) through lm-eval's own Python API, offline:
local task YAMLs over JSONL files, tiny random checkpoints and students saved from them."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the eval extra: "
                                       "pip install -e '.[eval]')")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import pipeline.lm_eval_model as lm_eval_model  # noqa: E402
from pipeline.data.tokenizer import MASK, encode_prompts, load_tokenizer  # noqa: E402
from pipeline.lm_eval_model import LLaDAMeanFlowLM, ModelArgsError, cut_at_stops  # noqa: E402
from pipeline.models.llada import LLaDA  # noqa: E402
from pipeline.student.model import Student  # noqa: E402
from tests.conftest import make_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["add:1+2=", "sort:cba", "word:3", "perm:abc", "add:12+9="]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}={% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")
"""A chat template the char tokenizer can encode (letters, digits, ':' and '=' only)."""


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub: datasets reads its offline switches at import, so they are set on its config too."""
    import datasets.config
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            patch.setenv(name, "1")
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm_eval")


@pytest.fixture(scope="module")
def teacher(work) -> Path:
    return make_checkpoint(work / "teacher")


@pytest.fixture(scope="module")
def untrained_student(work, teacher) -> Path:
    """Its soft prompt's gate is zero, so it decodes as its base does."""
    Student(LLaDA.from_pretrained(teacher), prompt_length=2).save_pretrained(work / "untrained_student")
    return work / "untrained_student"


@pytest.fixture(scope="module")
def student(work, teacher) -> Path:
    """A student whose soft prompt changes the answers."""
    model = Student(LLaDA.from_pretrained(teacher), prompt_length=2)
    with torch.no_grad():
        model.soft_prompt.prompt_gate.fill_(5.0)
        for p in model.soft_prompt.prompt_mlp.parameters():
            p.normal_(std=3.0, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(work / "student")
    return work / "student"


def write_task(folder: Path, name: str, rows: list[dict], **config) -> Path:
    """A generate_until task ``name`` over ``rows`` ({"prompt", "answer"}) in ``folder``, scored by exact_match."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / f"{name}.jsonl")}, "cache_dir": str(folder / "hf")},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [], "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1},
        **config,
    }
    (folder / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML
    return folder


@pytest.fixture(scope="module")
def tasks(work) -> Path:
    return write_task(work / "tasks", "tiny", [{"prompt": p, "answer": "x"} for p in PROMPTS])


def evaluate(model_args: dict, tasks: Path, task: str = "tiny", **options) -> dict:
    return lm_eval.simple_evaluate(model="llada_mf", model_args=model_args, tasks=[task],
                                   task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                   device="cpu", log_samples=True, bootstrap_iters=0, **options)


def responses(results: dict, task: str = "tiny") -> list[str]:
    """The one response of each document, in document order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    assert all(len(s["resps"]) == 1 for s in samples)
    return [s["resps"][0][0] for s in samples]


def test_registered_in_lm_eval_and_declared_as_an_entry_point():
    """Importing the module registers it; pyproject.toml declares the entry point that lm-eval versions with
    plugin discovery read (this needs the project installed, ``pip install -e .``)."""
    assert lm_eval.api.registry.get_model("llada_mf") is LLaDAMeanFlowLM
    points = [p for p in importlib.metadata.entry_points(group="lm_eval.models") if p.name == "llada_mf"]
    assert [p.value for p in points] == ["pipeline.lm_eval_model:LLaDAMeanFlowLM"]
    assert points[0].load() is LLaDAMeanFlowLM


def test_student_and_checkpoint_directories_answer_every_row(teacher, untrained_student, student, tasks, monkeypatch):
    calls = []
    real = LLaDAMeanFlowLM.generate_until
    monkeypatch.setattr(LLaDAMeanFlowLM, "generate_until",
                        lambda self, requests, *a: calls.append(len(requests)) or real(self, requests, *a))
    teacher_one_step = evaluate({"pretrained": str(teacher), "gen_length": 8, "steps": 1, "batch_size": 2}, tasks)
    untrained = evaluate({"pretrained": str(untrained_student), "gen_length": 8, "batch_size": 3}, tasks)
    trained = evaluate({"pretrained": str(student), "gen_length": 8, "batch_size": 3}, tasks)
    teacher_default = evaluate({"pretrained": str(teacher), "gen_length": 8, "block_length": 4, "batch_size": 4}, tasks)
    assert calls == [len(PROMPTS)] * 4  # one request per row
    for results in (teacher_one_step, untrained, trained, teacher_default):
        assert results["results"]["tiny"]["sample_len"] == len(PROMPTS)
        assert len(responses(results)) == len(PROMPTS)
    # a student defaults to one step, a checkpoint to gen_length steps (lm-eval records the model's settings)
    assert untrained["config"]["llada_mf_kind"] == "student" and untrained["config"]["llada_mf_sampler"]["steps"] == 1
    assert teacher_default["config"]["llada_mf_sampler"]["steps"] == 8
    assert teacher_default["config"]["llada_mf_kind"] == "checkpoint"
    # an untrained student is its base at one step; the soft prompt of a trained one is used
    assert responses(untrained) == responses(teacher_one_step)
    assert responses(trained) != responses(teacher_one_step)
    assert responses(teacher_default) != responses(teacher_one_step)


def test_a_student_defaults_to_the_layout_it_was_trained_for(teacher, tmp_path):
    Student(LLaDA.from_pretrained(teacher), prompt_length=2).save_pretrained(
        tmp_path / "student", trained_for={"prompt_length": 9, "gen_length": 6, "block_length": 3})
    one_step = LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(tmp_path / "student")}).options
    assert (one_step.gen_length, one_step.steps, one_step.block_length) == (6, 1, 6)
    two_steps = LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(tmp_path / "student"), "steps": 2}).options
    assert (two_steps.gen_length, two_steps.steps, two_steps.block_length) == (6, 2, 3)


def test_base_overrides_the_students_recorded_base(work, teacher, student, tasks):
    """``base=``: a copy of the base elsewhere loads (same fingerprint); another checkpoint is refused."""
    import shutil

    moved = Path(shutil.copytree(teacher, work / "moved_teacher"))
    recorded = evaluate({"pretrained": str(student), "gen_length": 8}, tasks)
    overridden = evaluate({"pretrained": str(student), "gen_length": 8, "base": str(moved)}, tasks)
    assert overridden["config"]["llada_mf_base"] == str(moved)
    assert responses(overridden) == responses(recorded)
    other = make_checkpoint(work / "other_teacher", seed=1)
    with pytest.raises(ModelArgsError, match=r"^model_args base: .*fingerprint"):
        LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(student), "base": str(other), "gen_length": 8})


def test_stop_sequences_and_max_gen_toks_cut_the_answer(teacher, tasks):
    args = {"pretrained": str(teacher), "gen_length": 8, "steps": 4, "batch_size": 5}
    raw = responses(evaluate(args, tasks))
    assert all(len(text) >= 3 for text in raw[:2]), raw
    stops = [raw[0][1:3], raw[1][2]]  # stops met in the answers themselves
    expected = [text[: min([text.find(s) for s in stops if s in text], default=len(text))] for text in raw]
    assert expected != raw  # some answer is cut
    cut = responses(evaluate(args, tasks, gen_kwargs={"until": stops}))
    assert cut == expected
    capped = responses(evaluate(args, tasks, gen_kwargs={"max_gen_toks": 2}))
    assert capped == [text[:2] for text in raw]  # a token a character


def test_answers_are_generate_clis(teacher, tasks, tmp_path):
    """The same prompts, settings and seed give ``python -m pipeline.generate_cli``'s completions."""
    from pipeline.generate_cli import main as generate_main

    settings = {"gen_length": 8, "block_length": 4, "steps": 4, "temperature": 0.0}
    answers = responses(evaluate({"pretrained": str(teacher), "batch_size": 2, **settings}, tasks))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    options = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    assert generate_main(["--model", str(teacher), "--prompts", str(tmp_path / "in.jsonl"), "--out",
                          str(tmp_path / "out.jsonl"), *options]) == 0
    completions = [json.loads(line)["completions"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert answers == [c[0] for c in completions]


def test_sampler_options_pass_through(teacher, tasks, monkeypatch):
    """Any SamplerOptions field is a model_arg: LLaDA's logits_eos_inf keeps EOS out of every answer."""
    answers = []
    real = lm_eval_model.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        answers.extend(out[:, -8:].tolist())
        return out

    monkeypatch.setattr(lm_eval_model, "generate", spy)
    args = {"pretrained": str(teacher), "gen_length": 8, "steps": 4}
    evaluate(args, tasks)
    assert any(0 in answer for answer in answers)  # EOS (id 0) ends some answer of this random model
    answers.clear()
    results = evaluate({**args, "logits_eos_inf": True}, tasks)
    assert len(answers) == len(PROMPTS) and not any(0 in answer for answer in answers)
    assert results["config"]["llada_mf_sampler"]["logits_eos_inf"] is True


def test_cut_at_stops_cuts_at_the_earliest_of_any_stop_string():
    assert cut_at_stops("abcabc", ["c", "b"]) == "a"
    assert cut_at_stops("abc", ["z", ""]) == "abc"


def test_runs_are_deterministic_given_the_seed_and_scored(teacher, tasks, work):
    sampled = {"pretrained": str(teacher), "gen_length": 8, "steps": 4, "temperature": 1.0, "batch_size": 2}
    first, second = (responses(evaluate(sampled, tasks)) for _ in range(2))
    assert first == second
    assert responses(evaluate({**sampled, "seed": 1}, tasks)) != first
    # exact_match over the responses: targets equal to the answers for 3 rows of 5
    rows = [{"prompt": p, "answer": first[i] if i < 3 else "nomatch"} for i, p in enumerate(PROMPTS)]
    scored = evaluate(sampled, write_task(work / "scored_tasks", "scored", rows), task="scored")
    assert scored["results"]["scored"]["exact_match,none"] == pytest.approx(3 / 5)


@pytest.fixture(scope="module")
def chat_teacher(work) -> Path:
    path = make_checkpoint(work / "chat_teacher")
    tokenizer = load_tokenizer(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return path


def test_the_chat_template_is_applied_once(chat_teacher, tasks, monkeypatch):
    """The prompts the sampler receives: wrapped once as a user turn whether the model (chat_template=auto) or
    lm-eval (--apply_chat_template) renders the template, as ``generate_cli`` encodes them; plain with
    chat_template=off."""
    seen = []
    real = lm_eval_model.generate

    def spy(network, prompt, options, *, attention_mask, **kwargs):
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(prompt, attention_mask))
        return real(network, prompt, options, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(lm_eval_model, "generate", spy)
    tokenizer = load_tokenizer(chat_teacher)
    wrapped = sorted(encode_prompts(tokenizer, PROMPTS, chat=True))
    plain = sorted(encode_prompts(tokenizer, PROMPTS, chat=False))
    assert all(ids.count(tokenizer.bos_token_id) == 1 for ids in wrapped)
    args = {"pretrained": str(chat_teacher), "gen_length": 8, "steps": 2}
    for options, expected in (({}, wrapped), ({"apply_chat_template": True}, wrapped),
                              ({"chat_template": "off"}, plain)):
        seen.clear()
        evaluate({**args, **{k: v for k, v in options.items() if k == "chat_template"}}, tasks,
                 apply_chat_template=options.get("apply_chat_template", False))
        assert sorted(seen) == expected, options
    with pytest.raises(ModelArgsError, match="chat_template=off contradicts lm-eval's --apply_chat_template"):
        evaluate({**args, "chat_template": "off"}, tasks, apply_chat_template=True)
    # a context lm-eval rendered is recognised by itself too (requests from lm-eval's request cache)
    model = LLaDAMeanFlowLM.create_from_arg_obj(args)
    rendered = model.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])
    fresh = LLaDAMeanFlowLM.create_from_arg_obj(args)
    assert fresh.prompt_ids(rendered) == fresh.prompt_ids(PROMPTS[0]) == encode_prompts(tokenizer, PROMPTS[:1], True)[0]


# ---------------------------------------------------------------------- likelihoods


def loglikelihood_requests(pairs):
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


@pytest.fixture(scope="module")
def a_predictor(work) -> Path:
    """A checkpoint built to predict 'a' at every masked position: the blocks add nothing, so a masked
    position's hidden state is the normed mask embedding, and the head's row for 'a' points along it."""
    path = make_checkpoint(work / "a_predictor")
    model = LLaDA.from_pretrained(path)
    tokenizer = load_tokenizer(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_out.weight", "ff_out.weight")) and ".blocks." in name:
                p.zero_()
        model.final_norm.weight.fill_(1.0)
        mask = model.embedding_weight[tokenizer.convert_tokens_to_ids(MASK)]
        hidden = mask / mask.pow(2).mean().sqrt()
        model.head_weight[tokenizer.convert_tokens_to_ids("a")] = 0.3 * hidden
    model.save_pretrained(path)
    return path


def test_loglikelihood_of_one_token_is_exact(teacher):
    """With one continuation token every sample masks it (k = L = 1), so the estimate is log p(token |
    context, [MASK]) itself, whatever the seed; is_greedy says whether it is the argmax."""
    model = LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(teacher), "gen_length": 8, "mc_num": 4, "seed": 3})
    tokenizer = model.tokenizer
    context = tokenizer("add:1+2=")["input_ids"]
    with torch.no_grad():
        logits = model.model(torch.tensor([context + [model.mask_id]]))[0, -1]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    best = int(logits.masked_fill(torch.arange(len(logits)) == model.mask_id, -torch.inf).argmax())
    assert len(tokenizer.decode([best])) == 1  # a character (this seed's); a special token would not round-trip
    other = next(i for i in tokenizer.convert_tokens_to_ids(list("0123")) if i != best)
    pairs = [("add:1+2=", tokenizer.decode([best])), ("add:1+2=", tokenizer.decode([other]))]
    (best_ll, best_greedy), (other_ll, other_greedy) = model.loglikelihood(loglikelihood_requests(pairs))
    assert best_ll == pytest.approx(float(log_probs[best]), rel=1e-5)
    assert other_ll == pytest.approx(float(log_probs[other]), rel=1e-5)
    assert (best_greedy, other_greedy) == (True, False)


def test_loglikelihood_of_two_tokens_is_the_weighted_masked_cross_entropy(teacher):
    """For L = 2 every sample masks one token (weight L/k = 2) or both (weight 1): the estimate is
    -(2a n_first + 2b n_second + c n_both) / n, with a, b each token's cross-entropy given the other, c
    both tokens' given neither, and k stratified (half the samples each) over the mc_num samples."""
    model = LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(teacher), "gen_length": 8, "mc_num": 400,
                                                 "batch_size": 150, "check_greedy": False})
    context = model.tokenizer("sort:cba")["input_ids"]
    target = model.tokenizer("ab", add_special_tokens=False)["input_ids"]
    M = model.mask_id

    def nll(tokens: list[int], position: int) -> float:
        with torch.no_grad():
            logits = model.model(torch.tensor([context + tokens]))[0, len(context) + position].double()
        return -float(torch.log_softmax(logits, dim=-1)[target[position]])

    a, b, c = nll([M, target[1]], 0), nll([target[0], M], 1), nll([M, M], 0) + nll([M, M], 1)
    masked, counts = model.mask_draws(lm_eval_model.Continuation(context, target))
    first, second, both = (int((masked[:, 0] & ~masked[:, 1]).sum()), int((~masked[:, 0] & masked[:, 1]).sum()),
                           int(masked.all(dim=1).sum()))
    assert first + second + both == 400 and masked.sum(dim=1).tolist() == counts.tolist()
    assert abs(both - 200) <= 2 and abs(first - second) < 60  # stratified k; a uniform token when k = 1
    (estimate, _), = model.loglikelihood(loglikelihood_requests([("sort:cba", "ab")]))
    assert estimate == pytest.approx(-(2 * a * first + 2 * b * second + c * both) / 400, rel=1e-6)


def test_loglikelihood_prefers_the_continuation_the_model_predicts(a_predictor):
    model = LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(a_predictor), "gen_length": 8, "mc_num": 8})
    (likely, likely_greedy), (unlikely, unlikely_greedy) = model.loglikelihood(
        loglikelihood_requests([("add:1+2=", "aaaa"), ("add:1+2=", "bcbc")]))
    assert likely > unlikely + 10  # 4 tokens, each about 9 nats apart
    assert (likely_greedy, unlikely_greedy) == (True, False)


def test_loglikelihood_estimate_depends_on_the_seed_only(teacher, untrained_student):
    """Its masks are drawn from (seed, the pair): the same estimate in another batch size or beside other
    requests; another seed, another estimate; an untrained student scores as its base."""
    pairs = [("sort:cba", "abc"), ("word:3", "cat12"), ("perm:ab", "ba")]

    def estimates(pretrained, **args):
        model = LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(pretrained), "gen_length": 8, "mc_num": 6,
                                                     "check_greedy": False, **args})
        return [ll for ll, _ in model.loglikelihood(loglikelihood_requests(pairs))]

    reference = estimates(teacher, batch_size=6)
    assert estimates(teacher, batch_size=4) == pytest.approx(reference, rel=1e-6)
    alone = LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(teacher), "gen_length": 8, "mc_num": 6,
                                                  "check_greedy": False})
    assert alone.loglikelihood(loglikelihood_requests(pairs[1:2]))[0][0] == pytest.approx(reference[1], rel=1e-6)
    assert estimates(teacher, seed=1) != pytest.approx(reference, rel=1e-6)
    assert estimates(untrained_student) == pytest.approx(reference, rel=1e-5)
    assert all(ll < 0 for ll in reference)


def test_multiple_choice_task_through_lm_eval(a_predictor, work):
    rows = [{"prompt": p, "choices": ["bcbc", "aaaa", "cbcb"], "gold": 1} for p in PROMPTS[:3]]
    folder = write_task(work / "choice_tasks", "choice", rows, output_type="multiple_choice",
                        doc_to_choice="{{choices}}", doc_to_target="{{gold}}", target_delimiter="",
                        generation_kwargs=None,
                        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    args = {"pretrained": str(a_predictor), "gen_length": 8, "mc_num": 4, "check_greedy": False}
    results = evaluate(args, folder, task="choice")
    assert results["results"]["choice"]["acc,none"] == 1.0
    assert len(results["samples"]["choice"]) == 3


def test_loglikelihood_rolling_sums_windows_over_long_texts(a_predictor):
    model = LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(a_predictor), "gen_length": 8, "mc_num": 4,
                                                 "check_greedy": False})
    short, long = "aaaab", "a" * 150  # the model's max_sequence_length is 64
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
                for text in (short, long)]
    rolled_short, rolled_long = model.loglikelihood_rolling(requests)
    # a text that fits is one window given BOS: the loglikelihood of the text after an empty context
    # (to rounding: batched with other requests, the sums may run in another order on another CPU)
    assert rolled_short == pytest.approx(model.loglikelihood(loglikelihood_requests([("", short)]))[0][0], rel=1e-6)
    assert torch.isfinite(torch.tensor(rolled_long)) and rolled_long < 0
    assert model.loglikelihood_rolling(requests[1:]) == [pytest.approx(rolled_long, rel=1e-6)]


def test_a_latent_student_without_an_anchor_has_no_likelihood(teacher, work):
    Student(LLaDA.from_pretrained(teacher), prompt_length=2, latent_dim=4, anchor="none").save_pretrained(
        work / "latent_student")
    model = LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(work / "latent_student"), "gen_length": 8})
    with pytest.raises(NotImplementedError, match="no greedy anchor.*use generate_until tasks"):
        model.loglikelihood(loglikelihood_requests([("add:1+2=", "3")]))


# ---------------------------------------------------------------------- user errors


@pytest.mark.parametrize("args, message", [
    ({"stepz": 1}, r"^model_args stepz: not a llada_mf model_arg \(accepted: .*steps"),
    ({"steps": 0}, r"^model_args steps: must be an integer >= 1, got 0"),
    ({"gen_length": 8, "steps": 9}, r"^model_args steps: 9 steps do not fit gen_length 8"),
    ({"gen_length": 8, "block_length": 3}, r"^model_args block_length: gen_length 8 is not a multiple of 3"),
    ({"temperature": -1.0}, r"^model_args temperature: must be a finite number >= 0"),
    ({"remasking": "lowest"}, r"^model_args remasking: must be 'low_confidence' or 'random'"),
    ({"logits_eos_inf": "yes"}, r"^model_args logits_eos_inf: must be true or false"),
    ({"chat_template": "maybe"}, r"^model_args chat_template: must be auto, on or off"),
    ({"chat_template": "on"}, r"^model_args chat_template=on: the tokenizer of .* has no chat template"),
    ({"dtype": "float8"}, r"^model_args dtype: must be one of float32, bfloat16, float16"),
    ({"device": "gpu0"}, r"^model_args device=gpu0: not a device torch knows"),
    ({"batch_size": "auto"}, r"^model_args batch_size=auto: automatic batch sizes are not supported"),
    ({"batch_size": 0}, r"^model_args batch_size: must be an integer >= 1"),
    ({"seed": -1}, r"^model_args seed: must be an integer in \[0, 2\*\*63\)"),
    ({"mc_num": 0}, r"^model_args mc_num: must be an integer >= 1"),
    ({"base": "elsewhere"}, r"^model_args base: applies to a student directory only"),
])
def test_bad_model_args_are_refused_in_one_line_before_the_weights_load(teacher, args, message, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the weights were loaded before the model_args were checked")

    monkeypatch.setattr(lm_eval_model, "load_model", never)
    with pytest.raises(ModelArgsError, match=message) as caught:
        LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(teacher), "gen_length": 8, **args})
    assert "\n" not in str(caught.value)


def test_a_students_answer_length_is_checked_before_the_weights_load(teacher, tmp_path, monkeypatch):
    Student(LLaDA.from_pretrained(teacher), prompt_length=2, latent_dim=4, latent_answer_positions=8).save_pretrained(
        tmp_path / "student")

    def never(*a, **k):
        raise AssertionError("the weights were loaded before the model_args were checked")

    monkeypatch.setattr(lm_eval_model, "load_model", never)
    monkeypatch.setattr("pipeline.student.model.load_model", never)
    with pytest.raises(ModelArgsError, match=r"^model_args gen_length: this student's latent enters 8 answer "
                                             r"positions \(latent_answer_positions\); use gen_length=8$"):
        LLaDAMeanFlowLM.create_from_arg_obj({"pretrained": str(tmp_path / "student"), "gen_length": 6})


def test_bad_pretrained_and_gen_length_are_refused(teacher, tmp_path):
    with pytest.raises(ModelArgsError, match=r"^model_args pretrained: required"):
        LLaDAMeanFlowLM.create_from_arg_obj({})
    with pytest.raises(ModelArgsError, match=r"^model_args pretrained: .*checkpoint directory not found"):
        LLaDAMeanFlowLM.create_from_arg_string(f"pretrained={tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelArgsError, match=r"^model_args pretrained: .* is neither a LLaDA checkpoint"):
        LLaDAMeanFlowLM.create_from_arg_string(f"pretrained={tmp_path / 'empty'}")
    with pytest.raises(ModelArgsError, match=r"^model_args gen_length: 64 leaves no room for a prompt"):
        LLaDAMeanFlowLM.create_from_arg_string(f"pretrained={teacher},gen_length=64")


def test_harness_options_fill_in_and_model_args_win(teacher):
    """lm-eval passes --batch_size (1 unless given) and --device (cuda:0 unless given) beside model_args."""
    model = LLaDAMeanFlowLM.create_from_arg_string(f"pretrained={teacher},gen_length=8,batch_size=4",
                                                   {"batch_size": 1, "device": "cpu", "max_batch_size": None})
    assert model.batch_size == 4
    args = f"pretrained={teacher},gen_length=8"
    assert LLaDAMeanFlowLM.create_from_arg_string(args, {"batch_size": 3}).batch_size == 3
    if not torch.cuda.is_available():  # lm-eval's default --device on a machine without it: the CPU
        assert str(LLaDAMeanFlowLM.create_from_arg_string(args, {"device": "cuda:0"}).device) == "cpu"
        with pytest.raises(ModelArgsError, match=r"^model_args device=cuda:0: no cuda device is available"):
            LLaDAMeanFlowLM.create_from_arg_string(f"pretrained={teacher},gen_length=8,device=cuda:0")


def test_python_m_route_runs_lm_evals_command_line(teacher, tasks):
    """``python -m pipeline.lm_eval_model`` is lm-eval's command line with the model registered (lm-eval's
    --device default, cuda:0, falls back to the CPU on a machine without CUDA)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pipeline.lm_eval_model", "--model", "llada_mf", "--model_args",
                             f"pretrained={teacher},gen_length=8,steps=2", "--tasks", "tiny", "--include_path",
                             str(tasks), "--batch_size", "5"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("|tiny")]
    assert len(table) == 1 and "exact_match" in table[0], result.stdout
    assert "llada_mf generate_until" in result.stderr  # the progress bar


def test_python_m_route_ends_a_bad_model_arg_with_one_error_line(teacher, monkeypatch, capsys):
    """The command line's model_args reach the model as lm-eval builds it (lm-eval's own command line,
    which indexes every built-in task first, is run by the test above)."""
    import lm_eval.__main__

    def command_line():
        lm_eval.api.registry.get_model("llada_mf").create_from_arg_string(sys.argv[2], {"batch_size": 1})

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", command_line)
    monkeypatch.setattr(sys, "argv", ["lm_eval_model"])
    assert lm_eval_model.main(["--model_args", f"pretrained={teacher},steps=0"]) == 2
    assert capsys.readouterr().err == "error: model_args steps: must be an integer >= 1, got 0\n"
