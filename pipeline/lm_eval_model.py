"""lm-evaluation-harness model ``llada_mf``: a student directory or a plain LLaDA checkpoint (the
teacher) behind lm-eval's ``LM`` interface, decoding with the project's sampler
(``pipeline.generation.sampler``), so a benchmark number is measured with the code the pipeline's
own evaluation uses.

Needs the ``eval`` extra (``pip install -e ".[eval]"``). lm-eval 0.4.13 (the newest release) finds
models only in its own registry: importing this module registers ``llada_mf`` there, and ``python -m
pipeline.lm_eval_model ARGS`` runs lm-eval's command line (the same ARGS as ``lm_eval``) with it
registered. ``pyproject.toml`` also declares the entry point ``llada_mf`` in the group ``lm_eval.models``,
which lm-eval reads from its pull request #4013 on (after 0.4.13), so that plain ``lm_eval --model
llada_mf`` should work there after ``pip install -e .``.

What each request type does:

- ``generate_until``: the sampler with the model_args' settings (steps, gen_length, block_length,
  temperature, cfg_scale, remasking); the answer is decoded up to the first EOS id, cut to the
  request's ``max_gen_toks`` tokens when it has one, then cut at the earliest of its ``until`` strings.
  The request's ``temperature``/``do_sample`` are not honoured (a warning says so when they differ):
  a diffusion sampler's settings are the model's, as in LLaDA's own ``eval_llada.py``.
- ``loglikelihood``: LLaDA's Monte Carlo estimate (its ``eval_llada.py``): the continuation is masked
  at ``mc_num`` stratified ratios k/L with a random subset of k of its L tokens each, and the
  masked tokens' cross-entropy weighted by L/k is averaged. It estimates the ELBO, a lower bound on
  log p(continuation | context), not the likelihood itself. A student is read at the interval
  (r = 0, t = k/L), its one-step prediction of every masked token. ``is_greedy``: the continuation
  equals the greedy decoding of its length, one token per step (``check_greedy``).
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows over the text, each window's estimate
  as above given the tokens before it, summed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # one line saying what to install, instead of a traceback into our imports
    raise ImportError("pipeline.lm_eval_model needs lm-evaluation-harness: pip install -e \".[eval]\"") from err

from pipeline.core.counter_random import LIKELIHOOD_MASK, counter_hash
from pipeline.core.errors import CheckpointError, PipelineError
from pipeline.core.params import SEED_LIMIT
from pipeline.data.tokenizer import decode_answer, eos_and_eot_ids, load_tokenizer, stop_token_ids
from pipeline.generation.decode import (batch_generator, check_answer_length, completion_network, decoding_defaults,
                                        left_pad, uses_anchor)
from pipeline.generation.sampler import (SamplerOptionError, SamplerOptions, StepInterval, generate, guided_hidden,
                                         sampler_network)
from pipeline.models.checkpoint_io import read_json, resolve_checkpoint
from pipeline.models.layers import upcast
from pipeline.models.registry import load_model, model_class
from pipeline.student.model import STUDENT_CONFIG, Student

MODEL_NAME = "llada_mf"
CHAT_MODES = {"auto": None, "on": True, "off": False, True: True, False: False}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HANDLED_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature"}
TEMPLATE_PROBE = "\ue000"
"""A private-use character standing for a message's content when the chat template's fixed opening
is rendered (``chat_template_opening``)."""

logger = logging.getLogger(__name__)


class ModelArgsError(PipelineError):
    """An argument the model cannot run with: a model_arg (the message starts ``model_args KEY``) or an
    lm-eval option (``--apply_chat_template``)."""


def _sampler_fields() -> set[str]:
    """SamplerOptions' fields, accepted as model_args as they are (LLaDA's EOS switches
    ``logits_eos_inf`` and ``confidence_eos_eot_inf`` among them): an option the sampler gains later is
    usable here without a change to this module."""
    return {field.name for field in dataclasses.fields(SamplerOptions)}


def check_device(name: Any, key: str) -> str:
    """``name`` as torch's device string, refused (naming ``key``) when torch cannot parse it or this
    machine lacks it: before weights are loaded (minutes for LLaDA-8B)."""
    try:
        device = torch.device(str(name))
    except RuntimeError as err:
        raise ModelArgsError(f"{key}={name}: not a device torch knows ({err})") from err
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise ModelArgsError(f"{key}={name}: no {device.type} device is available on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelArgsError(f"{key}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off while loading (it calls our LLaDA config an unknown model type, which
    is expected here), and back to the caller's level afterwards: the process is lm-eval's."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelArgsError(f"model_args {key}: must be an integer >= 1, got {value!r}")
    return value


def chat_template_opening(tokenizer) -> str:
    """The text every rendering of the tokenizer's chat template starts with, whatever the first role
    ("<|startoftext|><|start_header_id|>" for LLaDA-8B-Instruct), or "" when there is none: a context
    that starts with it was already rendered by lm-eval (``--apply_chat_template``), also when its
    requests come from lm-eval's request cache and ``apply_chat_template`` was never called."""
    renderings = []
    for messages in ([{"role": "user", "content": TEMPLATE_PROBE}],
                     [{"role": "system", "content": TEMPLATE_PROBE}, {"role": "user", "content": TEMPLATE_PROBE}]):
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # a template may refuse a system turn (jinja raises its own error types)
            continue
        renderings.append(text.split(TEMPLATE_PROBE)[0])
    return os.path.commonprefix(renderings) if renderings else ""


@dataclasses.dataclass(frozen=True)
class Continuation:
    """A (context, continuation) pair as token ids: what the likelihood estimate scores."""

    context: list[int]
    target: list[int]


class LLaDAMeanFlowLM(LM):
    """``--model llada_mf --model_args pretrained=DIR,...``: DIR a student directory
    (``student_config.json``) or a LLaDA / LLaDA-MoE checkpoint directory (or a Hugging Face id).

    model_args: ``base`` (a student's base checkpoint, in place of the one it records; its
    fingerprint must match), ``steps`` (default: 1 for a student, gen_length for a checkpoint),
    ``gen_length`` and ``block_length`` (default: what a student was trained for, else the checkpoint's
    suggestion, else 128 and one block, as ``generate_cli``), ``temperature``, ``cfg_scale``,
    ``remasking``, any other ``SamplerOptions`` field,
    ``batch_size`` (sequences per forward pass; default: lm-eval's ``--batch_size``),
    ``dtype`` (float32 / bfloat16 / float16; default bfloat16 on a GPU, float32 on a CPU),
    ``device`` (default: lm-eval's ``--device`` when this machine has it, else cuda when available,
    else cpu), ``seed`` (the sampling noise and a latent student's latents, as ``generate_cli``'s
    ``--seed``; and the likelihood masks), ``chat_template`` (auto / on / off: wrap each context in
    the tokenizer's chat template as one user turn; auto: when it has one; a context lm-eval already
    rendered is never wrapped again), ``mc_num`` (Monte Carlo samples per likelihood, default 128 as
    LLaDA's), ``check_greedy`` (compute loglikelihood's is_greedy; false returns False, and saves a
    decoding per request).
    """

    def __init__(self, pretrained: str | Path | None = None, *, harness: dict | None = None, **options):
        super().__init__()
        options = {k: v for k, v in options.items() if k != "trust_remote_code"}  # nothing here runs remote code
        sampler_fields = _sampler_fields()
        known = {"base", "batch_size", "dtype", "device", "seed", "chat_template", "mc_num", "check_greedy",
                 *sampler_fields}
        for key in options:
            if key not in known:
                raise ModelArgsError(f"model_args {key}: not a {MODEL_NAME} model_arg (accepted: pretrained, "
                                     f"{', '.join(sorted(known))})")
        if pretrained is None:
            raise ModelArgsError("model_args pretrained: required (a student directory or a LLaDA checkpoint "
                                 "directory)")
        harness = harness or {}

        # Every cheap check first: loading LLaDA-8B takes minutes.
        batch_size = options.get("batch_size", harness.get("batch_size", 1))
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            raise ModelArgsError(f"model_args batch_size={batch_size}: automatic batch sizes are not supported; "
                                 "give a number")
        self.batch_size = positive_int(batch_size, "batch_size")
        self.mc_num = positive_int(options.get("mc_num", 128), "mc_num")
        self.check_greedy = options.get("check_greedy", True)
        if not isinstance(self.check_greedy, bool):
            raise ModelArgsError(f"model_args check_greedy: must be true or false, got {self.check_greedy!r}")
        self.seed = options.get("seed", 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise ModelArgsError(f"model_args seed: must be an integer in [0, 2**63), got {self.seed!r}")
        chat = options.get("chat_template", "auto")
        if chat not in CHAT_MODES:
            raise ModelArgsError(f"model_args chat_template: must be auto, on or off, got {chat!r}")
        self.chat_mode = CHAT_MODES[chat]
        device = self._resolve_device(options.get("device"), harness.get("device"))
        dtype_name = options.get("dtype")
        if dtype_name is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        elif isinstance(dtype_name, torch.dtype) and dtype_name in DTYPES.values():
            dtype = dtype_name
        elif dtype_name in DTYPES:
            dtype = DTYPES[dtype_name]
        else:
            raise ModelArgsError(f"model_args dtype: must be one of {', '.join(DTYPES)}, got {dtype_name!r}")

        path = Path(str(pretrained))
        self.is_student = Student.is_student_dir(path)
        base = options.get("base")
        try:
            if self.is_student:
                base_dir = resolve_checkpoint(str(base)) if base is not None else Student.base_path_of(path)
            elif base is not None:
                raise ModelArgsError(f"model_args base: applies to a student directory only; {path} is a "
                                     "checkpoint directory")
            else:
                base_dir = resolve_checkpoint(str(pretrained))
        except CheckpointError as err:
            raise ModelArgsError(f"model_args {'base' if base is not None else 'pretrained'}: {err}") from err
        if not (base_dir / "config.json").is_file():
            key = "base" if self.is_student and base is not None else "pretrained"
            raise ModelArgsError(f"model_args {key}: {base_dir} is neither a LLaDA checkpoint (config.json) nor "
                                 "a student (student_config.json)")
        self.pretrained, self.base_dir = path, base_dir
        try:
            student_meta = read_json(path / STUDENT_CONFIG) if self.is_student else {}
        except CheckpointError as err:
            raise ModelArgsError(f"model_args pretrained: {err}") from err

        # Defaults as generate_cli's: the layout a student was trained for, else the checkpoint's hint.
        trained = student_meta.get("trained_for") if isinstance(student_meta.get("trained_for"), dict) else {}
        asked = positive_int(options["gen_length"], "gen_length") if "gen_length" in options else None
        sampler = {k: v for k, v in options.items() if k in sampler_fields}
        gen_length, sampler["steps"], sampler["block_length"] = decoding_defaults(
            base_dir, trained, self.is_student, asked, sampler.get("steps"), sampler.get("block_length"))
        sampler["gen_length"] = gen_length
        for key in ("temperature", "cfg_scale"):
            if key in sampler and not isinstance(sampler[key], bool) and isinstance(sampler[key], int):
                sampler[key] = float(sampler[key])  # "temperature=0" arrives as an int
        try:
            self.options = SamplerOptions(**sampler)
        except SamplerOptionError as err:
            raise ModelArgsError(f"model_args {err.key}: {err.message}") from err
        except TypeError as err:  # a field given a value its dataclass cannot take
            raise ModelArgsError(f"model_args sampler options: {err}") from err

        try:
            with quiet_transformers():
                self.tokenizer = load_tokenizer(base_dir)
        except CheckpointError as err:
            raise ModelArgsError(f"model_args pretrained: {err}") from err
        try:
            self.config = model_class(base_dir).config_class.from_file(base_dir / "config.json")
            self.stops = stop_token_ids(self.tokenizer, self.config, base_dir)
            # What LLaDA's EOS options act on, found as generate_cli finds them.
            self.eos_id, self.eot_id = eos_and_eot_ids(self.tokenizer, self.config, base_dir)
        except (CheckpointError, ValueError) as err:  # a config the model classes refuse
            raise ModelArgsError(f"model_args pretrained: {err}") from err
        for key in ("logits_eos_inf", "confidence_eos_eot_inf"):
            if getattr(self.options, key, False) and self.eos_id is None:
                raise ModelArgsError(f"model_args {key}: the tokenizer and config of {base_dir} name no EOS token")
        self.mask_id = self.config.mask_token_id
        self.pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else min(self.stops)
        self.max_length = self.config.max_sequence_length
        if gen_length >= self.max_length:
            raise ModelArgsError(f"model_args gen_length: {gen_length} leaves no room for a prompt in the model's "
                                 f"max_sequence_length {self.max_length}")
        soft_prompt = student_meta.get("soft_prompt")
        latent_positions = soft_prompt.get("latent_answer_positions", 0) if isinstance(soft_prompt, dict) else 0
        if latent_positions and latent_positions != gen_length:
            raise ModelArgsError(f"model_args gen_length: this student's latent enters {latent_positions} answer "
                                 f"positions (latent_answer_positions); use gen_length={latent_positions}")
        template = getattr(self.tokenizer, "chat_template", None)
        if self.chat_mode is True and not template:
            raise ModelArgsError(f"model_args chat_template=on: the tokenizer of {base_dir} has no chat template")
        self.use_chat = bool(template) if self.chat_mode is None else self.chat_mode
        self.template_opening = chat_template_opening(self.tokenizer) if template else ""
        self.harness_renders_template = False

        try:
            with quiet_transformers():
                if self.is_student:
                    self.model = Student.from_pretrained(path, base=base_dir if base is not None else None,
                                                         dtype=dtype, device=device)
                else:
                    self.model = load_model(base_dir, dtype=dtype, device=device)
        except CheckpointError as err:
            raise ModelArgsError(f"model_args {'base' if base is not None else 'pretrained'}: {err}") from err
        check_answer_length(self.model, gen_length, self.options.block_length)  # warns outside a student's training
        self._device = torch.device(device)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ construction from lm-eval

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LLaDAMeanFlowLM":
        return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "LLaDAMeanFlowLM":
        """lm-eval passes its own ``--batch_size`` (1 unless given) and ``--device`` (cuda:0 unless
        given) beside model_args; its default merge would refuse a model_arg of the same name. Here
        model_args win and the harness's values fill in what they leave out."""
        harness = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**arg_dict, harness=harness)

    def _resolve_device(self, asked: Any, from_harness: Any) -> str:
        """model_args' ``device`` must exist here. lm-eval's ``--device`` is cuda:0 when not given, so
        where it does not exist it is replaced by the default (cuda if available, else cpu), with a
        warning, as lm-eval's own hf model does."""
        if asked is not None:
            return check_device(asked, "model_args device")
        fallback = "cuda" if torch.cuda.is_available() else "cpu"
        if from_harness is None:
            return fallback
        try:
            return check_device(from_harness, "--device")
        except ModelArgsError as err:
            logger.warning("%s: %s; using %s", MODEL_NAME, err, fallback)
            return fallback

    # ------------------------------------------------------------------ what lm-eval asks of a model

    @property
    def tokenizer_name(self) -> str:
        """Fingerprints lm-eval's request cache of chat-rendered requests."""
        return str(self.base_dir).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the one asked for by name, else the default
            template = template.get(chat_template if isinstance(chat_template, str) else "default")
        return template or None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's ``--apply_chat_template`` renders each context through here; the contexts that
        reach ``generate_until`` are then already rendered (BOS included) and are tokenized as they are."""
        if self.chat_mode is False:
            raise ModelArgsError("model_args chat_template=off contradicts lm-eval's --apply_chat_template; drop "
                                 "one of them")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelArgsError(f"--apply_chat_template: the tokenizer of {self.base_dir} has no chat template")
        self.harness_renders_template = True
        try:
            return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)
        except Exception:  # jinja's TemplateError: a template without a system role (lm-eval's hf model does the same)
            self._warn_once("system", "the chat template refused a system turn; it is left out")
            history = [message for message in chat_history if message["role"] != "system"]
            return self.tokenizer.apply_chat_template(history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        """The settings the run resolved (defaults included), recorded in lm-eval's results."""
        return {
            "llada_mf_kind": "student" if self.is_student else "checkpoint",
            "llada_mf_base": str(self.base_dir),
            "llada_mf_sampler": dataclasses.asdict(self.options),
            "llada_mf_chat_template": self.use_chat,
            "llada_mf_seed": self.seed,
            "llada_mf_mc_num": self.mc_num,
        }

    # ------------------------------------------------------------------ prompts

    def is_rendered(self, context: str) -> bool:
        """Whether lm-eval already put ``context`` through the chat template."""
        if self.template_opening:
            return context.startswith(self.template_opening)
        return self.harness_renders_template

    def prompt_text(self, context: str) -> tuple[str, bool]:
        """(the text to tokenize, whether it holds its special tokens already). As ``generate_cli``'s
        ``encode_prompts``: wrapped as one user turn when the chat template is on; a rendered template
        holds BOS, plain text gets the tokenizer's special tokens."""
        if self.is_rendered(context):
            return context, True
        if self.use_chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": context}],
                                                      add_generation_prompt=True, tokenize=False)
            return text, True
        return context, False

    def encode(self, text: str, has_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not has_special_tokens)["input_ids"]

    def prompt_ids(self, context: str) -> list[int]:
        """The token ids a generation starts from."""
        return self.encode(*self.prompt_text(context))

    # ------------------------------------------------------------------ generate_until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request decoded with the model_args' sampler settings, ``batch_size`` at a time (longest
        prompts first, so padding is small and memory runs out early if at all); completion i (its
        position in ``requests``) of a latent student decodes given its own latent, or its greedy anchor."""
        from tqdm import tqdm

        texts, stops_of, caps = [], [], []
        for context, gen_kwargs in (request.args for request in requests):
            until, cap = self.read_gen_kwargs(gen_kwargs or {})
            texts.append(context)
            stops_of.append(until)
            caps.append(cap)
        budget = self.max_length - self.options.gen_length
        prompts = []
        for context in texts:
            ids = self.prompt_ids(context)
            if len(ids) > budget:
                self._warn_once("truncated", f"a prompt longer than {budget} tokens (max_sequence_length "
                                             f"{self.max_length} - gen_length {self.options.gen_length}) keeps its "
                                             "last tokens")
                ids = ids[-budget:]
            prompts.append(ids)
        order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
        anchor = uses_anchor(self.model, self.options.temperature, 1)
        results: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc=f"{MODEL_NAME} generate_until", disable=disable_tqdm or self.rank != 0,
                  file=sys.stderr) as bar:
            for number, start in enumerate(range(0, len(order), self.batch_size)):
                batch = order[start : start + self.batch_size]
                prompt, mask = left_pad([prompts[i] for i in batch], self.pad_id)
                index = torch.tensor(batch)
                predictor = completion_network(self.model, self.seed, index, torch.zeros_like(index), anchor)
                with torch.inference_mode():
                    out = generate(predictor, prompt.to(self.device), self.options, mask_id=self.mask_id,
                                   eos_id=self.eos_id, eot_id=self.eot_id, attention_mask=mask.to(self.device),
                                   generator=batch_generator(self.seed, number, self.device))
                for i, answer in zip(batch, out[:, prompt.shape[1]:].tolist()):
                    text = cut_at_stops(decode_answer(self.tokenizer, answer[: caps[i]], self.stops), stops_of[i])
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        return results

    def read_gen_kwargs(self, gen_kwargs: dict) -> tuple[list[str], int | None]:
        """(stop strings, token cap) of a request; what it asks that the sampler does not do is said once."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(s, str) for s in until):
            raise ValueError(f"generation_kwargs until: must be strings, got {until!r}")
        cap = gen_kwargs.get("max_gen_toks")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise ValueError(f"generation_kwargs max_gen_toks: must be an integer >= 0, got {cap!r}")
        if cap is not None and cap < self.options.gen_length:
            self._warn_once("cap", f"the task's max_gen_toks {cap} is below gen_length {self.options.gen_length}: "
                                   "answers are generated at gen_length and cut to max_gen_toks tokens")
        asked = float(gen_kwargs.get("temperature", 1.0)) if gen_kwargs.get("do_sample") else 0.0
        if "temperature" in gen_kwargs or "do_sample" in gen_kwargs:
            if asked != self.options.temperature:
                self._warn_once("temperature", f"the task asks for temperature {asked} (do_sample="
                                               f"{gen_kwargs.get('do_sample')}); {MODEL_NAME} samples at model_args "
                                               f"temperature={self.options.temperature}")
        ignored = sorted(set(gen_kwargs) - HANDLED_GEN_KWARGS)
        if ignored:
            self._warn_once("ignored", f"generation_kwargs {', '.join(ignored)} are not used by the diffusion sampler")
        return until, cap

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("%s: %s", MODEL_NAME, message)

    # ------------------------------------------------------------------ likelihoods

    def likelihood_network(self):
        """The network whose per-position predictions the estimate scores: the checkpoint, or a student
        with its greedy anchor; a student that draws a latent per completion and has no anchor has only
        a mixture over latents, which this estimate cannot score."""
        if getattr(self.model, "latent_dim", 0) and not getattr(self.model, "has_anchor", False):
            raise NotImplementedError(f"{MODEL_NAME}: this student draws a latent per completion and has no greedy "
                                      "anchor, so it has no single likelihood; use generate_until tasks")
        return sampler_network(self.model, anchor=getattr(self.model, "has_anchor", False))

    def pair_ids(self, context: str, continuation: str) -> Continuation:
        """Token ids of (context, continuation), the context as a prompt (``prompt_text``); trailing
        spaces of the context move to the continuation and the continuation is what tokenizing the
        whole adds after the context's tokens (as lm-eval's hf model and LLaDA's eval do)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        text, special = self.prompt_text(context)
        context_ids = self.encode(text, special)
        whole = self.encode(text + continuation, special)
        return Continuation(context_ids, whole[len(context_ids):])

    def fit(self, pair: Continuation) -> Continuation:
        """The pair within max_sequence_length: the context keeps its last tokens."""
        room = self.max_length - len(pair.target)
        if room < 0:
            raise ValueError(f"{MODEL_NAME}: a continuation of {len(pair.target)} tokens exceeds the model's "
                             f"max_sequence_length {self.max_length}")
        if len(pair.context) > room:
            self._warn_once("context", f"a likelihood context longer than the model's max_sequence_length "
                                       f"{self.max_length} (with its continuation) keeps its last tokens")
            return Continuation(pair.context[len(pair.context) - room:], pair.target)
        return pair

    def mask_draws(self, pair: Continuation) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked (mc_num, L) bool, masked count k (mc_num,)): k stratified over 1..L from one random
        offset (LLaDA's ``_forward_process``, over all mc_num samples at once), each row a uniform
        subset of k positions. Drawn from (seed, the pair's tokens) alone, so a pair gets the same
        estimate whatever the other requests and whatever the batch size."""
        digest = hashlib.sha256(json.dumps([pair.context, pair.target]).encode()).digest()
        key = int.from_bytes(digest[:8], "little") & (2**63 - 1)
        generator = torch.Generator().manual_seed(int(counter_hash(self.seed, LIKELIHOOD_MASK, key)) & (2**63 - 1))
        L, n = len(pair.target), self.mc_num
        offset = int(torch.randint(1, L + 1, (), generator=generator))
        counts = (torch.round(offset + torch.arange(n, dtype=torch.float64) * (L / n)).long() - 1) % L + 1
        ranks = torch.rand(n, L, generator=generator).argsort(dim=1).argsort(dim=1)
        return ranks < counts[:, None], counts

    @torch.inference_mode()
    def elbo(self, pair: Continuation, network) -> float:
        """LLaDA's Monte Carlo estimate of log p(target | context)'s lower bound: the mean over mc_num
        samples of -(L/k) * the summed cross-entropy of the k masked target tokens (cfg_scale as in
        generation: the context masked in the unconditional branch)."""
        P, L = len(pair.context), len(pair.target)
        sequence = torch.tensor(pair.context + pair.target, device=self.device)
        masked, counts = self.mask_draws(pair)
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, self.mc_num, self.batch_size):
            rows = slice(start, start + self.batch_size)
            B = masked[rows].shape[0]
            positions = torch.zeros((B, P + L), dtype=torch.bool, device=self.device)
            positions[:, P:] = masked[rows].to(self.device)
            x = sequence.repeat(B, 1).masked_fill(positions, self.mask_id)
            prompt_index = torch.zeros_like(positions)
            prompt_index[:, :P] = True
            t = (counts[rows] / L).to(self.device)
            logits = guided_hidden(network, x, None, prompt_index, self.options.cfg_scale, self.mask_id, positions,
                                   StepInterval(r=torch.zeros_like(t), t=t)).logits()  # (masked rows, V)
            loss = F.cross_entropy(upcast(logits), sequence.repeat(B, 1)[positions], reduction="none")
            weight = (L / counts[rows].double()).repeat_interleave(counts[rows]).to(self.device)  # row-major, as loss
            total += (loss.double() * weight).sum().cpu()
        return -float(total) / self.mc_num

    @torch.inference_mode()
    def greedy_matches(self, pair: Continuation) -> bool:
        """Whether greedy decoding of len(target) tokens after the context, one token per step (the most
        confident first, as LLaDA's ``suffix_greedy_prediction``), gives the target."""
        L = len(pair.target)
        options = SamplerOptions(gen_length=L, steps=L, cfg_scale=self.options.cfg_scale)
        predictor = completion_network(self.model, self.seed, torch.zeros(1, dtype=torch.long),
                                       torch.zeros(1, dtype=torch.long), uses_anchor(self.model, 0.0, 1))
        prompt = torch.tensor([pair.context], device=self.device)
        out = generate(predictor, prompt, options, mask_id=self.mask_id)
        return out[0, len(pair.context):].tolist() == pair.target

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        network = self.likelihood_network()
        pairs = [self.fit(self.pair_ids(context, continuation)) for context, continuation in
                 (request.args for request in requests)]
        results = []
        for request, pair in zip(tqdm(requests, desc=f"{MODEL_NAME} loglikelihood", file=sys.stderr,
                                      disable=disable_tqdm or self.rank != 0), pairs):
            if not pair.target:
                result = (0.0, True)
            else:
                result = (self.elbo(pair, network), self.check_greedy and self.greedy_matches(pair))
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's rolling windows (``get_rolling_token_windows``, made disjoint) over the text's tokens
        after BOS, sized so that a window with its context fits max_sequence_length; each window's
        estimate given its context, summed per text. No chat template: the texts are documents."""
        from tqdm import tqdm

        network = self.likelihood_network()
        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else min(self.stops)
        results = []
        for request in tqdm(requests, desc=f"{MODEL_NAME} loglikelihood_rolling", file=sys.stderr,
                            disable=disable_tqdm or self.rank != 0):
            (text,) = request.args
            tokens = self.encode(text, True)
            windows = map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=prefix, max_seq_len=self.max_length - 1, context_len=1))
            total = sum(self.elbo(Continuation(list(context), list(target)), network) for context, target in windows)
            results.append(float(total))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
        return results


def cut_at_stops(text: str, until: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (not the first string's first occurrence)."""
    ends = [text.find(stop) for stop in until if stop and stop in text]
    return text[: min(ends)] if ends else text


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line (its arguments, ``lm_eval --help``) with ``llada_mf`` registered; user
    errors in model_args end it with one ``error:`` line."""
    from pipeline.core.cpu_numerics import pin_cpu_numerics

    pin_cpu_numerics()  # the stages' CPU arithmetic, as generate_cli
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except ModelArgsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ != "__main__":
    # Registered by the importable module only: ``python -m`` runs this file a second time as
    # ``__main__``, whose class is a different object under the same name (lm-eval would refuse it).
    register_model(MODEL_NAME)(LLaDAMeanFlowLM)
else:
    from pipeline.lm_eval_model import main as registered_main

    sys.exit(registered_main())
