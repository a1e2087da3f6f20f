"""Typed ``params.yaml`` sections. Each stage reads its own section; unknown keys, wrong types and
out-of-range values are refused with the file and the dotted key in the message."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.core.errors import ParamsError

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")
SECTIONS = ("data", "teacher", "cache", "student", "evaluate")
"""The top-level sections of ``params.yaml``, one per stage; any other top-level key is a typo."""


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice (plain YAML keeps the last copy without a word)."""


class ParamsLoader(yaml.SafeLoader):
    """YAML as people write params files: a key given twice in one mapping is refused, and ``1e-3``
    is a float (YAML 1.1, which PyYAML follows, reads it as text: it wants ``1.0e-3``)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in first_line:
                raise DuplicateKeyError(f"line {key_node.start_mark.line + 1}: {key!r} appears twice (also on line "
                                        f"{first_line[key] + 1}); only one copy can count, so delete the other")
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


# YAML 1.2's float syntax (exponents without a dot), which DVC's own YAML reader already follows.
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _check(where: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check(where, value, option)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ParamsError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_check(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ParamsError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types; ``__post_init__`` checks ranges."""
    if data is None:  # `key:` with nothing under it: usually its keys lost their indentation
        raise ParamsError(f"{where}: empty (are its keys indented under it?); write '{{}}' for every default")
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"{where}.{unknown[0]}: unknown key (known keys: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {name: _check(f"{where}.{name}", value, hints[name]) for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as err:
        raise ParamsError(f"{where}.{err}") from err


def load_section(cls: type[T], section: str, path: str | Path = PARAMS_FILE) -> T:
    """Section ``section`` of the params file at ``path`` as dataclass ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.load(path.read_text(), Loader=ParamsLoader) or {}
    except DuplicateKeyError as err:
        raise ParamsError(f"{path}: {err}") from err
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {data!r}")
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ParamsError(f"{path}:{unknown[0]}: unknown section (known sections: {', '.join(SECTIONS)})")
    if section not in data:
        raise ParamsError(f"{path}: no '{section}' section")
    return from_mapping(cls, data[section], f"{path}:{section}")


def require(condition: bool, key: str, message: str) -> None:
    """Range check for ``__post_init__``: raises ``ValueError("key: message")``."""
    if not condition:
        raise ValueError(f"{key}: {message}")


def require_at_least(section: Any, minimum: float, *keys: str) -> None:
    """``require(section.key >= minimum)`` for each key."""
    for key in keys:
        require(getattr(section, key) >= minimum, key, f"must be >= {minimum}")


def flatten(data: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts (or dataclasses) as ``{dotted key: leaf value}``, keys under ``prefix``."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differences(old: Any, new: Any, prefix: str) -> list[str]:
    """``"key: old -> new"`` for each dotted key whose value differs between two nested mappings."""
    a, b = flatten(old, prefix), flatten(new, prefix)
    return [f"{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def params_hash(*sections: Any) -> str:
    """A stable hash of dataclass sections or dicts (for refusing caches made with other params)."""
    blob = json.dumps([s if isinstance(s, dict) else dataclasses.asdict(s) for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- sections


@dataclasses.dataclass
class DataParams:
    """``data``: where examples come from and the sequence layout (stage ``prepare_data``)."""

    source: str = "builtin"
    """``builtin`` (the task suite), a local ``.jsonl`` file, or a Hugging Face dataset id."""
    seed: int = 0
    """Seed of the built-in generator and of the split of external data."""
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["add", "sort", "perm", "word"])
    """Built-in tasks to include."""
    train_per_task: int = 100000
    """Built-in training examples per task."""
    val_per_task: int = 64
    """Built-in validation prompts per task."""
    test_per_task: int = 100
    """Built-in held-out test prompts per task."""
    prompt_field: str = "prompt"
    """External data: field holding the prompt."""
    response_field: str = "response"
    """External data: field holding the answer."""
    hf_split: str = "train"
    """Hugging Face dataset: split to read (then divided into train/val/test by prompt)."""
    val_fraction: float = 0.02
    """External data: fraction of distinct prompts held out for validation."""
    test_fraction: float = 0.02
    """External data: fraction of distinct prompts held out for testing."""
    prompt_length: int = 14
    """Tokens in the (left-padded) prompt region; longer prompts are refused."""
    gen_length: int = 7
    """Tokens in the answer region (answer, then EOS padding)."""
    answer_suffix: str | None = None
    """Token appended to every answer before the EOS padding (``<|eot_id|>`` for LLaDA-8B-Instruct)."""
    chat_template: bool | None = None
    """Wrap prompts in the tokenizer's chat template (None: when the tokenizer has one)."""

    def __post_init__(self) -> None:
        from pipeline.data.tasks import TASKS

        for i, task in enumerate(self.tasks):
            require(task in TASKS, f"tasks[{i}]", f"unknown task {task!r} (known: {', '.join(TASKS)})")
        require(len(set(self.tasks)) == len(self.tasks), "tasks", "tasks repeat")
        require_at_least(self, 1, "train_per_task", "val_per_task", "test_per_task", "gen_length")
        require_at_least(self, 2, "prompt_length")
        for key in ("val_fraction", "test_fraction"):
            require(0.0 < getattr(self, key) < 0.5, key, "must be in (0, 0.5)")


@dataclasses.dataclass
class TeacherModelParams:
    """Architecture of the built-in teacher (a LLaDA config)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    mlp_hidden_size: int = 384
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size")
        require(self.d_model % self.n_heads == 0, "d_model", "must be divisible by n_heads")
        require(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", "must divide n_heads")


@dataclasses.dataclass
class TeacherTrainParams:
    """Pretraining of the built-in teacher with LLaDA's SFT objective."""

    max_steps: int = 2500
    """Optimizer steps (the run also stops at ``max_minutes``)."""
    max_minutes: float = 30.0
    """Wall-clock safety cap; training stops cleanly when it is spent (the teacher then depends on the
    machine's speed, so the default leaves ``max_steps`` to decide)."""
    batch_size: int = 256
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup_steps: int = 100
    weight_decay: float = 0.01
    min_mask_ratio: float = 1e-3
    """eps of LLaDA's t ~ U(eps, 1]."""
    task_weights: dict[str, float] | None = dataclasses.field(
        default_factory=lambda: {"add": 2.5, "sort": 1.25, "perm": 1.25, "word": 0.5})
    """Relative rate at which each built-in task's training examples are drawn (tasks learned slowly,
    like ``add``, oversampled); null: every training example equally often (external data)."""
    seed: int = 0
    num_threads: int = 0
    """torch CPU threads (0: torch's default)."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, "max_steps", "batch_size")
        require_at_least(self, 0, "warmup_steps", "num_threads")
        require(self.max_minutes > 0, "max_minutes", "must be > 0")
        if self.task_weights is not None:
            for task, weight in self.task_weights.items():
                require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 <= weight < math.inf,
                        f"task_weights.{task}", f"must be a finite number >= 0, got {weight!r}")
            require(any(w > 0 for w in self.task_weights.values()), "task_weights", "needs a weight > 0")
        require(self.lr > 0, "lr", "must be > 0")
        require(0 < self.min_mask_ratio < 1, "min_mask_ratio", "must be in (0, 1)")


@dataclasses.dataclass
class TeacherParams:
    """``teacher``: an existing LLaDA checkpoint, or the built-in one to pretrain (stage ``teacher``)."""

    checkpoint: str | None = None
    """Local directory or Hugging Face id of a LLaDA checkpoint; null pretrains the built-in teacher."""
    mask_token_id: int | None = None
    """Override the checkpoint's ``mask_token_id`` (LLaDA-8B: 126336; LLaDA-MoE: 156895)."""
    model: TeacherModelParams = dataclasses.field(default_factory=TeacherModelParams)
    train: TeacherTrainParams = dataclasses.field(default_factory=TeacherTrainParams)


@dataclasses.dataclass
class RolloutParams:
    """``cache.rollouts``: the teacher's own sampler runs on training prompts, cached beside the top-k
    rows (format: ``pipeline.cache.rollouts``). What the one-step student needs to learn the teacher's
    multi-step outputs rather than its per-position marginals (DESIGN 11.1)."""

    max_examples: int | None = 16000
    """Rollouts for the first N training examples (None: all of the cache's ``max_examples``)."""
    per_example: int = 4
    """Rollouts per example (0: no rollouts)."""
    greedy_first: bool = True
    """Rollout 0 of every example is greedy (temperature 0); the others sample at ``temperature``."""
    steps: int | None = None
    """Sampler steps (None: gen_length, the evaluation's multi-step setting)."""
    block_length: int | None = None
    """Semi-autoregressive block length (None: the whole answer in one block)."""
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    cfg_scale: float = 0.0
    """Unsupervised CFG of the sampler (0: none)."""
    temperature: float = 1.0
    """Temperature of the sampled rollouts (Gumbel-max)."""
    noise: Literal["per_step", "fixed", "shared"] = "per_step"
    """``per_step``: fresh Gumbel noise at every step; ``fixed``: one Gumbel field per rollout, reused at
    every step (the rollout is a function of (prompt, seed)); ``shared``: one of ``num_fields`` fields
    shared by every prompt, the rollout storing the field index."""
    num_fields: int = 4
    """Fields of the ``shared`` noise (sampled rollout i of a prompt uses field i mod num_fields)."""
    top_k: int = 0
    """Also store the teacher's top-k log-probs at each position's reveal step (0: not stored)."""
    rollouts_per_shard: int = 16384
    """Rollouts per shard file."""
    batch_size: int = 256
    """Rollouts sampled together. Part of the params hash (unlike ``cache.batch_size``): in bf16 on a
    GPU the logits of a row change in the last bits with the batch, and so can a sampler's choice.
    The sampler's peak memory grows with batch x block_length x vocabulary (LLaDA-8B: keep it small)."""

    def __post_init__(self) -> None:
        require(self.max_examples is None or self.max_examples >= 1, "max_examples", "must be >= 1 or null")
        require(self.per_example >= 0, "per_example", "must be >= 0")
        require_at_least(self, 1, "num_fields", "rollouts_per_shard", "batch_size")
        sampled = self.per_example - int(self.greedy_first)
        require(self.temperature > 0 or sampled <= 1 or self.remasking == "random", "per_example",
                f"{self.per_example} rollouts at temperature 0 would be copies of one another")
        require(self.noise != "shared" or sampled <= self.num_fields, "per_example",
                f"{sampled} sampled rollouts per prompt but {self.num_fields} shared fields: rollouts of one "
                f"prompt on the same field are copies (raise num_fields)")
        require(self.steps is None or self.steps >= 1, "steps", "must be >= 1 or null")
        require(self.block_length is None or self.block_length >= 1, "block_length", "must be >= 1 or null")
        require(self.top_k >= 0, "top_k", "must be >= 0")
        require(self.cfg_scale >= 0, "cfg_scale", "must be >= 0")
        require(self.temperature >= 0 and math.isfinite(self.temperature), "temperature", "must be finite and >= 0")


@dataclasses.dataclass
class CacheParams:
    """``cache``: stage one, the teacher's top-k log-probs on sampled (x_t, t) (stage ``cache_teacher``)."""

    samples_per_example: int = 4
    """Draws of (t, mask) per training example."""
    max_examples: int | None = 80000
    """Use only the first N training examples (None: all); the built-in train split interleaves its
    tasks, so a prefix is balanced."""
    top_k: int = 16
    """Log-probs kept per masked position (the rest is the tail mass)."""
    t_distribution: Literal["uniform", "logit_normal"] = "uniform"
    """Law of t for the non-fully-masked samples."""
    t_min: float = 0.02
    """Smallest t (uniform: t ~ U(t_min, 1]; logit-normal samples are clipped to it)."""
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    full_mask_fraction: float = 0.1
    """Fraction of samples at exactly t = 1 (every answer token masked): the one-step inference point."""
    cfg_scale: float = 0.0
    """Cache guided teacher logits ``un + (w + 1)(cond - un)`` (prompt masked for ``un``) when > 0."""
    rows_per_shard: int = 16384
    """Rows per shard file (bounded shard size)."""
    record_batch_rows: int = 512
    """Rows per Arrow record batch: the unit of random access and decompression."""
    batch_size: int = 256
    """Teacher forward batch of the top-k rows (speed only: not part of the params hash)."""
    seed: int = 0
    rollouts: RolloutParams = dataclasses.field(default_factory=RolloutParams)

    def content(self) -> dict:
        """The params that determine the cache's content (its params hash): all but ``batch_size``,
        which changes speed only."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "batch_size"}

    def __post_init__(self) -> None:
        require_at_least(self, 1, "samples_per_example", "top_k", "rows_per_shard", "record_batch_rows", "batch_size")
        require(self.max_examples is None or self.max_examples >= 1, "max_examples", "must be >= 1 or null")
        require(0.0 < self.t_min < 1.0, "t_min", "must be in (0, 1)")
        require(self.logit_normal_std > 0, "logit_normal_std", "must be > 0")
        require(0.0 <= self.full_mask_fraction <= 1.0, "full_mask_fraction", "must be in [0, 1]")
        require(self.cfg_scale >= 0, "cfg_scale", "must be >= 0")


@dataclasses.dataclass
class SoftPromptConfig:
    """``student.soft_prompt``: shape and time conditioning of the soft prompt (``pipeline.student.soft_prompt``).
    A saved student records it in its ``student_config.json``."""

    prompt_length: int = 8
    """P: prefix positions per layer."""
    time_features: int = 32
    """Sinusoidal features per time scalar (half sine, half cosine)."""
    max_frequency: float = 16.0
    """Largest angular frequency of the features; t lives in [0, 1]. Large values (the 1000*t of
    image diffusion) make du/dt huge under the JVP and training unstable."""
    hidden_size: int = 64
    """Width of the 2-layer MLP (its output layer has hidden_size x n_layers*2*Hkv*P*D weights)."""
    conditioning: Literal["r_t", "t_interval"] = "r_t"
    """Inputs of the time encoder: ``r_t`` embeds (r, t) (the seed's choice); ``t_interval`` embeds
    (t, t - r), which MeanFlow reports slightly better."""
    latent_dim: int = 8
    """d: a per-generation latent z ~ N(0, I_d) enters the prompt MLP beside the time features, so
    one forward pass can emit different consistent answers (DESIGN 11.2); 0: no latent (students
    saved before the latent existed load with 0)."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, "prompt_length", "hidden_size", "max_frequency")
        require_at_least(self, 0, "latent_dim")
        require(self.time_features >= 2 and self.time_features % 2 == 0, "time_features", "must be an even number >= 2")
        require(self.conditioning in ("r_t", "t_interval"), "conditioning", "must be 'r_t' or 't_interval'")


@dataclasses.dataclass
class StudentParams:
    """``student``: the soft prompt and its MeanFlow distillation (stage ``train_student``)."""

    soft_prompt: SoftPromptConfig = dataclasses.field(default_factory=SoftPromptConfig)
    meanflow_weight: float = 0.0
    """Weight of the seed's MeanFlow objective on the cache's top-k rows (0: off)."""
    rollout_weight: float = 1.0
    """Weight of the rollout objective on the cache's teacher rollouts (DESIGN 11.3; 0: off)."""
    rollouts: Literal["all", "greedy", "sampled"] = "all"
    """Which cached rollouts the rollout objective trains on (greedy: temperature 0)."""
    one_step_fraction: float = 0.5
    """Probability that a rollout row starts fully masked (k = 0, t = 1: the one-step point); the
    others start after a uniform step 1 .. steps - 1."""
    r0_fraction: float = 0.5
    """Probability that a rollout row's target is the whole rest of the trajectory (r = 0); the others
    end after a uniform later step."""
    latent_draws: int = 4
    """K: latents drawn per rollout for a latent student (``soft_prompt.latent_dim`` > 0); the best one
    (lowest loss, scored without gradient) is trained."""
    selection_temperature: float = 0.0
    """0: train only the best of the K draws (winner-takes-all); T > 0: train every draw, weighted by
    softmax(-loss / T) over the draws (annealed selection)."""
    tangent: Literal["linear", "seed"] = "linear"
    """dz/dt of the JVP: the forward process's mean-embedding path, or the seed's literal form."""
    loss: Literal["kl", "mse"] = "kl"
    ce_weight: float = 0.0
    """Weight of an auxiliary cross-entropy to the clean tokens x0."""
    adaptive_power: float = 1.0
    """MeanFlow's adaptive weight sg(1 / (loss + eps) ** p); 0 disables it."""
    adaptive_eps: float = 1e-3
    equal_fraction: float = 0.75
    """Fraction of samples with r = t (plain distillation of v); MeanFlow uses 25-75%."""
    tail: Literal["uniform", "drop"] = "uniform"
    """Dense reconstruction of v from the cached top-k."""
    jvp: Literal["no_grad", "grad"] = "no_grad"
    """``no_grad``: JVP without a graph, then an ordinary forward for the gradient (less memory);
    ``grad``: one grad-mode JVP whose primal is u."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    batch_size: int = 64
    """Rows per device per step."""
    max_steps: int = 1000
    max_minutes: float = 10.0
    eval_every: int = 100
    """Steps between one-step validation accuracy measurements."""
    devices: int = 1
    strategy: str = "auto"
    """Lightning strategy (``ddp`` for several GPUs)."""
    precision: str | None = None
    """Lightning precision (one of ``PRECISIONS``); default bf16-mixed on GPU, 32-true on CPU."""
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, 1, "batch_size", "max_steps", "eval_every", "devices", "latent_draws")
        require_at_least(self, 0, "meanflow_weight", "rollout_weight", "selection_temperature")
        require(self.meanflow_weight > 0 or self.rollout_weight > 0, "rollout_weight",
                "meanflow_weight and rollout_weight are both 0: nothing to train")
        require(self.rollouts in ("all", "greedy", "sampled"), "rollouts", "must be 'all', 'greedy' or 'sampled'")
        for key in ("one_step_fraction", "r0_fraction"):
            require(0.0 <= getattr(self, key) <= 1.0, key, "must be in [0, 1]")
        require_at_least(self, 0, "warmup_steps", "num_workers", "ce_weight", "adaptive_power", "weight_decay")
        require(0.0 <= self.equal_fraction <= 1.0, "equal_fraction", "must be in [0, 1]")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.adaptive_eps > 0, "adaptive_eps", "must be > 0")
        require(self.max_minutes > 0, "max_minutes", "must be > 0")
        require(self.precision is None or self.precision in PRECISIONS, "precision",
                f"{self.precision!r} is not one of {', '.join(PRECISIONS)} (or null)")


PRECISIONS = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "transformer-engine",
              "transformer-engine-float16", "64", "32", "16", "bf16")
"""The precision values Lightning accepts."""


@dataclasses.dataclass
class EvaluateParams:
    """``evaluate``: the held-out comparison of teacher and student (stage ``evaluate``)."""

    teacher_steps: list[int] | None = None
    """Teacher step counts (``gen_length`` is always added); null: 1, 2, 4, ... and ``gen_length``
    (times the number of blocks)."""
    block_length: int | None = None
    """The teacher's semi-autoregressive block length; null: the whole answer is one block
    (LLaDA-8B-Instruct is usually decoded in blocks of 32)."""
    cfg_scale: float = 0.5
    """Guidance scale w of the "with CFG" settings (logits un + (w + 1)(cond - un)); 0: none."""
    temperature: float = 1.0
    """Temperature of the sampled settings."""
    samples: int = 4
    """Completions per prompt in the sampled settings (accuracy and distinct valid completions)."""
    batch_size: int = 256
    """Completions decoded together, the same for every setting (seconds per sample depend on it);
    CFG doubles the rows the network sees. LLaDA-8B on one 80 GB GPU: 16 or less."""
    timing_repeats: int = 3
    """Greedy settings are decoded this many times and the fastest time is reported."""
    noise_variants: list[Literal["fixed", "shared"]] = dataclasses.field(default_factory=lambda: ["fixed", "shared"])
    """Extra sampled rows of the teacher at ``gen_length`` steps with coupled noise: ``fixed`` (one
    Gumbel field per completion at every step), ``shared`` (completion i of every prompt uses field
    i mod ``num_fields``), as stage one's ``cache.rollouts.noise``. The plain sampled rows draw
    fresh noise at every step (``per_step``)."""
    num_fields: int = 4
    """Fields of the ``shared`` noise variant."""
    seed: int = 0
    num_threads: int = 0
    """CPU threads for torch; 0: torch's default."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, "samples", "batch_size", "timing_repeats", "num_fields")
        require_at_least(self, 0, "cfg_scale", "num_threads")
        require(self.temperature > 0, "temperature", "must be > 0 (greedy settings are always included)")
        if self.block_length is not None:
            require(self.block_length >= 1, "block_length", "must be >= 1")
        if self.teacher_steps is not None:
            require(len(self.teacher_steps) > 0 and all(n >= 1 for n in self.teacher_steps), "teacher_steps",
                    "must be a non-empty list of positive step counts")
