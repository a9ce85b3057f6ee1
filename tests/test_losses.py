"""Each 2DASL loss: zero when its inputs agree, positive and finite otherwise, and it has a gradient.

Geometry comes from the real BFM (bfm_68.npz) and the teacher's param stats, not random numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.bfm import landmarks_3d, load_bfm, load_param_stats
from pipeline.settings import shared_root
from trainer import losses

MODELS = shared_root() / "models"


@pytest.fixture(scope="module")
def bfm():
    return load_bfm(MODELS / "bfm" / "bfm_68.npz")


@pytest.fixture(scope="module")
def stats():
    mean, std = load_param_stats(MODELS / "3ddfa_v2" / "param_mean_std_62d_120x120.pkl")
    return torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)


@pytest.fixture(scope="module")
def params(stats):
    """4 plausible faces: the mean face plus small whitened perturbations (seeded)."""
    mean, std = stats
    g = torch.Generator().manual_seed(0)
    return mean + 0.3 * std * torch.randn(4, 62, generator=g)


def _points(params, bfm):
    return landmarks_3d(params, bfm)


def _check_positive_with_grad(loss: torch.Tensor, leaf: torch.Tensor) -> None:
    assert loss.ndim == 0 and math.isfinite(float(loss)) and float(loss) > 0
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_face_points_are_in_the_crop(params, bfm):
    pts = _points(params, bfm)
    assert pts.shape == (4, 68, 3)
    assert (pts[..., :2] > 0).all() and (pts[..., :2] < 120).all()


def test_landmark_2d_loss_zero_on_agreement_weighted_by_face(params, bfm):
    pts = _points(params, bfm)[..., :2]
    weight = torch.tensor([1.0, 0.5, 0.0, 1.0])
    assert float(losses.landmark_2d_loss(pts, pts, weight)) == pytest.approx(0.0, abs=1e-7)
    pred = (pts + 2.0).requires_grad_()
    _check_positive_with_grad(losses.landmark_2d_loss(pred, pts, weight), pred)
    # A weight-0 face is ignored entirely: moving only it changes nothing.
    moved = pts.clone()
    moved[2] += 30.0
    assert float(losses.landmark_2d_loss(moved, pts, weight)) == pytest.approx(0.0, abs=1e-7)


def test_landmark_2d_loss_is_scale_free(params, bfm):
    pts = _points(params, bfm)[..., :2]
    ones = torch.ones(4)
    small = losses.landmark_2d_loss(pts + 1.0, pts, ones)
    big = losses.landmark_2d_loss(3 * pts + 3.0, 3 * pts, ones)
    assert float(big) == pytest.approx(float(small), rel=1e-4)


def test_consistency_2d_loss(params, bfm):
    x2d = _points(params, bfm)[..., :2]
    assert float(losses.consistency_2d_loss(x2d, x2d)) == pytest.approx(0.0, abs=1e-7)
    y2d = _points(params + 0.05 * torch.ones(62), bfm)[..., :2].requires_grad_()
    _check_positive_with_grad(losses.consistency_2d_loss(x2d, y2d), y2d)
    v = torch.zeros(68)
    v[30] = 1.0  # per-landmark weights v_i: only the nose tip counts
    only_nose = losses.consistency_2d_loss(x2d, y2d, point_weights=v)
    assert math.isfinite(float(only_nose)) and float(only_nose) > 0


def test_consistency_3d_loss(params, bfm):
    params_1 = params.clone().requires_grad_()
    x3d = _points(params_1, bfm)
    assert float(losses.consistency_3d_loss(x3d, x3d)) == pytest.approx(0.0, abs=1e-7)
    x3d_hat = _points(params.detach() * 1.01, bfm)
    _check_positive_with_grad(losses.consistency_3d_loss(x3d, x3d_hat), params_1)


def test_cycle_loss(params, bfm):
    x2d = _points(params, bfm)[..., :2]
    assert float(losses.cycle_loss(x2d, x2d)) == pytest.approx(0.0, abs=1e-7)
    params_2 = (params * 1.02).requires_grad_()
    _check_positive_with_grad(losses.cycle_loss(x2d, _points(params_2, bfm)[..., :2]), params_2)


def test_wpdc_loss_weights_by_reprojection(params, bfm, stats):
    _, std = stats
    to_points = lambda p: landmarks_3d(p, bfm)  # noqa: E731
    assert float(losses.wpdc_loss(params, params, std, to_points)) == pytest.approx(0.0, abs=1e-9)
    pred = (params + 0.2 * std).requires_grad_()
    _check_positive_with_grad(losses.wpdc_loss(pred, params, std, to_points), pred)
    # WPDC weighs each coefficient by how far its error moves the landmarks: with equal whitened
    # errors in x translation and in the 40th shape coefficient, the translation gets the larger weight
    # (seen in the gradient, d loss / d whitened_i = 2 w_i err_i).
    both = params[:1].clone()
    both[:, 3] += std[3]
    both[:, 51] += std[51]
    both.requires_grad_()
    (grad,) = torch.autograd.grad(losses.wpdc_loss(both, params[:1], std, to_points), both)
    assert float(grad[0, 3] * std[3]) > 10 * float(grad[0, 51] * std[51]) > 0


def test_anchor_loss(params, stats):
    mean, std = stats
    whitened = (params - mean) / std
    assert float(losses.anchor_loss(whitened, whitened)) == 0.0
    student = (whitened + 0.1).requires_grad_()
    _check_positive_with_grad(losses.anchor_loss(student, whitened), student)
    # Rows without teacher params (NaN) are ignored; none at all gives 0, still with a graph.
    teacher = whitened.clone()
    teacher[1:] = float("nan")
    only_first = losses.anchor_loss(student, teacher)
    assert float(only_first) == pytest.approx(0.01, rel=1e-4)
    empty = losses.anchor_loss(student, torch.full_like(teacher, float("nan")))
    assert float(empty) == 0.0 and empty.requires_grad


def test_critic_losses():
    d_real = torch.tensor([8.0, 9.0], requires_grad=True)
    d_fake = torch.tensor([-9.0, -8.0], requires_grad=True)
    loss_d, loss_g = losses.critic_losses(d_real, d_fake)
    # A critic that separates perfectly has ~zero loss, and the generator a large one.
    assert 0 <= float(loss_d) < 1e-3 and float(loss_g) > 7
    _check_positive_with_grad(loss_g, d_fake)
    undecided_d, undecided_g = losses.critic_losses(torch.zeros(3, requires_grad=True),
                                                    torch.zeros(3, requires_grad=True))
    assert float(undecided_d) == pytest.approx(2 * math.log(2), rel=1e-6)
    assert float(undecided_g) == pytest.approx(math.log(2), rel=1e-6)
    _check_positive_with_grad(losses.critic_losses(d_real, d_fake)[0], d_real)


def test_rescore_weight_combines_residual_and_cycle_and_only_optionally_the_critic():
    import numpy as np

    from trainer.rescore import combine

    residual = np.array([2.0, 4.0, 8.0, 12.0, np.nan, 3.0])
    cycle = np.array([3.0, 1.0, 2.0, 2.0, np.nan, 9.0])  # the worse of the two counts
    critic = np.array([0.9, 0.0, 0.9, 0.9, 0.9, 0.9])
    weight = combine(residual, cycle, critic)
    np.testing.assert_allclose(weight, [1.0, 1.0, np.exp(-1), np.exp(-2), 0.0, np.exp(-5 / 4)], rtol=1e-6)
    # With a floor below 1 the critic may halve a weight (score 0), and leaves a confident one alone.
    halved = combine(residual, cycle, critic, critic_floor=0.5)
    assert halved[1] == pytest.approx(0.5) and halved[0] == pytest.approx(1.0)
    assert combine(residual, cycle, np.full(6, np.nan), critic_floor=0.5)[1] == pytest.approx(1.0)
