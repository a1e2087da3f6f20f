"""LLaDA's reference sampler (block decoding, low-confidence remasking, unsupervised CFG), batched,
and one-step generation. The command line is ``pipeline.generate_cli``.

The sampler follows the official LLaDA / LLaDA-MoE ``generate`` (the reference inference code): the answer region starts
fully masked; it is split into blocks filled left to right; each block gets ``steps / num_blocks``
steps, and each step commits the scheduled number of masked tokens of the current block, picking
the most confident predictions (``low_confidence``) or random ones (``random``); the others stay
masked. ``temperature > 0`` samples with Gumbel noise in float64. ``cfg_scale = w > 0`` runs the
unconditional branch (prompt replaced by mask tokens) and uses ``un + (w + 1) * (cond - un)``.
LLaDA-8B's ``generate.py`` adds two EOS options (its Appendix B.4; LLaDA-8B-Instruct's published
results use them): ``logits_eos_inf`` and ``confidence_eos_eot_inf`` (``SamplerOptions``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from pipeline.generation.noise import GeneratorNoise, Noise, gumbel_perturbed
from pipeline.models.layers import upcast

Remasking = Literal["low_confidence", "random"]


@dataclasses.dataclass(frozen=True)
class StepInterval:
    """The time interval a sampler step crosses, per row: the masked fraction of the answer before
    the step (t) and after it (r). A teacher ignores it; a student is called as u(x_t, r, t)."""

    r: torch.Tensor
    """(B,) masked fraction after the step."""
    t: torch.Tensor
    """(B,) masked fraction before the step."""

    def repeat(self, times: int) -> "StepInterval":
        """The interval of rows stacked ``times`` times (CFG's unconditional copies)."""
        return StepInterval(self.r.repeat(times), self.t.repeat(times))


@dataclasses.dataclass(frozen=True)
class SamplerNetwork:
    """A network split at its LM head, as the sampler and stage one call it: ``hidden(input_ids (B, T),
    attention_mask (B, T) or None, interval)`` runs the trunk once, (B, T, C), at the step's
    ``StepInterval`` (None: the one-step point r = 0, t = 1); ``head`` maps any rows of hidden
    states (N, C) to logits (N, V), so logits exist only where they are needed. ``sampler_network``
    builds one for a LLaDA or a Student."""

    hidden: Callable[[torch.Tensor, "torch.Tensor | None", "StepInterval | None"], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]


def as_sampler_network(model: "SamplerNetwork | Callable") -> SamplerNetwork:
    """``model`` itself, or a plain function (input_ids, attention_mask) -> logits (B, T, V) (a
    network without a trunk/head split or a time input, or a scripted one in tests) seen as a trunk
    whose "hidden states" are its logits and an identity head: it works, at its (B, T, V) cost."""
    if isinstance(model, SamplerNetwork):
        return model
    return SamplerNetwork(hidden=lambda ids, mask, interval: model(ids, mask), head=identity_head)


def identity_head(rows: torch.Tensor) -> torch.Tensor:
    """The head of a predictor whose "hidden states" are already logits."""
    return rows


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each step (B, steps): an even split, the remainder on the first steps."""
    total = mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base, remainder = total // steps, total % steps
    step = torch.arange(steps, device=mask_index.device)[None, :]  # (1, steps)
    return base + (step < remainder).long()


@dataclasses.dataclass
class HiddenRows:
    """The trunk's hidden states at selected positions, and their (guided) logits for any slice of rows."""

    cond: torch.Tensor
    """(N, C) at the selected positions, row-major."""
    uncond: torch.Tensor | None
    """(N, C) the unconditional branch's (CFG), None without guidance."""
    head: Callable[[torch.Tensor], torch.Tensor]
    cfg_scale: float = 0.0

    def logits(self, rows: slice = slice(None)) -> torch.Tensor:
        """(n, V) logits of ``rows``; with CFG ``un + (w + 1) * (cond - un)``, the two branches run
        through the head as stacked rows."""
        if self.uncond is None:
            return self.head(self.cond[rows])
        cond, un = self.head(torch.cat((self.cond[rows], self.uncond[rows]))).chunk(2)  # (n, V) each
        return un + (self.cfg_scale + 1) * (cond - un)


def guided_hidden(
    model: SamplerNetwork,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_index: torch.Tensor,
    cfg_scale: float,
    mask_id: int,
    positions: torch.Tensor,
    interval: StepInterval | None = None,
) -> HiddenRows:
    """The trunk of ``model`` once on ``x`` (B, T) at ``interval``, kept at ``positions`` (B, T)
    bool; with ``cfg_scale > 0`` also on the unconditional input (prompt positions replaced by
    ``mask_id``), in the same batch. ``.logits()`` gives the (guided) logits of those positions only."""
    if cfg_scale <= 0:
        return HiddenRows(model.hidden(x, attention_mask, interval)[positions], None, model.head)
    unconditional = x.masked_fill(prompt_index, mask_id)
    both = torch.cat((x, unconditional), dim=0)
    mask = None if attention_mask is None else torch.cat((attention_mask, attention_mask), dim=0)
    cond, un = model.hidden(both, mask, None if interval is None else interval.repeat(2)).chunk(2, dim=0)
    return HiddenRows(cond[positions], un[positions], model.head, cfg_scale)


@dataclasses.dataclass
class Trajectory:
    """What the sampler did. It never re-masks a committed token, so the state after step k is the
    prompt plus the answer positions with ``reveal_step < k`` (the others masked)."""

    sequences: torch.Tensor
    """(B, Lp + gen_length) final tokens."""
    reveal_step: torch.Tensor
    """(B, gen_length) int16: the step (0-based, counted over all blocks) that committed each position."""
    reveal_topk_ids: torch.Tensor | None = None
    """(B, gen_length, k) int32, with ``record_top_k = k``: the top-k ids of the (guided) logits'
    log-softmax at each position's reveal step, descending."""
    reveal_topk_logprobs: torch.Tensor | None = None
    """(B, gen_length, k) float32: their log-probs (over the full vocabulary)."""


class SamplerOptionError(ValueError):
    """A sampler setting the sampler cannot run. ``key`` names the option (``steps``,
    ``block_length``, ...), so a caller can name its own key for it (a flag, a params key)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerOptions:
    """How LLaDA's sampler decodes an answer, checked once here for every caller (the generate CLI,
    the evaluation, stage one's rollouts, validation during training)."""

    gen_length: int
    """Answer positions to fill."""
    steps: int
    """Forward passes (network calls; CFG sends each row twice): at most ``gen_length``, a multiple of
    the number of blocks. 1 with one block is one-step generation."""
    block_length: int | None = None
    """Semi-autoregressive block length, dividing ``gen_length``; None: one block."""
    temperature: float = 0.0
    """0: greedy; > 0: Gumbel-max sampling at this temperature."""
    cfg_scale: float = 0.0
    """Unsupervised classifier-free guidance w: ``un + (w + 1)(cond - un)``; 0: none."""
    remasking: Remasking = "low_confidence"
    """Which predictions a step commits: the most confident ones, or random ones."""
    logits_eos_inf: bool = False
    """LLaDA's ``logits_eos_inf``: the EOS logit is -inf before tokens are chosen, so no EOS is ever
    generated and the answer fills all ``gen_length`` positions (LLaDA-8B-Instruct on HumanEval).
    Needs the sampler's ``eos_id``."""
    confidence_eos_eot_inf: bool = False
    """LLaDA's ``confidence_eos_eot_inf``: a position predicted to be EOS or end-of-turn is scored
    with those two logits at -inf, i.e. confidence 0, so it is committed after every other masked
    position of its block (the other positions' confidences are renormalised without those two tokens,
    as in LLaDA). An instruct model trained on EOS-padded answers otherwise commits the padding
    first and answers too briefly (LLaDA-8B-Instruct on GSM8K, MATH, GPQA, MBPP). Needs ``eos_id``
    (``eot_id`` when the tokenizer has one); ``low_confidence`` remasking only (LLaDA's random
    remasking ignores it)."""

    def __post_init__(self) -> None:
        if self.block_length is None:
            object.__setattr__(self, "block_length", self.gen_length)
        for key in ("gen_length", "block_length", "steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise SamplerOptionError(key, f"must be an integer >= 1, got {getattr(self, key)!r}")
        if self.gen_length % self.block_length:
            raise SamplerOptionError("block_length", f"gen_length {self.gen_length} is not a multiple of {self.block_length}")
        if self.steps % self.num_blocks or self.steps > self.gen_length:
            raise SamplerOptionError("steps", f"{self.steps} steps do not fit gen_length {self.gen_length} in "
                                     f"{self.num_blocks} block(s) (at most {self.gen_length}, a multiple of {self.num_blocks})")
        for key in ("temperature", "cfg_scale"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise SamplerOptionError(key, f"must be a finite number >= 0, got {getattr(self, key)!r}")
        if self.remasking not in ("low_confidence", "random"):
            raise SamplerOptionError("remasking", f"must be 'low_confidence' or 'random', got {self.remasking!r}")
        for key in ("logits_eos_inf", "confidence_eos_eot_inf"):
            if not isinstance(getattr(self, key), bool):
                raise SamplerOptionError(key, f"must be true or false, got {getattr(self, key)!r}")
        if self.confidence_eos_eot_inf and self.remasking != "low_confidence":
            raise SamplerOptionError("confidence_eos_eot_inf", "changes the low-confidence score only; with "
                                     f"remasking {self.remasking!r} it would do nothing")

    @classmethod
    def one_step(cls, gen_length: int, **options) -> "SamplerOptions":
        """The whole answer in one forward pass (the student's inference; the teacher's baseline)."""
        return cls(gen_length=gen_length, steps=1, **options)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


def generate(model: SamplerNetwork, prompt: torch.Tensor, options: SamplerOptions, *, mask_id: int,
             eos_id: int | None = None, eot_id: int | None = None, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: Noise | None = None) -> torch.Tensor:
    """Fill ``options.gen_length`` masked positions after ``prompt`` (B, Lp); returns (B, Lp +
    gen_length). As ``sample_trajectory``."""
    return sample_trajectory(model, prompt, options, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id,
                             attention_mask=attention_mask, generator=generator, noise=noise).sequences


def eos_options_ids(options: SamplerOptions, eos_id: int | None, eot_id: int | None) -> tuple[list[int], list[int]]:
    """The token ids whose logit ``options`` sets to -inf (``logits_eos_inf``), and those whose
    confidence it zeroes (``confidence_eos_eot_inf``). The ids are the tokenizer's, not LLaDA-8B's
    numbers (which LLaDA's ``generate.py`` hard-codes), so every model has them right."""
    if (options.logits_eos_inf or options.confidence_eos_eot_inf) and eos_id is None:
        option = "logits_eos_inf" if options.logits_eos_inf else "confidence_eos_eot_inf"
        raise ValueError(f"{option} needs the EOS token id (eos_id)")
    banned = [eos_id] if options.logits_eos_inf else []
    demoted = [i for i in dict.fromkeys((eos_id, eot_id)) if i is not None] if options.confidence_eos_eot_inf else []
    return banned, demoted


@torch.no_grad()
def sample_trajectory(
    model: SamplerNetwork,
    prompt: torch.Tensor,
    options: SamplerOptions,
    *,
    mask_id: int,
    eos_id: int | None = None,
    eot_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Noise | None = None,
    record_top_k: int = 0,
) -> Trajectory:
    """LLaDA's sampler on ``prompt`` (B, Lp), recording when each answer position was committed.

    ``attention_mask`` (B, Lp) marks real prompt tokens (left padding is 0); the answer is always
    attended. ``mask_id`` is the model's mask token (LLaDA-8B 126336, LLaDA-MoE 156895, the built-in
    teacher's own). ``eos_id`` and ``eot_id`` are the tokenizer's end-of-text and end-of-turn
    tokens (LLaDA-8B 126081 and 126348, ``<|eot_id|>``), needed by the EOS options only: ``eos_id``
    by both, ``eot_id`` by ``confidence_eos_eot_inf`` when the tokenizer has such a token.
    ``SamplerOptions.one_step`` is one-step generation. Randomness
    (Gumbel noise at ``temperature > 0``, ``random`` remasking) comes from ``noise``, by default
    fresh draws from ``generator`` at every step.

    Two deliberate departures from the reference: the mask token is never predicted (the reference
    can "commit" [MASK], which leaves the position masked, spends that step's budget and is revisited
    in later blocks; a trained LLaDA does not do this, a random one does), and noise is drawn only
    for the current block, never for the whole (B, T, V) logits (10 GB in float64 for LLaDA-8B at
    B = 32): with temperature > 0 the draws differ from the reference's, not their distribution.
    Otherwise the output equals the reference's exactly (tested). One more, with
    ``confidence_eos_eot_inf`` at ``temperature > 0``: LLaDA's code zeroes the EOT confidence but
    writes EOS's -inf into its noisy copy of the logits, which is no longer used (at temperature 0
    that copy is the logits themselves); here EOS is demoted at every temperature, as LLaDA documents.
    ``record_top_k`` records the network's distribution, before any of these edits.

    Memory: the trunk runs on the whole sequence, the head only on the current block's masked
    positions (M, V) (CFG stacks the unconditional rows under them); ``CounterNoise`` draws for
    those positions only, ``GeneratorNoise`` for the block (its stream keeps seeded runs unchanged).
    ``model`` is a ``SamplerNetwork`` (``sampler_network``), or a plain function returning full logits
    (see ``as_sampler_network``).
    """
    gen_length, block_length, num_blocks = options.gen_length, options.block_length, options.num_blocks
    temperature, cfg_scale, remasking = options.temperature, options.cfg_scale, options.remasking
    noise = noise if noise is not None else GeneratorNoise(generator)
    banned, demoted = eos_options_ids(options, eos_id, eot_id)
    model = as_sampler_network(model)
    steps_per_block = options.steps_per_block
    B, Lp = prompt.shape
    x = torch.full((B, Lp + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :Lp] = prompt
    prompt_index = x != mask_id
    if attention_mask is not None:
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(B, gen_length)), dim=1)
    rank = torch.arange(block_length, device=x.device)[None, :]  # (1, block)
    reveal_step = torch.full((B, gen_length), -1, dtype=torch.int16, device=x.device)
    if record_top_k:
        reveal_ids = torch.zeros((B, gen_length, record_top_k), dtype=torch.int32, device=x.device)
        reveal_logprobs = torch.zeros((B, gen_length, record_top_k), dtype=torch.float32, device=x.device)

    for block in range(num_blocks):
        offset = block * block_length  # answer position of the block's first token
        window = slice(Lp + offset, Lp + offset + block_length)
        schedule = num_transfer_tokens(x[:, window] == mask_id, steps_per_block)  # (B, steps)
        for i in range(steps_per_block):
            step = block * steps_per_block + i
            current = x[:, window]  # (B, block)
            mask_index = current == mask_id
            positions = torch.zeros_like(prompt_index)
            positions[:, window] = mask_index
            masked = (x[:, Lp:] == mask_id).sum(dim=1)  # (B,) answer positions masked before the step
            interval = StepInterval(r=(masked - schedule[:, i]) / gen_length, t=masked / gen_length)
            # Logits only at the block's masked positions, the only ones a step can commit: (M, V).
            logits = guided_hidden(model, x, attention_mask, prompt_index, cfg_scale, mask_id, positions,
                                   interval).logits()
            if record_top_k:
                top_logprobs, top_ids = torch.log_softmax(upcast(logits), dim=-1).topk(record_top_k, dim=-1)
            logits[..., mask_id] = -torch.inf  # committing [MASK] would be a wasted no-op
            if banned:  # logits_eos_inf
                logits[..., banned] = -torch.inf
            if temperature > 0:
                uniforms = noise.gumbel_uniforms(mask_index, logits.shape[-1], step, offset)  # (M, V)
                x0_masked = torch.argmax(gumbel_perturbed(logits, temperature, uniforms), dim=-1)  # (M,)
            else:
                x0_masked = torch.argmax(logits, dim=-1)
            if remasking == "low_confidence":
                if demoted:  # confidence_eos_eot_inf: tokens chosen, EOS and EOT now score 0 (LLaDA's -inf logits)
                    logits[..., demoted] = -torch.inf
                # fp32 at least: bf16 probabilities tie often and would make the ranking arbitrary.
                p = F.softmax(upcast(logits), dim=-1)
                x0_p = torch.gather(p, -1, x0_masked[:, None]).squeeze(-1)  # (M,)
            else:
                x0_p = noise.remask_uniforms(tuple(mask_index.shape), x.device, step, offset)[mask_index]
            x0 = current.masked_scatter(mask_index, x0_masked)  # (B, block)
            confidence = torch.full(mask_index.shape, -torch.inf, dtype=x0_p.dtype, device=x.device)
            confidence[mask_index] = x0_p
            # Commit the schedule[:, i] most confident masked positions of each row.
            order = confidence.argsort(dim=-1, descending=True, stable=True)
            transfer = torch.zeros_like(mask_index).scatter(1, order, rank < schedule[:, i : i + 1])
            x[:, window] = torch.where(transfer, x0, current)
            reveal_step[:, offset : offset + block_length].masked_fill_(transfer, step)
            if record_top_k:
                answer = slice(offset, offset + block_length)
                committed = transfer[mask_index]  # (M,) the masked positions this step commits
                reveal_ids[:, answer][transfer] = top_ids[committed].int()
                reveal_logprobs[:, answer][transfer] = top_logprobs[committed].float()
    if record_top_k:
        return Trajectory(x, reveal_step, reveal_ids, reveal_logprobs)
    return Trajectory(x, reveal_step)


def sampler_network(model, latent: torch.Tensor | None = None, anchor: bool = False) -> SamplerNetwork:
    """The sampler's view of a network with ``hidden(input_ids=..., attention_mask=...)`` and
    ``head``: a ``LLaDA``, or a ``Student``, called at each step's interval (r, t) (a network with
    only ``forward`` gives its full logits, as ``as_sampler_network``). ``latent`` (B, d): a latent
    student's z per row, the same at every step (CFG's unconditional rows reuse their row's z);
    ``anchor``: every row decodes with the student's greedy anchor in place of a latent."""
    split = hasattr(model, "hidden")
    trunk = model.hidden if split else model
    timed = hasattr(model, "soft_prompt")  # a student: u(x_t, r, t); a teacher has no time input
    if anchor and latent is not None:
        raise ValueError("pass a latent or anchor=True, not both")

    def hidden(ids: torch.Tensor, mask: torch.Tensor | None, interval: StepInterval | None) -> torch.Tensor:
        kwargs = {}
        if timed and interval is not None:
            kwargs.update(r=interval.r, t=interval.t)
        if anchor:
            kwargs.update(latent=torch.zeros(ids.shape[0], model.latent_dim, device=ids.device),
                          anchor=torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device))
        elif latent is not None:
            kwargs["latent"] = latent.to(ids.device).repeat(ids.shape[0] // latent.shape[0], 1)  # (B or 2B, d)
        return trunk(input_ids=ids, attention_mask=mask, **kwargs)

    return SamplerNetwork(hidden=hidden, head=model.head if split else identity_head)
