"""DiMO-style distribution matching (``pipeline.student.matching_objective``): the surrogate's gradient
on the logits is g; g is the gradient of the forward KL (beta = 0) or the reverse KL (beta = 1) of
the auxiliary's distribution to the teacher's; while the auxiliary equals the teacher, the student
gets no gradient."""

import math

import pytest
import torch

from pipeline.models.llada import LLaDA
from pipeline.student.matching_objective import (arccos_mask, distribution_matching_loss, matching_direction,
                                                 matching_surrogate)
from pipeline.student.model import Student
from tests.conftest import make_checkpoint

PROMPT, GEN = 4, 6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return LLaDA.from_pretrained(make_checkpoint(tmp_path_factory.mktemp("matching") / "m"))


def test_surrogate_gradient_on_the_logits_is_the_direction():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, GEN, 7, dtype=torch.float64, generator=g, requires_grad=True)
    direction = torch.randn(3, GEN, 7, dtype=torch.float64, generator=g)
    where = torch.rand(3, GEN, generator=g) < 0.5
    matching_surrogate(logits, direction, where).backward()
    torch.testing.assert_close(logits.grad, direction * where[..., None] / 3, rtol=0, atol=1e-15)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_direction_is_the_gradient_of_the_kl_mixture(beta):
    """g(beta) = grad over the auxiliary's logits a of (1 - beta) KL(p_T || p_A) + beta KL(p_A || p_T)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 9, dtype=torch.float64, generator=g, requires_grad=True)
    log_p_teacher = torch.log_softmax(torch.randn(5, 9, dtype=torch.float64, generator=g), dim=-1)
    log_p_aux = torch.log_softmax(a, dim=-1)
    forward = (log_p_teacher.exp() * (log_p_teacher - log_p_aux)).sum()
    reverse = (log_p_aux.exp() * (log_p_aux - log_p_teacher)).sum()
    ((1 - beta) * forward + beta * reverse).backward()
    torch.testing.assert_close(matching_direction(log_p_aux.detach(), log_p_teacher, beta), a.grad, rtol=1e-10,
                               atol=1e-12)


def test_direction_ignores_tokens_the_auxiliary_never_predicts():
    log_p = torch.log_softmax(torch.tensor([[0.0, 1.0, -torch.inf]], dtype=torch.float64), dim=-1)
    out = matching_direction(log_p, log_p.roll(1, dims=1).nan_to_num(neginf=-30.0), 1.0)
    assert torch.isfinite(out).all() and out[0, 2] == 0


def test_arccos_mask_masks_round_g_t_positions_in_uniform_order():
    u = torch.tensor([1.0, 0.0, 0.5, math.cos(math.pi / 4)], dtype=torch.float64)  # t = 0, 1, 2/3, 1/2
    order = torch.rand(4, GEN, generator=torch.Generator().manual_seed(2))
    where = arccos_mask(u, order)
    assert where.sum(dim=1).tolist() == [1, GEN, round(GEN * 2 / 3), GEN // 2]
    for row, count in zip(range(4), where.sum(dim=1).tolist()):
        assert set(where[row].nonzero()[:, 0].tolist()) == set(order[row].argsort()[:count].tolist())


def inputs(n=3, latent_dim=3):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 40, (n, PROMPT), generator=g)
    return dict(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), latent=torch.randn(n, latent_dim, generator=g),
                sample_uniforms=torch.rand(n, 1, GEN, generator=g, dtype=torch.float64),
                t_uniform=torch.rand(n, generator=g, dtype=torch.float64),
                position_uniforms=torch.rand(n, GEN, generator=g, dtype=torch.float64))


def test_while_the_auxiliary_equals_the_teacher_the_student_gradient_is_zero(base):
    mask_id = base.config.mask_token_id
    student = Student(base, prompt_length=2, hidden_size=8, latent_dim=3)
    with torch.no_grad():
        student.soft_prompt.prompt_gate.normal_(generator=torch.Generator().manual_seed(4))  # S differs from T
    auxiliary = Student(base, prompt_length=2, hidden_size=8)  # gate 0: A = T
    out = distribution_matching_loss(student, auxiliary, **inputs(), mask_id=mask_id, beta=0.5)
    out.student.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in student.soft_prompt.parameters())
    assert out.kl.abs() < 1e-6 and 0 < out.masked_fraction <= 1
    out.auxiliary.backward()  # the auxiliary learns the student's samples
    assert auxiliary.soft_prompt.prompt_gate.grad.abs().sum() > 0


def test_once_the_auxiliary_differs_the_student_moves(base):
    mask_id = base.config.mask_token_id
    student = Student(base, prompt_length=2, hidden_size=8, latent_dim=3)
    auxiliary = Student(base, prompt_length=2, hidden_size=8)
    with torch.no_grad():
        auxiliary.soft_prompt.prompt_gate.normal_(generator=torch.Generator().manual_seed(5))
    out = distribution_matching_loss(student, auxiliary, **inputs(), mask_id=mask_id, beta=1.0)
    out.student.backward()
    assert out.kl > 0 and student.soft_prompt.prompt_gate.grad.abs().sum() > 0
