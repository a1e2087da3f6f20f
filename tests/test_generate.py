"""The batched sampler against the official LLaDA sampler, and its schedule, CFG and determinism
with scripted fake models."""

import pytest
import torch

from pipeline.cache.rollouts import state_after
from pipeline.generation.noise import CounterNoise
from pipeline.generation.sampler import (SamplerNetwork, SamplerOptionError, SamplerOptions, generate,
                                         num_transfer_tokens, sample_trajectory, sampler_network)
from pipeline.models.llada import LLaDA, LLaDAConfig
from tests import reference_sampler

V, MASK = 12, 11


def tiny_llada(seed=0):
    config = LLaDAConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                         vocab_size=V, mask_token_id=MASK, max_sequence_length=64)
    return LLaDA(config).init_weights(std=0.5, generator=torch.Generator().manual_seed(seed)).eval()


class ScriptedModel:
    """Random logits that never predict the mask; records every input it sees."""

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.inputs = []

    def __call__(self, ids, attention_mask=None):
        self.inputs.append(ids.clone())
        logits = torch.randn((*ids.shape, V), generator=self.generator)
        logits[..., MASK] = -1e9
        return logits


@pytest.mark.parametrize(
    "steps,gen_length,block_length,cfg_scale",
    [(8, 8, 4, 0.0), (4, 8, 8, 0.0), (6, 12, 4, 0.0), (3, 12, 4, 1.5), (12, 12, 12, 0.5)],
)
def test_matches_reference_sampler_greedy(steps, gen_length, block_length, cfg_scale):
    model = tiny_llada()
    prompts = torch.randint(0, MASK, (3, 5), generator=torch.Generator().manual_seed(1))
    options = dict(steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale)

    def never_mask(x):  # the reference may "commit" [MASK]; ours never predicts it
        logits = model(x)
        logits[..., MASK] = -1e9  # finite: CFG subtracts two of these
        return logits

    with torch.no_grad():
        batched = generate(sampler_network(model), prompts, SamplerOptions(**options), mask_id=MASK)
        assert (batched != MASK).all()
        for row in range(3):
            expected = reference_sampler.generate(never_mask, prompts[row : row + 1], mask_id=MASK, **options)
            assert torch.equal(batched[row : row + 1], expected)


EOS, EOT = 0, 1


def eos_biased(logits, bias=1.5):
    """A random model's logits pushed towards EOS and EOT, so that both are often predicted."""
    logits[..., [EOS, EOT]] += bias
    return logits


@pytest.mark.parametrize("eos_options", [dict(logits_eos_inf=True), dict(confidence_eos_eot_inf=True),
                                         dict(logits_eos_inf=True, confidence_eos_eot_inf=True)])
@pytest.mark.parametrize("steps,gen_length,block_length,cfg_scale",
                         [(8, 8, 4, 0.0), (6, 12, 4, 0.0), (6, 12, 4, 1.5), (12, 12, 12, 0.0)])
def test_eos_options_match_reference_sampler(eos_options, steps, gen_length, block_length, cfg_scale):
    """LLaDA's logits_eos_inf and confidence_eos_eot_inf, given the tokenizer's EOS and EOT ids, decode
    as LLaDA's generate.py does, on a model that often predicts both."""
    model = tiny_llada(seed=2)
    predictor = sampler_network(model)
    biased = SamplerNetwork(hidden=predictor.hidden, head=lambda rows: eos_biased(predictor.head(rows)))
    prompts = torch.randint(2, MASK, (4, 5), generator=torch.Generator().manual_seed(3))
    options = dict(steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale)

    def never_mask(x):
        logits = eos_biased(model(x))
        logits[..., MASK] = -1e9
        return logits

    with torch.no_grad():
        batched = generate(biased, prompts, SamplerOptions(**options, **eos_options), mask_id=MASK, eos_id=EOS,
                           eot_id=EOT)
        plain = generate(biased, prompts, SamplerOptions(**options), mask_id=MASK)
        assert not torch.equal(batched, plain)  # the option changes the answers of this model
        if eos_options.get("logits_eos_inf"):
            assert (plain[:, 5:] == EOS).any() and not (batched[:, 5:] == EOS).any()
        for row in range(len(prompts)):
            expected = reference_sampler.generate(never_mask, prompts[row : row + 1], mask_id=MASK, eos_id=EOS,
                                                  eot_id=EOT, **options, **eos_options)
            assert torch.equal(batched[row : row + 1], expected)


def position_logits(*preferred):
    """A model whose logits at answer position p (after a one-token prompt) are ``preferred[p] = (token,
    logit)`` against 0 for every other token, whatever the input."""
    table = torch.zeros(1 + len(preferred), V)
    for position, (token, logit) in enumerate(preferred, start=1):
        table[position, token] = logit
    table[:, MASK] = -1e9

    def model(ids, attention_mask=None):
        return table.expand(ids.shape[0], -1, -1).clone()

    return model


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_confidence_eos_eot_inf_commits_eos_and_eot_last(temperature):
    """EOS and EOT predictions are committed after every other position, however confident, at any
    temperature (LLaDA's own code demotes EOS at temperature 0 only; see sample_trajectory)."""
    model = position_logits((EOS, 12.0), (EOT, 11.0), (5, 9.0), (6, 8.0))
    prompt = torch.full((1, 1), 7)

    def reveal(eot_id=EOT, **eos_options):
        options = SamplerOptions(steps=4, gen_length=4, temperature=temperature, **eos_options)
        trajectory = sample_trajectory(model, prompt, options, mask_id=MASK, eos_id=EOS, eot_id=eot_id,
                                       generator=torch.Generator().manual_seed(0))
        assert trajectory.sequences[0, 1:].tolist() == [EOS, EOT, 5, 6]
        return trajectory.reveal_step[0].tolist()

    assert reveal() == [0, 1, 2, 3]  # by confidence
    assert reveal(confidence_eos_eot_inf=True) == [2, 3, 0, 1]
    assert reveal(eot_id=None, confidence_eos_eot_inf=True) == [3, 0, 1, 2]  # a tokenizer without an EOT token


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logits_eos_inf_never_generates_eos(temperature):
    model = position_logits(*[(EOS, 20.0)] * 6)
    options = dict(steps=3, gen_length=6, temperature=temperature)
    prompt = torch.full((3, 1), 7)
    assert (generate(model, prompt, SamplerOptions(**options), mask_id=MASK)[:, 1:] == EOS).all()
    out = generate(model, prompt, SamplerOptions(**options, logits_eos_inf=True), mask_id=MASK, eos_id=EOS,
                   generator=torch.Generator().manual_seed(0))
    assert not (out[:, 1:] == EOS).any() and not (out == MASK).any()


def test_eos_options_need_the_eos_id():
    for option in ("logits_eos_inf", "confidence_eos_eot_inf"):
        with pytest.raises(ValueError, match=f"{option} needs the EOS token id"):
            generate(ScriptedModel(), torch.zeros(1, 2, dtype=torch.long), SamplerOptions.one_step(4, **{option: True}),
                     mask_id=MASK, eot_id=EOT)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_sampling_follows_tempered_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2, 0.1, 1.5, -0.5, 0.3, 9.0])  # [MASK] = 9.0

    def model(ids, attention_mask=None):
        return logits.expand(*ids.shape, V).clone()

    out = generate(model, torch.zeros(40000, 1, dtype=torch.long), SamplerOptions.one_step(1, temperature=temperature),
                   mask_id=MASK, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(out[:, 1], minlength=V).double() / out.shape[0]
    expected = torch.softmax(logits[:MASK].double() / temperature, dim=0)
    assert frequencies[MASK] == 0
    assert (frequencies[:MASK] - expected).abs().max() < 0.01


def test_schedule_and_block_order():
    model = ScriptedModel()
    prompt = torch.randint(0, MASK, (2, 3))
    out = generate(model, prompt, SamplerOptions(steps=6, gen_length=12, block_length=4), mask_id=MASK)
    assert len(model.inputs) == 6 and (out != MASK).all()
    for step, x in enumerate(model.inputs):
        answer = x[:, 3:] == MASK  # (B, 12)
        assert (answer.sum(1) == 12 - 2 * step).all()  # 2 tokens committed per step
        block = step // 2
        assert not answer[:, : 4 * block].any()  # earlier blocks complete
        assert answer[:, 4 * (block + 1) :].all()  # later blocks untouched
        assert torch.equal(x[:, :3], prompt)


def test_uneven_schedule_front_loads_the_remainder():
    assert num_transfer_tokens(torch.ones(2, 10, dtype=torch.bool), 4).tolist() == [[3, 3, 2, 2]] * 2
    model = ScriptedModel()
    generate(model, torch.zeros(1, 2, dtype=torch.long), SamplerOptions(steps=4, gen_length=10), mask_id=MASK)
    assert [int((x == MASK).sum()) for x in model.inputs] == [10, 7, 4, 2]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_one_step_fills_everything(remasking):
    model = ScriptedModel()
    out = generate(model, torch.zeros(2, 3, dtype=torch.long), SamplerOptions.one_step(6, remasking=remasking), mask_id=MASK)
    assert len(model.inputs) == 1 and (out != MASK).all()


def test_cfg_formula():
    w = 2.0
    cond = torch.zeros(V)
    cond[1], cond[2] = 2.0, 1.9
    un = torch.zeros(V)
    un[1], un[2] = 2.5, 1.0
    seen = []

    def model(ids, attention_mask=None):
        seen.append(ids.clone())
        prompt_masked = (ids[:, :2] == MASK).all(dim=1)  # (B,)
        return torch.where(prompt_masked[:, None, None], un, cond).expand(*ids.shape, V).clone()

    prompt = torch.tensor([[3, 4]])
    out = generate(model, prompt, SamplerOptions.one_step(3, cfg_scale=w), mask_id=MASK)
    assert seen[0].shape[0] == 2 and (seen[0][1, :2] == MASK).all() and torch.equal(seen[0][0, :2], prompt[0])
    expected = torch.argmax(un + (w + 1) * (cond - un))
    assert expected == 2 and (out[0, 2:] == expected).all()
    assert (generate(model, prompt, SamplerOptions.one_step(3), mask_id=MASK)[0, 2:] == 1).all()  # unguided argmax


def test_determinism():
    model = tiny_llada(seed=4)
    prompt = torch.randint(0, MASK, (4, 5), generator=torch.Generator().manual_seed(5))
    predictor = sampler_network(model)
    greedy = [generate(predictor, prompt, SamplerOptions(steps=4, gen_length=8, block_length=4), mask_id=MASK)
              for _ in range(2)]
    assert torch.equal(*greedy)

    def sample(seed):
        return generate(predictor, prompt, SamplerOptions(steps=4, gen_length=8, block_length=4, temperature=1.0),
                        mask_id=MASK, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0), sample(0)) and not torch.equal(sample(0), sample(1))


def test_left_padding_matches_unpadded():
    model = tiny_llada(seed=6)
    predictor = sampler_network(model)
    short = torch.randint(0, MASK, (1, 3), generator=torch.Generator().manual_seed(8))
    long = torch.randint(0, MASK, (1, 6), generator=torch.Generator().manual_seed(9))
    batch = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), dim=1), long))
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    options = SamplerOptions(steps=4, gen_length=8, block_length=4, cfg_scale=1.0)
    out = generate(predictor, batch, options, mask_id=MASK, attention_mask=mask)
    assert torch.equal(out[0, 6:], generate(predictor, short, options, mask_id=MASK)[0, 3:])
    assert torch.equal(out[1], generate(predictor, long, options, mask_id=MASK)[0])


@pytest.mark.parametrize("options, key, message", [
    (dict(steps=4, gen_length=10, block_length=4), "block_length", "gen_length 10 is not a multiple of 4"),
    (dict(steps=3, gen_length=8, block_length=4), "steps", "3 steps do not fit gen_length 8 in 2 block(s)"),
    (dict(steps=9, gen_length=8), "steps", "at most 8"),
    (dict(steps=0, gen_length=8), "steps", "must be an integer >= 1"),
    (dict(steps=1, gen_length=8, temperature=float("inf")), "temperature", "finite"),
    (dict(steps=1, gen_length=8, cfg_scale=float("nan")), "cfg_scale", "finite"),
    (dict(steps=1, gen_length=8, remasking="top"), "remasking", "'low_confidence' or 'random'"),
    (dict(steps=1, gen_length=8, remasking="random", confidence_eos_eot_inf=True), "confidence_eos_eot_inf",
     "low-confidence score only"),
    (dict(steps=1, gen_length=8, logits_eos_inf="yes"), "logits_eos_inf", "true or false"),
])
def test_sampler_options_are_checked_once_naming_the_option(options, key, message):
    with pytest.raises(SamplerOptionError, match=f"^{key}: .*{message}".replace("(", r"\(").replace(")", r"\)")) as err:
        SamplerOptions(**options)
    assert err.value.key == key


def test_sampler_options_are_keyword_only_and_the_mask_id_is_required():
    with pytest.raises(TypeError):
        SamplerOptions(8, 1)
    with pytest.raises(TypeError, match="mask_id"):
        generate(ScriptedModel(), torch.zeros(1, 2, dtype=torch.long), SamplerOptions.one_step(4))
    assert SamplerOptions(steps=2, gen_length=8).block_length == 8  # one block by default


@pytest.mark.parametrize("steps,gen_length,block_length,cfg_scale,temperature,remasking", [
    (6, 6, 6, 0.0, 0.0, "low_confidence"),  # one block
    (4, 10, 10, 0.0, 1.0, "low_confidence"),  # uneven schedule
    (6, 12, 4, 0.0, 1.0, "low_confidence"),  # three blocks
    (6, 12, 4, 1.0, 0.7, "random"),  # blocks, CFG (rows doubled), random remasking
])
def test_reveal_steps_reconstruct_every_intermediate_state(steps, gen_length, block_length, cfg_scale, temperature,
                                                           remasking):
    model = ScriptedModel()
    prompt = torch.randint(0, MASK, (3, 4), generator=torch.Generator().manual_seed(2))
    options = SamplerOptions(steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale,
                             temperature=temperature, remasking=remasking)
    trajectory = sample_trajectory(model, prompt, options, mask_id=MASK, noise=CounterNoise(torch.tensor([5, 6, 7])))
    tokens, reveal = trajectory.sequences[:, 4:].numpy(), trajectory.reveal_step.numpy()
    assert reveal.dtype.name == "int16" and reveal.min() == 0 and reveal.max() == steps - 1
    assert len(model.inputs) == steps
    for k, seen in enumerate(model.inputs):  # the network sees the state after k steps at step k
        assert (state_after(prompt.numpy(), tokens, reveal, k, MASK) == seen[:3].numpy()).all()
    assert (state_after(prompt.numpy(), tokens, reveal, steps, MASK) == trajectory.sequences.numpy()).all()


def test_reveal_topk_is_the_teacher_at_the_reveal_state():
    model = tiny_llada(seed=3)
    prompt = torch.randint(0, MASK, (2, 4), generator=torch.Generator().manual_seed(4))
    trajectory = sample_trajectory(sampler_network(model), prompt, SamplerOptions(steps=4, gen_length=8, block_length=4,
                                   temperature=1.0), mask_id=MASK, noise=CounterNoise(torch.tensor([1, 2])), record_top_k=3)
    tokens, reveal = trajectory.sequences[:, 4:].numpy(), trajectory.reveal_step.numpy()
    for b in range(2):
        for p in range(8):
            state = torch.from_numpy(state_after(prompt[b].numpy(), tokens[b], reveal[b], int(reveal[b, p]), MASK))
            with torch.no_grad():
                logprobs = torch.log_softmax(model(state[None])[0, 4 + p], dim=-1)
            values, ids = logprobs.topk(3)
            assert torch.equal(trajectory.reveal_topk_ids[b, p], ids.int())
            assert torch.allclose(trajectory.reveal_topk_logprobs[b, p], values, atol=1e-5)


def test_counter_noise_is_a_function_of_the_seed():
    model = sampler_network(tiny_llada(seed=4))
    prompt = torch.randint(0, MASK, (4, 5), generator=torch.Generator().manual_seed(5))
    options = SamplerOptions(steps=4, gen_length=8, block_length=4, temperature=1.0)
    for fixed in (False, True):
        seeds = torch.tensor([11, 12, 13, 14])
        out = generate(model, prompt, options, mask_id=MASK, noise=CounterNoise(seeds, fixed))
        # the same seed on another row of another batch gives the same completion
        again = generate(model, prompt[[2, 0]], options, mask_id=MASK, noise=CounterNoise(seeds[[2, 0]], fixed))
        assert torch.equal(again, out[[2, 0]])
        assert not torch.equal(generate(model, prompt, options, mask_id=MASK, noise=CounterNoise(seeds + 100, fixed)), out)
    noise = CounterNoise(torch.tensor([3]), fixed=True)
    block = torch.ones(1, 4, dtype=torch.bool)
    field = noise.gumbel_uniforms(block, V, step=0, offset=2)  # (4, V)
    assert torch.equal(noise.gumbel_uniforms(block, V, step=5, offset=2), field)  # one field for all steps
    assert torch.equal(noise.gumbel_uniforms(block[:, :2], V, step=1, offset=4), field[2:])  # keyed by position
    some = torch.tensor([[False, True, False, True]])  # only the positions asked for, the same values
    assert torch.equal(noise.gumbel_uniforms(some, V, step=0, offset=2), field[[1, 3]])
    per_step = CounterNoise(torch.tensor([3]))
    assert not torch.equal(per_step.gumbel_uniforms(block, V, 0, 2), per_step.gumbel_uniforms(block, V, 1, 2))


@pytest.mark.parametrize("fixed", [False, True])
def test_counter_noise_samples_the_tempered_softmax(fixed):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2, 0.1, 1.5, -0.5, 0.3, 9.0])  # [MASK] = 9.0

    def model(ids, attention_mask=None):
        return logits.expand(*ids.shape, V).clone()

    out = generate(model, torch.zeros(40000, 1, dtype=torch.long), SamplerOptions.one_step(1, temperature=0.5),
                   mask_id=MASK, noise=CounterNoise(torch.arange(40000), fixed))
    frequencies = torch.bincount(out[:, 1], minlength=V).double() / out.shape[0]
    expected = torch.softmax(logits[:MASK].double() / 0.5, dim=0)
    assert frequencies[MASK] == 0 and (frequencies[:MASK] - expected).abs().max() < 0.01


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_head_runs_only_on_the_current_blocks_masked_positions(cfg_scale):
    """The trunk sees the whole sequence once per step (CFG: twice the rows), the head only the
    current block's masked positions (CFG: stacked twice), and the output is that of the full logits."""
    model = tiny_llada(seed=7)
    predictor = sampler_network(model)
    head_rows, trunk_rows = [], []

    def hidden(ids, mask, interval):
        trunk_rows.append(ids.shape)
        return predictor.hidden(ids, mask, interval)

    def head(rows):
        head_rows.append(rows.shape[0])
        return predictor.head(rows)

    prompt = torch.randint(0, MASK, (3, 4), generator=torch.Generator().manual_seed(8))
    options = SamplerOptions(steps=6, gen_length=12, block_length=4, cfg_scale=cfg_scale)
    out = generate(SamplerNetwork(hidden=hidden, head=head), prompt, options, mask_id=MASK)
    copies = 2 if cfg_scale else 1
    masked_per_step = [3 * (4 - 2 * (step % 2)) for step in range(6)]  # 2 of 4 block positions committed per step
    assert head_rows == [copies * m for m in masked_per_step]
    assert trunk_rows == [(copies * 3, 16)] * 6
    assert torch.equal(out, generate(lambda ids, mask: model(input_ids=ids, attention_mask=mask), prompt, options,
                                     mask_id=MASK))


class RecordingStudent(torch.nn.Module):
    """A student-shaped network (``soft_prompt``, ``latent_dim``, ``hidden``/``head``) over a tiny LLaDA
    that records the (r, t, z) of every call."""

    latent_dim = 3

    def __init__(self):
        super().__init__()
        self.inner, self.soft_prompt, self.calls = tiny_llada(seed=3), torch.nn.Identity(), []

    def hidden(self, input_ids, attention_mask=None, r=0.0, t=1.0, latent=None):
        self.calls.append((input_ids.clone(), torch.as_tensor(r).clone(), torch.as_tensor(t).clone(), latent.clone()))
        return self.inner.hidden(input_ids=input_ids, attention_mask=attention_mask)

    def head(self, rows):
        return self.inner.head(rows)


@pytest.mark.parametrize("steps,block_length,cfg_scale", [(4, 8, 0.0), (4, 4, 0.0), (2, 8, 1.0), (1, 8, 0.0)])
def test_a_student_is_called_with_each_steps_interval_and_the_same_latent(steps, block_length, cfg_scale):
    """t = the answer's masked fraction before the step, r = after it (the transfer schedule's), for
    every row, blocks and CFG included; the same z at every step (CFG's unconditional rows reuse it)."""
    student, G, B = RecordingStudent(), 8, 3
    z = torch.randn(B, 3, generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(0, MASK, (B, 4), generator=torch.Generator().manual_seed(2))
    options = SamplerOptions(steps=steps, gen_length=G, block_length=block_length, cfg_scale=cfg_scale)
    trajectory = sample_trajectory(sampler_network(student, z), prompt, options, mask_id=MASK)
    assert len(student.calls) == steps
    copies = 2 if cfg_scale else 1
    for step, (ids, r, t, latent) in enumerate(student.calls):
        masked_before = (trajectory.reveal_step >= step).sum(dim=1).float()  # (B,) still masked at the step
        masked_after = (trajectory.reveal_step > step).sum(dim=1).float()
        assert torch.equal(t, (masked_before / G).repeat(copies)) and torch.equal(r, (masked_after / G).repeat(copies))
        assert torch.equal(latent, z.repeat(copies, 1))
        assert torch.equal((ids[:B, 4:] == MASK).sum(dim=1).float(), masked_before)
    assert student.calls[0][2].eq(1).all() and student.calls[-1][1].eq(0).all()  # from t = 1 to r = 0
