"""Shared fixtures: the reference checkpoint, and tiny random checkpoints with a char tokenizer.

Tests compute with the stages' pinned CPU arithmetic, so that results computed in the test process
and in a stage subprocess can be compared bit for bit."""

from __future__ import annotations

import socket
from pathlib import Path

from pipeline.core.cpu_numerics import pin_cpu_numerics

pin_cpu_numerics()  # before torch computes anything

import pytest
import torch

from pipeline.data.tasks import ALPHABET
from pipeline.data.tokenizer import MASK, build_char_tokenizer
from pipeline.models.llada import LLaDA, LLaDAConfig
from pipeline.models.llada_moe import LLaDAMoE, LLaDAMoEConfig

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE_CHECKPOINT = FIXTURES / "llada_tiny"
REFERENCE_MOE_CHECKPOINT = FIXTURES / "llada_moe_tiny"

# Two float64 computations of one value that sum in another order (a GEMM over a subset of rows, a
# chunked reduction, another process) agree to rounding, not bit for bit: which bits a BLAS gives
# depends on the CPU (MKL on Intel reproduces a subset's bits; on AMD it does not). A relative 1e-12
# is thousands of float64 ulps times these tests' reduction lengths, and a millionth of any real bug.
FLOAT64_ROUNDING = 1e-12


def assert_float64_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal up to float64 rounding: elementwise relative, with an absolute floor scaled to the tensor
    (an element that should cancel to zero is a sum of rounding errors of the tensor's size)."""
    assert actual.dtype == expected.dtype == torch.float64, what
    floor = FLOAT64_ROUNDING * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=FLOAT64_ROUNDING, atol=floor, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="session")
def reference_checkpoint() -> Path:
    """A tiny random LLaDA written by the reference modeling code, with its expected logits."""
    return REFERENCE_CHECKPOINT


def tiny_config(vocab_size: int, mask_token_id: int, **overrides) -> LLaDAConfig:
    fields = dict(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64, vocab_size=vocab_size,
        rope_theta=10000.0, max_sequence_length=64, mask_token_id=mask_token_id, eos_token_id=0, pad_token_id=0,
    )
    fields.update(overrides)
    return LLaDAConfig(**fields)


def make_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny LLaDA (grouped-query attention) saved with a char tokenizer at ``path``."""
    tokenizer = build_char_tokenizer(ALPHABET)
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids(MASK), **overrides)
    model = LLaDA(config).init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "teacher")


def one_step_inputs(base, samples: int, prompt_length: int, gen_length: int, seed: int = 5):
    """An untrained latent student on ``base`` and the inputs of a one-step objective on 2 random prompts:
    (student, prompt ids (2, Lp), prompt mask, latent (2, 3), sampling uniforms (2, samples, G))."""
    from pipeline.student.model import Student

    student = Student(base, prompt_length=2, hidden_size=8, latent_dim=3)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, base.config.vocab_size, (2, prompt_length), generator=g)
    latent = torch.randn(2, 3, generator=g)
    uniforms = torch.rand(2, samples, gen_length, generator=g, dtype=torch.float64)
    return student, prompt, torch.ones_like(prompt), latent, uniforms


def tiny_moe_config(vocab_size: int, mask_token_id: int, **overrides) -> LLaDAMoEConfig:
    """Every LLaDA-MoE feature at once: a dense first layer, a shared expert, GQA, partial rotary,
    an expert bias."""
    fields = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
        num_experts=6, num_experts_per_tok=2, expert_intermediate_size=16, dense_intermediate_size=40,
        shared_expert_intermediate_size=24, moe_layer_freq=[0, 1], moe_router_enable_expert_bias=True,
        partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=64, mask_token_id=mask_token_id,
        eos_token_id=0, pad_token_id=0,
    )
    fields.update(overrides)
    return LLaDAMoEConfig(**fields)


def random_moe(config: LLaDAMoEConfig, seed: int = 0, std: float = 0.2) -> LLaDAMoE:
    """A random LLaDA-MoE with a nonzero expert bias (so the bias has an effect to check)."""
    generator = torch.Generator().manual_seed(seed)
    model = LLaDAMoE(config).init_weights(std=std, generator=generator)
    for block in model.blocks:
        if getattr(block.mlp, "expert_bias", None) is not None:
            block.mlp.expert_bias.copy_(0.1 * torch.randn(config.num_experts, generator=generator))
    return model


def make_moe_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny LLaDA-MoE saved with the char tokenizer at ``path``."""
    tokenizer = build_char_tokenizer(ALPHABET)
    config = tiny_moe_config(len(tokenizer), tokenizer.convert_tokens_to_ids(MASK), **overrides)
    random_moe(config, seed).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(params=["llada", "llada_moe"])
def any_checkpoint(request, tmp_path) -> Path:
    """A tiny random checkpoint of each architecture."""
    make = make_checkpoint if request.param == "llada" else make_moe_checkpoint
    return make(tmp_path / request.param)


def make_workdir(path: Path, train_per_task: int = 30, gen_length: int = 7, **model_overrides) -> Path:
    """A stage working directory with ``data/`` (built-in tasks, tiny) and ``artifacts/teacher/``
    (a random tiny LLaDA recorded as the teacher), as the prepare_data and teacher stages leave it."""
    from pipeline.data.params import DataParams
    from pipeline.data.prepare import prepare_data
    from pipeline.models.checkpoint_io import checkpoint_fingerprint
    from pipeline.teacher.artifact import TeacherRecord, tokenizer_hash

    params = DataParams(train_per_task=train_per_task, val_per_task=2, test_per_task=2, gen_length=gen_length)
    prepare_data(params, build_char_tokenizer(ALPHABET), path / "data")
    teacher = make_checkpoint(path / "artifacts" / "teacher", max_sequence_length=params.prompt_length + params.gen_length,
                              **model_overrides)
    TeacherRecord(checkpoint=".", fingerprint=checkpoint_fingerprint(teacher), mask_token_id=2,
                  tokenizer_sha256=tokenizer_hash(teacher), builtin=True).save(teacher)
    return path


def make_cached_workdir(path: Path, cache: dict, train_per_task: int) -> Path:
    """``make_workdir`` plus a stage-one cache (``artifacts/cache``) built with ``cache`` params."""
    from pipeline.cache.fill import cache_header, fill_cache, load_train_split
    from pipeline.cache.params import CacheParams
    from pipeline.data.layout import Layout
    from pipeline.teacher.artifact import load_teacher

    work = make_workdir(path, train_per_task=train_per_task)
    params = CacheParams(**cache)
    model, _, record = load_teacher(work / "artifacts" / "teacher")
    layout = Layout.load(work / "data")
    fill_cache(model, load_train_split(work / "data", None), layout, params, work / "artifacts" / "cache",
               cache_header(record, layout, params, work / "data", model))
    return work


def free_port() -> int:
    """A TCP port free on localhost now (a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
