"""The student: equal to its base at initialization, trainable only through the soft prompt,
differentiable in (inputs_embeds, t), and saved without the base."""

import json
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import CheckpointError
from pipeline.models.llada import LLaDA
from pipeline.models.registry import load_model
from pipeline.student.model import Student
from pipeline.student.soft_prompt import SoftPromptConfig
from tests.conftest import make_checkpoint


@pytest.fixture
def base(any_checkpoint):
    """Each architecture (LLaDA, LLaDA-MoE with every feature): the prefix path is shared, the blocks differ."""
    return load_model(any_checkpoint)


def perturb_gate(student, seed=0):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        student.soft_prompt.prompt_gate.copy_(torch.randn(student.soft_prompt.prompt_gate.shape, generator=g))


@pytest.mark.parametrize("conditioning", ["r_t", "t_interval"])
def test_initial_student_equals_base(base, conditioning):
    student = Student(base, prompt_length=4, conditioning=conditioning)
    ids = torch.randint(0, base.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        for attention in ("sdpa", "math"):
            expected = base(ids, attention_mask=mask, attention=attention)
            for r, t in [(0.0, 1.0), (0.3, 0.3), (torch.tensor([0.1, 0.5, 0.0]), torch.tensor([0.9, 0.5, 0.2]))]:
                u = student(ids, r=r, t=t, attention_mask=mask, attention=attention)
                assert torch.equal(u, expected)  # a zero gate adds exactly zero


def test_initial_latent_student_equals_base_for_any_latent(base):
    student = Student(base, prompt_length=4, latent_dim=6)
    ids = torch.randint(0, base.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(ids)
        for seed in range(3):
            z = 10 * torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(student(ids, r=0.2, t=0.9, latent=z), expected)
        perturb_gate(student)
        a, b = (student(ids, latent=torch.randn(3, 6, generator=torch.Generator().manual_seed(s))) for s in (1, 2))
        assert not torch.allclose(a, b)  # once trained, z changes the output
    with pytest.raises(ValueError, match=r"latent of shape \(3, 6\), got None"):
        student(ids)
    with pytest.raises(ValueError, match="no latent"):
        Student(base, prompt_length=4)(ids, latent=torch.zeros(3, 6))


def test_prefix_shape_and_time_dependence(base):
    student = Student(base, prompt_length=3)
    prefix, gate = student.soft_prompt(torch.tensor([0.0, 0.2]), torch.tensor([1.0, 0.5]))
    c = base.config
    assert prefix.shape == (2, c.n_layers, 2, c.n_kv_heads, 3, c.head_dim)
    assert gate.shape == (c.n_layers, c.n_heads)
    perturb_gate(student)
    ids = torch.randint(0, c.vocab_size, (1, 8))
    with torch.no_grad():
        a, b = student(ids, r=0.0, t=1.0), student(ids, r=0.5, t=1.0)
    assert not torch.allclose(a, base(ids)) and not torch.allclose(a, b)


def test_only_soft_prompt_trains(base):
    student = Student(base, prompt_length=4)
    trainable = [name for name, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("prompt" in name for name in trainable)
    assert not any(p.requires_grad for p in student.base.parameters())
    student.train()
    assert not student.base.training
    perturb_gate(student)
    ids = torch.randint(0, base.config.vocab_size, (2, 8))
    student(ids, r=0.2, t=0.8).logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in student.base.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.soft_prompt.parameters())


def test_jvp_over_embeddings_and_time_matches_finite_differences(any_checkpoint):
    """For LLaDA-MoE, through routed blocks: the routing choice is constant near the point, the
    routing weights are differentiated."""
    base = load_model(any_checkpoint, dtype=torch.float64)
    student = Student(base, prompt_length=4)
    perturb_gate(student, seed=1)
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    z = base.embed(ids).detach()
    r = torch.tensor([0.1, 0.4], dtype=torch.float64)
    t = torch.tensor([0.7, 0.9], dtype=torch.float64)
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dt = torch.ones_like(t)

    def u(z_, t_):
        return student(inputs_embeds=z_, r=r, t=t_, attention="math")

    _, du_dt = torch.func.jvp(u, (z, t), (dz, dt))
    h = 1e-6
    with torch.no_grad():
        fd = (u(z + h * dz, t + h * dt) - u(z - h * dz, t - h * dt)) / (2 * h)
    assert (du_dt - fd).abs().max() / fd.abs().max() < 1e-8


def test_save_load_round_trip(tiny_checkpoint, tmp_path):
    base = LLaDA.from_pretrained(tiny_checkpoint)
    student = Student(base, prompt_length=5, hidden_size=32, conditioning="t_interval")
    perturb_gate(student)
    student.save_pretrained(tmp_path / "student")
    files = sorted(p.name for p in (tmp_path / "student").iterdir())
    assert files == ["soft_prompt.safetensors", "student_config.json"]
    meta = json.loads((tmp_path / "student" / "student_config.json").read_text())
    assert meta["soft_prompt"]["prompt_length"] == 5 and len(meta["base_fingerprint"]) == 16
    loaded = Student.from_pretrained(tmp_path / "student")
    ids = torch.randint(0, base.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids, r=0.1, t=0.6), student(ids, r=0.1, t=0.6))


def test_latent_student_round_trip_records_latent_dim(tiny_checkpoint, tmp_path):
    student = Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=3, latent_dim=5)
    perturb_gate(student)
    student.save_pretrained(tmp_path / "student")
    meta = json.loads((tmp_path / "student" / "student_config.json").read_text())
    assert meta["soft_prompt"]["latent_dim"] == 5
    loaded = Student.from_pretrained(tmp_path / "student")
    assert loaded.latent_dim == 5
    ids, z = torch.randint(0, 20, (2, 7)), torch.randn(2, 5)
    with torch.no_grad():
        assert torch.equal(loaded(ids, latent=z), student(ids, latent=z))


def test_loading_against_another_base_is_refused(tiny_checkpoint, tmp_path):
    student = Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2)
    student.save_pretrained(tmp_path / "student")
    other = make_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(CheckpointError, match="fingerprint"):
        Student.from_pretrained(tmp_path / "student", base=other)
    with pytest.raises(CheckpointError, match="fingerprint"):
        Student.from_pretrained(tmp_path / "student", base=LLaDA.from_pretrained(other))


def test_unsaved_base_cannot_back_a_saved_student(base, tmp_path):
    fresh = type(base)(base.config)
    with pytest.raises(CheckpointError, match="not loaded from a checkpoint"):
        Student(fresh).save_pretrained(tmp_path / "student")


def test_student_ignores_left_padding(base):
    """The prefix sits just before the first real token, whatever the padding (as in training)."""
    student = Student(base, prompt_length=3)
    perturb_gate(student, seed=4)
    ids = torch.randint(0, base.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    padded = torch.cat((torch.zeros(1, 4, dtype=torch.long), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)), dim=1)
    with torch.no_grad():
        for attention in ("sdpa", "math"):
            plain = student(ids, r=0.2, t=0.9, attention=attention)
            assert torch.allclose(student(padded, r=0.2, t=0.9, attention_mask=mask, attention=attention)[:, 4:],
                                  plain, atol=1e-5)


@pytest.mark.parametrize("form", ["zero", "flag"])
def test_the_greedy_anchor_replaces_the_latent(tiny_checkpoint, form):
    """Anchor rows ignore their latent; ``zero`` is z = 0, ``flag`` z = 0 plus its own input (not
    the drawn z = 0); without an anchor, or without a latent, there is none."""
    student = Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2, latent_dim=4, anchor=form)
    with torch.no_grad():
        student.soft_prompt.prompt_gate.fill_(3.0)
        for p in student.soft_prompt.prompt_mlp.parameters():
            p.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 20, (2, 6), generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    anchor = torch.tensor([True, False])
    with torch.no_grad():
        out = student(input_ids=ids, latent=z, anchor=anchor)
        zeros = student(input_ids=ids, latent=torch.zeros(2, 4))
        drawn = student(input_ids=ids, latent=z)
        assert torch.equal(out[1], drawn[1])  # a row that is not the anchor keeps its latent
        assert torch.equal(out[0], student(input_ids=ids, latent=-z, anchor=anchor)[0])
        assert torch.equal(out[0], zeros[0]) == (form == "zero")
    assert SoftPromptConfig(latent_dim=0, anchor="flag").anchor == "none"
    with pytest.raises(ValueError, match="anchor"):
        SoftPromptConfig(anchor="first")
    with pytest.raises(ValueError, match="no greedy anchor"):
        Student(student.base, prompt_length=2, latent_dim=4, anchor="none")(input_ids=ids, latent=z, anchor=anchor)


def test_a_student_saved_before_the_anchor_loads_without_one(tiny_checkpoint, tmp_path):
    student = Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2, latent_dim=4, anchor="none")
    student.save_pretrained(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "student_config.json").read_text())
    del meta["soft_prompt"]["anchor"]  # as written before the anchor existed
    (tmp_path / "s" / "student_config.json").write_text(json.dumps(meta))
    loaded = Student.from_pretrained(tmp_path / "s")
    assert loaded.soft_prompt_config.anchor == "none" and not loaded.has_anchor
    flagged = Student(student.base, prompt_length=2, latent_dim=4, anchor="flag")
    flagged.save_pretrained(tmp_path / "f")
    assert Student.from_pretrained(tmp_path / "f").soft_prompt_config.anchor == "flag"


@pytest.mark.parametrize("damage", ["no_weights", "truncated_weights", "flipped_bit", "config_without_keys",
                                    "config_not_json"])
def test_damaged_student_files_are_a_checkpoint_error(tiny_checkpoint, tmp_path, damage):
    """Each names the file at fault (the CLI and the stages turn it into one error line)."""
    Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2).save_pretrained(tmp_path / "s")
    weights, config = tmp_path / "s" / "soft_prompt.safetensors", tmp_path / "s" / "student_config.json"
    if damage == "no_weights":
        weights.unlink()
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:40])
    elif damage == "flipped_bit":  # still a readable safetensors file: only the recorded digest tells
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "config_without_keys":
        config.write_text(json.dumps({"format": "llada-meanflow-student"}))
    else:
        config.write_text(config.read_text()[:30])
    with pytest.raises(CheckpointError, match=(config if damage.startswith("config") else weights).name):
        Student.from_pretrained(tmp_path / "s")


def test_a_student_saved_before_the_weights_digest_still_loads(tiny_checkpoint, tmp_path):
    Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2).save_pretrained(tmp_path / "s")
    config = tmp_path / "s" / "student_config.json"
    meta = json.loads(config.read_text())
    assert len(meta.pop("soft_prompt_sha256")) == 64
    config.write_text(json.dumps(meta))
    assert Student.from_pretrained(tmp_path / "s").soft_prompt_config.prompt_length == 2


def test_a_code_book_prior_draws_its_fixed_codes_uniformly(tiny_checkpoint, tmp_path):
    """Code c is counter_normal(d, CODEBOOK, c): the same in every process, not stored; a draw from the
    prior is one of the K codes, each about equally often; a Gaussian prior draws what the completion
    latents always were; a saved code-book student reloads with its codes."""
    from pipeline.core.counter_random import CODEBOOK, COMPLETION_LATENT, counter_normal
    from pipeline.generation.noise import completion_latents

    student = Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2, latent_dim=4, codebook_size=6)
    codes = student.soft_prompt.codes
    assert torch.equal(codes, counter_normal(4, CODEBOOK, torch.arange(6))) and "codes" not in student.soft_prompt.state_dict()
    example, draw = torch.arange(600), torch.zeros(600, dtype=torch.long)
    index = student.soft_prompt.prior_codes(7, COMPLETION_LATENT, example, draw)
    assert torch.equal(student.soft_prompt.prior_latents(7, COMPLETION_LATENT, example, draw), codes[index])
    assert torch.bincount(index, minlength=6).min() > 60  # about 100 each
    gaussian = Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2, latent_dim=4).soft_prompt
    assert torch.equal(gaussian.prior_latents(7, COMPLETION_LATENT, example, draw), completion_latents(7, example, draw, 4))
    perturb_gate(student)
    student.save_pretrained(tmp_path / "student")
    loaded = Student.from_pretrained(tmp_path / "student")
    assert loaded.soft_prompt_config.codebook_size == 6 and torch.equal(loaded.soft_prompt.codes, codes)
    with pytest.raises(ValueError, match="codebook_size: needs a latent"):
        SoftPromptConfig(latent_dim=0, codebook_size=4)


def test_a_latent_into_the_answer_positions_starts_at_the_base_and_round_trips(tiny_checkpoint, tmp_path):
    """latent_answer_positions G: z -> (G, width) added to the last G positions' embeddings, zero at
    initialization (the student equals its base for any z); once trained, z changes the answer
    positions' inputs (not the prompt's), the anchor's rows get none, and the map is saved; a student
    built for G answer tokens refuses to decode another length."""
    from pipeline.generation.decode import check_answer_length

    base = LLaDA.from_pretrained(tiny_checkpoint)
    student = Student(base, prompt_length=2, latent_dim=3, latent_answer_positions=4)
    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student(ids, latent=z), base(input_ids=ids))
        student.soft_prompt.answer_embedding.weight.normal_(generator=torch.Generator().manual_seed(1))
        added = student.soft_prompt.answer_inputs(z)  # (2, 4, width)
        assert added.shape == (2, 4, base.embedding_weight.shape[-1])
        embeds = base.embed(ids)
        expected = base(inputs_embeds=torch.cat((embeds[:, :5], embeds[:, 5:] + added), dim=1))
        assert torch.equal(student(ids, latent=z), expected)
        anchored = student.soft_prompt.answer_inputs(z, anchor=torch.tensor([True, False]))
        assert anchored[0].abs().max() == 0 and torch.equal(anchored[1], added[1])
    student.save_pretrained(tmp_path / "student")
    loaded = Student.from_pretrained(tmp_path / "student")
    with torch.no_grad():
        assert torch.equal(loaded(ids, latent=z), student(ids, latent=z))
    check_answer_length(loaded, 4)
    with pytest.raises(CheckpointError, match="enters 4 answer positions.*cannot decode answers of 7 tokens"):
        check_answer_length(loaded, 7)
    with pytest.raises(ValueError, match="latent_answer_positions: needs a latent"):
        SoftPromptConfig(latent_dim=0, latent_answer_positions=4)


def test_a_copied_student_finds_its_base_or_says_how_to_give_it(tiny_checkpoint, tmp_path, monkeypatch):
    """The base is recorded as given (relative to the working directory), with its absolute path;
    a student copied elsewhere, loaded from another directory, still finds it; with the base moved
    away, the error names what was tried and --base; base= overrides."""
    import shutil

    monkeypatch.chdir(tiny_checkpoint.parent)
    student = Student(LLaDA.from_pretrained("teacher"), prompt_length=2)
    student.save_pretrained("student", trained_for={"prompt_length": 14, "gen_length": 7, "block_length": 7})
    meta = json.loads((tmp_path / "student" / "student_config.json").read_text())
    assert meta["base"] == "teacher" and meta["base_absolute"] == str(tiny_checkpoint.resolve())
    assert meta["trained_for"] == {"prompt_length": 14, "gen_length": 7, "block_length": 7}
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "student", elsewhere / "copy")
    monkeypatch.chdir(elsewhere)
    loaded = Student.from_pretrained("copy")
    assert loaded.base.source_path.resolve() == tiny_checkpoint.resolve() and loaded.trained_for["gen_length"] == 7
    shutil.move(str(tiny_checkpoint), str(tmp_path / "moved"))
    with pytest.raises(CheckpointError, match=r"copy: the student's base checkpoint is not found \(tried teacher, "
                                              r".*teacher\); pass the base directory: --base DIR"):
        Student.from_pretrained("copy")
    assert Student.from_pretrained("copy", base=tmp_path / "moved").soft_prompt_config.prompt_length == 2


def test_a_hub_base_is_recorded_with_its_revision(tiny_checkpoint, tmp_path, monkeypatch):
    from pipeline.student import model as student_model
    from pipeline.student.distillation import teacher_reference
    from pipeline.teacher.artifact import TeacherRecord

    record = TeacherRecord(checkpoint="GSAI-ML/LLaDA-8B-Instruct", fingerprint="f", mask_token_id=2,
                           tokenizer_sha256="t", builtin=False)
    snapshot = tmp_path / "hub" / "models--GSAI-ML--LLaDA-8B-Instruct" / "snapshots" / "0a1b2c"
    assert teacher_reference(tmp_path / "artifacts" / "teacher", record, snapshot) == (
        "GSAI-ML/LLaDA-8B-Instruct", "0a1b2c")
    builtin = TeacherRecord(checkpoint=".", fingerprint="f", mask_token_id=2, tokenizer_sha256="t", builtin=True)
    assert teacher_reference(Path("artifacts/teacher"), builtin, snapshot) == ("artifacts/teacher", None)

    Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2).save_pretrained(
        tmp_path / "s", base="GSAI-ML/LLaDA-8B-Instruct", base_revision="0a1b2c")
    assert Student.base_path_of(tmp_path / "s") == tiny_checkpoint  # the local copy it was saved from
    snapshot = tiny_checkpoint.rename(tmp_path / "downloaded")  # gone from here: the hub has it
    asked = []
    monkeypatch.setattr(student_model, "resolve_checkpoint", lambda name, revision=None: asked.append(
        (name, revision)) or snapshot)
    assert Student.base_path_of(tmp_path / "s") == snapshot
    assert asked == [("GSAI-ML/LLaDA-8B-Instruct", "0a1b2c")]  # the revision trained on, not the newest


def test_another_checkpoint_at_the_given_path_is_passed_over(tmp_path, monkeypatch):
    """The base is recorded as given, relative to the working directory: run from elsewhere, that
    path may hold another checkpoint (another project's artifacts/teacher); its fingerprint differs,
    so the absolute path recorded beside it is used."""
    from tests.conftest import make_checkpoint

    first = make_checkpoint(tmp_path / "a" / "artifacts" / "teacher", seed=0)
    make_checkpoint(tmp_path / "b" / "artifacts" / "teacher", seed=1)
    monkeypatch.chdir(tmp_path / "a")
    Student(LLaDA.from_pretrained("artifacts/teacher"), prompt_length=2).save_pretrained(tmp_path / "s")
    monkeypatch.chdir(tmp_path / "b")
    assert Student.base_path_of(tmp_path / "s") == first.resolve()
    assert Student.from_pretrained(tmp_path / "s").soft_prompt_config.prompt_length == 2


def test_decoding_another_length_than_trained_warns_once(tiny_checkpoint, tmp_path):
    import warnings

    from pipeline.generation.decode import check_answer_length

    Student(LLaDA.from_pretrained(tiny_checkpoint), prompt_length=2).save_pretrained(
        tmp_path / "s", trained_for={"prompt_length": 14, "gen_length": 8, "block_length": 4})
    student = Student.from_pretrained(tmp_path / "s")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_answer_length(student, 8, 4)
        check_answer_length(student, 8)  # one block: one-step decoding, always in range
        assert not caught
        check_answer_length(student, 16, 4)
        check_answer_length(student, 32, 8)
    assert len(caught) == 1 and "trained for gen_length 8; decoding with gen_length 16" in str(caught[0].message)
