"""Each 2DASL loss: zero when its inputs agree, positive and finite otherwise, it has a gradient, and
it gives a value worked out by hand on small tensors; the landmark map's pixels, the 18-point
selection (against 2DASL's list) and roc_auc (against a brute-force pair count) likewise.

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


# ------------------------------------------------------------------------------------------------
# Hand-computed values: a wrong formula that is still "zero when equal, positive otherwise" fails these.


def _tri(a: float, b: float) -> torch.Tensor:
    """Three points (0,0), (a,0), (0,b): a face whose bounding box is a x b (face size sqrt(a*b))."""
    return torch.tensor([[0.0, 0.0], [a, 0.0], [0.0, b]])


def test_face_size_by_hand():
    assert float(losses.face_size(_tri(4, 9))) == pytest.approx(6.0)  # sqrt(4 * 9)
    assert float(losses.face_size(torch.zeros(5, 2))) == 1.0  # a degenerate face counts as 1 px


def test_landmark_2d_loss_by_hand():
    # face 0: 4 x 9 box (size 6), every point off by (3, 4): distance 5 -> 5/6
    # face 1: 2 x 2 box (size 2; the pseudo-label's, not the prediction's 3 x 2), one of three points
    # off by 1 -> (1/3)/2 = 1/6
    # face weights 1 and 3: (5/6 * 1 + 1/6 * 3) / 4 = 1/3
    pseudo = torch.stack([_tri(4, 9), _tri(2, 2)])
    pred = pseudo.clone()
    pred[0] += torch.tensor([3.0, 4.0])
    pred[1, 1, 0] += 1.0
    loss = losses.landmark_2d_loss(pred, pseudo, torch.tensor([1.0, 3.0]))
    assert float(loss) == pytest.approx(1 / 3, rel=1e-6)


def test_consistency_2d_and_cycle_losses_by_hand():
    # point weights v = (1, 3, 0) -> (1/4, 3/4, 0); the face size comes from the map's input points
    # face 0: distances (5, 5, 5) -> 5 / 6;  face 1 (2 x 2): distances (0, 1, 0) -> (3/4) / 2 = 3/8
    x2d = torch.stack([_tri(4, 9), _tri(2, 2)])
    y2d = x2d.clone()
    y2d[0] += torch.tensor([3.0, 4.0])
    y2d[1, 1, 0] += 1.0
    v = torch.tensor([1.0, 3.0, 0.0])
    assert float(losses.consistency_2d_loss(x2d, y2d, point_weights=v)) == pytest.approx((5 / 6 + 3 / 8) / 2, rel=1e-6)
    assert float(losses.cycle_loss(x2d, y2d, point_weights=v)) == pytest.approx(29 / 48, rel=1e-6)
    # face weights (0, 1): only face 1 counts
    assert float(losses.cycle_loss(x2d, y2d, point_weights=v, face_weight=torch.tensor([0.0, 1.0]))) \
        == pytest.approx(3 / 8, rel=1e-6)
    # without point weights every point counts alike: (5/6 + (1/3)/2) / 2 = 1/2
    assert float(losses.consistency_2d_loss(x2d, y2d)) == pytest.approx(0.5, rel=1e-6)


def test_consistency_3d_loss_by_hand():
    # face 0: 3 x 12 box in x/y (size 6), every point moved by (2, 3, 6): distance 7 -> 7/6
    # face 1: 1 x 1 box (size 1, pass 1's), one of three points moved by 2 -> 2/3
    # mean over faces: (7/6 + 2/3) / 2 = 11/12
    z = torch.zeros(3, 1)
    pass1 = torch.stack([torch.cat([_tri(3, 12), z], -1), torch.cat([_tri(1, 1), z], -1)])
    pass2 = pass1.clone()
    pass2[0] += torch.tensor([2.0, 3.0, 6.0])
    pass2[1, 1, 0] += 2.0
    assert float(losses.consistency_3d_loss(pass1, pass2)) == pytest.approx(11 / 12, rel=1e-6)


def test_wpdc_loss_by_hand():
    # Two params, one projected point H(p) = (3 p0, 4 p1). Target (0, 0), prediction (1, 1), std (1, 2).
    # Row i of the perturbed set takes coefficient i from the prediction: (1, 0) -> (3, 0), moved 3;
    # (0, 1) -> (0, 4), moved 4; weights 3/7 and 4/7. Whitened errors (1/1, 1/2), squared (1, 1/4):
    # loss = 3/7 * 1 + 4/7 * 1/4 = 4/7.
    def h(p):
        return torch.stack([3 * p[..., 0], 4 * p[..., 1]], -1)[..., None, :]

    pred = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss = losses.wpdc_loss(pred, torch.zeros(1, 2), torch.tensor([1.0, 2.0]), h)
    assert float(loss) == pytest.approx(4 / 7, rel=1e-6)
    # weights are detached: d loss / d pred_i = 2 w_i (pred_i - target_i) / std_i^2 = (6/7, 2/7)
    (grad,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(grad, torch.tensor([[6 / 7, 2 / 7]]))


def test_anchor_loss_by_hand():
    params = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # all rows: differences (0, 2, 0, 3) -> squares (0, 4, 0, 9) -> mean 13/4
    assert float(losses.anchor_loss(params, torch.tensor([[1.0, 0.0], [3.0, 1.0]]))) == pytest.approx(3.25)
    # the NaN row is ignored: (1 + 4) / 2
    nan = float("nan")
    assert float(losses.anchor_loss(params, torch.tensor([[0.0, 0.0], [nan, nan]]))) == pytest.approx(2.5)


def test_critic_losses_by_hand():
    # D(real) = 0 -> sigmoid 1/2 -> BCE to 1 = ln 2; D(fake) = ln 3 -> sigmoid 3/4 -> BCE to 0 = ln 4
    # loss_D = ln 2 + ln 4 = ln 8; loss_G = BCE(3/4, 1) = ln 4/3
    loss_d, loss_g = losses.critic_losses(torch.tensor([0.0]), torch.tensor([math.log(3.0)]))
    assert float(loss_d) == pytest.approx(math.log(8.0), rel=1e-6)
    assert float(loss_g) == pytest.approx(math.log(4.0 / 3.0), rel=1e-6)


def test_landmark_map_pixels_by_hand():
    """2DASL's map: +1 at [floor(y), floor(x)] with coordinates clipped to the crop, -1 elsewhere."""
    from trainer.model import landmark_map

    nan = float("nan")
    points = torch.tensor([[[2.7, 5.2], [-3.0, 200.0], [7.9, 0.0], [nan, nan]]])
    got = landmark_map(points, size=8)
    expected = -torch.ones(1, 1, 8, 8)
    expected[0, 0, 5, 2] = 1.0  # (2.7, 5.2): row 5, column 2
    expected[0, 0, 7, 0] = 1.0  # (-3, 200) clipped to (0, 7)
    expected[0, 0, 0, 7] = 1.0  # (7.9, 0): row 0, column 7
    # a missing point (NaN) is not drawn: (0, 0) stays -1
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert landmark_map(torch.tensor([[[60.5, 30.25]]])).shape == (1, 1, 120, 120)


def test_select_18_is_2dasls_18_points():
    """2DASL's obtain_18pts_map (shared/2DASL.md): 68-point indices 17, 19, 21, 22, 24, 26, 36,
    mid(37, 40), 39, 42, mid(43, 46), 45, 31, 30, 35, 48, mid(62, 66), 54, in that order."""
    import numpy as np

    from pipeline.landmarks import select_18
    from trainer.model import map_points

    points = np.stack([np.arange(68.0), 1000.0 + 2 * np.arange(68.0)], -1)  # point i = (i, 1000 + 2i)
    expected_x = [17, 19, 21, 22, 24, 26, 36, 38.5, 39, 42, 44.5, 45, 31, 30, 35, 48, 64, 54]
    got = select_18(points)
    np.testing.assert_array_equal(got[:, 0], expected_x)
    np.testing.assert_array_equal(got[:, 1], 1000.0 + 2 * np.asarray(expected_x))
    np.testing.assert_array_equal(map_points(torch.as_tensor(points)[None]).numpy()[0], got)  # torch too


def test_roc_auc_equals_a_brute_force_pair_count_with_ties():
    """P(score of a positive > score of a negative) + 1/2 P(equal), counted over every pair."""
    import numpy as np

    from trainer.rescore import roc_auc

    rng = np.random.default_rng(7)
    for trial in range(20):
        n = int(rng.integers(2, 60))
        score = rng.integers(0, 4, size=n).astype(float) if trial % 2 == 0 else rng.normal(size=n).round(1)
        positive = rng.random(n) < 0.4
        if positive.all() or not positive.any():
            positive[0] = not positive[0]
        pos, neg = score[positive], score[~positive]
        brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
        assert roc_auc(score, positive) == pytest.approx(brute, abs=1e-12), (trial, score, positive)
    # NaN scores are left out; a class left empty gives NaN
    assert roc_auc(np.array([1.0, np.nan, 0.0]), np.array([True, False, False])) == 1.0
    assert math.isnan(roc_auc(np.array([1.0, np.nan]), np.array([True, False])))
