"""params.yaml sections: defaults are valid; bad keys, types and values are named in the error."""

import pytest
import yaml

from pipeline.cache.params import CacheParams
from pipeline.core.params import ParamsError, load_section, params_hash
from pipeline.data.params import DataParams
from pipeline.evaluation.params import EvaluateParams
from pipeline.student.params import StudentParams
from pipeline.teacher.params import TeacherParams

ROOT_PARAMS = __import__("pathlib").Path(__file__).resolve().parents[1] / "params.yaml"


def test_repository_params_are_valid():
    assert load_section(DataParams, "data", ROOT_PARAMS).gen_length >= 1
    assert load_section(TeacherParams, "teacher", ROOT_PARAMS).model.d_model >= 1


@pytest.mark.parametrize("section, cls", [("data", DataParams), ("teacher", TeacherParams), ("cache", CacheParams),
                                          ("student", StudentParams), ("evaluate", EvaluateParams)])
def test_code_defaults_are_the_repository_params(section, cls):
    """A section written in part gets the rest from the code: the same values as params.yaml."""
    assert cls() == load_section(cls, section, ROOT_PARAMS)


def write(tmp_path, data):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "section,cls,value,message",
    [
        ("data", DataParams, {"gen_lenght": 8}, r"params.yaml:data.gen_lenght: unknown key"),
        ("data", DataParams, {"gen_length": "8"}, r"data.gen_length: expected int"),
        ("data", DataParams, {"gen_length": 0}, r"data.gen_length: must be >= 1"),
        ("data", DataParams, {"tasks": ["add", "mul"]}, r"data.tasks\[1\]: unknown task 'mul'"),
        ("data", DataParams, {"val_fraction": 0.7}, r"data.val_fraction: must be in"),
        ("teacher", TeacherParams, {"model": {"d_model": 130}}, r"teacher.model.d_model: must be divisible"),
        ("teacher", TeacherParams, {"train": {"lr": True}}, r"teacher.train.lr: expected float"),
        ("teacher", TeacherParams, {"train": {"optimizer": "sgd"}}, r"teacher.train.optimizer: unknown key"),
        ("student", StudentParams, {"soft_prompt": {"time_features": 3}}, r"student.soft_prompt.time_features: must be"),
        ("student", StudentParams, {"hidden_size": 8}, r"student.hidden_size: unknown key"),
        ("student", StudentParams, {"selection": "hardest"}, r"student.selection: 'hardest' is not one of"),
        ("student", StudentParams, {"selection": "weighted"}, r"student.selection_temperature: must be > 0 for"),
        ("student", StudentParams, {"selection_temperature": 0.5}, r"student.selection_temperature: applies to"),
        ("student", StudentParams, {"selection_temperature_start": 7.0}, r"selection_temperature_start: applies to"),
        ("student", StudentParams, {"policy_samples": 1}, r"student.policy_samples: must be >= 2"),
        ("student", StudentParams, {"mean_field_samples": 0}, r"student.mean_field_samples: must be >= 1"),
        ("student", StudentParams, {"mean_field_contexts": "latent", "mean_field_samples": 2},
         r"student.mean_field_samples: must be 1 with mean_field_contexts: latent"),
        ("student", StudentParams, {"mean_field_contexts": "latent", "soft_prompt": {"codebook_size": 4}},
         r"student.mean_field_contexts: latent needs a Gaussian latent"),
        ("student", StudentParams, {"mean_field_entropy_weight": -1.0}, r"student.mean_field_entropy_weight: must be >= 0"),
        ("student", StudentParams, {"matching_beta": 1.5}, r"student.matching_beta: must be in \[0, 1\]"),
        ("student", StudentParams, {"rollout_weight": 0.0}, r"student.rollout_weight: meanflow_weight, rollout_weight, policy_weight, matching_weight and mean_field_weight are all 0"),
        ("student", StudentParams, {"soft_prompt": {"latent_dim": 0, "codebook_size": 8}},
         r"student.soft_prompt.codebook_size: needs a latent"),
        # non-finite numbers used to pass and end in garbage or in a misleading "lower student.lr"
        ("cache", CacheParams, {"rollouts": {"cfg_scale": float("inf")}}, r"cache.rollouts.cfg_scale: must be a finite"),
        ("cache", CacheParams, {"logit_normal_mean": float("nan")}, r"cache.logit_normal_mean: must be a finite"),
        ("evaluate", EvaluateParams, {"cfg_scale": float("inf")}, r"evaluate.cfg_scale: must be a finite"),
        ("evaluate", EvaluateParams, {"temperature": float("nan")}, r"evaluate.temperature: must be a finite"),
        ("student", StudentParams, {"soft_prompt": {"max_frequency": float("inf")}},
         r"student.soft_prompt.max_frequency: must be a finite"),
        ("student", StudentParams, {"rollout_weight": float("inf")}, r"student.rollout_weight: must be a finite"),
        ("teacher", TeacherParams, {"model": {"rope_theta": 0.0}}, r"teacher.model.rope_theta: must be > 0"),
        ("teacher", TeacherParams, {"model": {"rope_theta": float("nan")}}, r"teacher.model.rope_theta: must be a finite"),
        # these ended in tracebacks (IndexError, RoPE's ValueError, int64 overflow)
        ("data", DataParams, {"tasks": []}, r"data.tasks: the built-in suite needs at least one task"),
        ("teacher", TeacherParams, {"model": {"d_model": 6, "n_heads": 2, "n_kv_heads": 1}},
         r"teacher.model.d_model: d_model / n_heads \(the head size, 3\) must be even"),
        ("cache", CacheParams, {"seed": 2**63}, r"cache.seed: must be an integer in \[0, 2\*\*63\)"),
        ("data", DataParams, {"seed": -1}, r"data.seed: must be an integer in"),
        ("teacher", TeacherParams, {"train": {"seed": 2**64}}, r"teacher.train.seed: must be an integer in"),
        ("student", StudentParams, {"seed": 2**63}, r"student.seed: must be an integer in"),
        ("evaluate", EvaluateParams, {"seed": 2**70}, r"evaluate.seed: must be an integer in"),
    ],
)
def test_bad_params_are_named(tmp_path, section, cls, value, message):
    with pytest.raises(ParamsError, match=message):
        load_section(cls, section, write(tmp_path, {section: value}))


def test_missing_file_and_section(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_section(DataParams, "data", tmp_path / "absent.yaml")
    with pytest.raises(ParamsError, match="no 'teacher' section"):
        load_section(TeacherParams, "teacher", write(tmp_path, {"data": {}}))


def test_ints_are_accepted_as_floats_and_hash_is_stable(tmp_path):
    params = load_section(TeacherParams, "teacher", write(tmp_path, {"teacher": {"train": {"lr": 1}}}))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params_hash(params) == params_hash(TeacherParams(train=params.train))
    assert params_hash(params) != params_hash(TeacherParams())


def test_params_file_typos_are_refused(tmp_path):
    """A section written twice, a misspelt section and an empty one are refused, not silently
    resolved (last copy wins, ignored, all defaults)."""
    path = tmp_path / "params.yaml"
    path.write_text("student:\n  lr: 0.1\ndata: {}\nstudent:\n  lr: 0.2\n")
    with pytest.raises(ParamsError, match=r"line 4: 'student' appears twice \(also on line 1\)"):
        load_section(StudentParams, "student", path)
    path.write_text("student: {}\nstudnet:\n  lr: 0.1\n")
    with pytest.raises(ParamsError, match=r"params.yaml:studnet: unknown section"):
        load_section(StudentParams, "student", path)
    path.write_text("student:\nlr: 0.1\n")  # the keys lost their indentation
    with pytest.raises(ParamsError, match=r"params.yaml:lr: unknown section"):
        load_section(StudentParams, "student", path)
    path.write_text("student:\ndata: {}\n")
    with pytest.raises(ParamsError, match=r"params.yaml:student: empty"):
        load_section(StudentParams, "student", path)


def test_exponents_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("student:\n  lr: 1e-3\n  adaptive_eps: 2E-4\n")
    params = load_section(StudentParams, "student", path)
    assert params.lr == 0.001 and params.adaptive_eps == 0.0002


def test_lightning_precision_is_checked(tmp_path):
    with pytest.raises(ParamsError, match=r"student.precision: 'bf17' is not one of"):
        load_section(StudentParams, "student", write(tmp_path, {"student": {"precision": "bf17"}}))


def test_the_readmes_real_checkpoint_params_are_valid():
    """The README's LLaDA-8B-Instruct on GSM8K block is params a user pastes: every key must exist
    and every value pass its section's checks."""
    from pipeline.core.params import from_mapping

    text = (ROOT_PARAMS.parent / "README.md").read_text()
    start = text.index("```yaml", text.index("## Using a real LLaDA checkpoint")) + len("```yaml")
    block = yaml.safe_load(text[start:text.index("```", start)])
    sections = {"data": DataParams, "teacher": TeacherParams, "cache": CacheParams, "student": StudentParams,
                "evaluate": EvaluateParams}
    assert set(block) == set(sections)
    for name, cls in sections.items():
        from_mapping(cls, block[name], f"README:{name}")
    assert block["cache"]["rollouts"]["block_length"] == block["evaluate"]["block_length"]  # the evaluated sampler
