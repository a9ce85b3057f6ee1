"""Training augmentation: labels and params move with the crop, mirrors swap sides, draws are
reproducible, the map's noise and gaps are what they say; L_3d weighs depth."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipeline.bfm import landmarks_3d, landmarks_3d_np, load_bfm, load_param_stats
from pipeline.landmarks import mirror_points, nme_pct
from tests.conftest import DATA, MODELS, WILD
from trainer import losses
from trainer.augment import (
    AugmentSettings,
    augment,
    mirror_matrix,
    noisy_map_points,
    sample_rng,
    similarity,
    transform_params,
    transform_points,
)
from trainer.model import landmark_map

GEOMETRY_ONLY = AugmentSettings(color=0, blur=0, occlude=0, mirror=0)


@pytest.fixture(scope="module")
def bfm():
    return load_bfm(MODELS / "bfm" / "bfm_68.npz")


@pytest.fixture(scope="module")
def teacher():
    from pipeline.detect.factory import build_landmarker
    from pipeline.detect.spec import DetectorSpec

    return build_landmarker(DetectorSpec(name="tddfa_mb05", weights=str(MODELS / "3ddfa_v2" / "mb05_120x120.pth"),
                                         options={"bfm": str(MODELS / "bfm" / "bfm_68.npz"), "param_stats": str(
                                             MODELS / "3ddfa_v2" / "param_mean_std_62d_120x120.pkl")}))


@pytest.fixture(scope="module")
def wild_faces(teacher):
    """Eight real wild crops with the teacher's params and points on them (crop px)."""
    crops = np.stack([cv2.imread(str(DATA / "aflw-wild-crops" / n))[:, :, ::-1] for n in WILD[:8]])
    crops = np.stack([cv2.resize(c, (120, 120)) for c in crops])
    params, points = teacher.predict_crops(crops)
    return crops, params, points[..., :2]


def test_params_follow_the_similarity_exactly(bfm):
    mean, std = load_param_stats(MODELS / "3ddfa_v2" / "param_mean_std_62d_120x120.pkl")
    rng = np.random.default_rng(0)
    for _ in range(5):
        params = (mean + 0.5 * std * rng.standard_normal(62)).astype(np.float32)
        m = similarity(rng, AugmentSettings(shift=0.1, scale=0.2, rotate_deg=20))
        moved = landmarks_3d_np(transform_params(params, m), bfm)
        expected = transform_points(landmarks_3d_np(params, bfm)[:, :2], m)
        np.testing.assert_allclose(moved[:, :2], expected, atol=1e-2)
        # depth scales with the similarity (a zoomed-in face is deeper in pixels too)
        z_span = np.ptp(moved[:, 2]) / np.ptp(landmarks_3d_np(params, bfm)[:, 2])
        assert z_span == pytest.approx(np.sqrt(np.linalg.det(m[:, :2])), rel=1e-3)


def test_augmented_label_still_sits_on_the_face(wild_faces, teacher):
    # The teacher re-run on the augmented crop finds the face where the moved label says it is;
    # the label left where it was would be far off.
    crops, params, points = wild_faces
    settings = AugmentSettings(shift=0.08, scale=0.15, rotate_deg=15, mirror=0.5, color=0, blur=0, occlude=0)
    out = [augment(c, p, [q], sample_rng(1, 0, str(i)), settings) for i, (c, p, q) in enumerate(
        zip(crops, points, params))]
    _, seen = teacher.predict_crops(np.stack([o[0] for o in out]))
    moved = np.stack([o[1] for o in out])
    assert np.median(nme_pct(seen[..., :2], moved)) < 3.0
    assert np.median(nme_pct(seen[..., :2], points)) > 2 * np.median(nme_pct(seen[..., :2], moved))
    assert any(o[3] for o in out) and not all(o[3] for o in out)  # some mirrored, some not
    for o in out:
        assert (o[2][0] is None) == o[3]  # a mirrored face has no params


def test_mirror_swaps_sides(wild_faces):
    crops, params, points = wild_faces
    img, pts, prm, mirrored = augment(crops[0], points[0], [params[0]], sample_rng(0, 0, "a"),
                                      AugmentSettings(shift=0, scale=0, rotate_deg=0, mirror=1.0, color=0, blur=0,
                                                      occlude=0))
    assert mirrored and prm == [None]
    np.testing.assert_array_equal(img, crops[0][:, ::-1])
    np.testing.assert_allclose(pts, mirror_points(points[0], 120), atol=1e-4)
    np.testing.assert_allclose(transform_points(transform_points(points[0], mirror_matrix()), mirror_matrix()),
                               points[0], atol=1e-4)
    # iBUG 36 is the outer corner of the eye on the image's left; after the mirror it is on the left again
    assert pts[36, 0] < pts[45, 0]


def test_draws_depend_on_seed_epoch_and_face_only(wild_faces):
    crops, params, points = wild_faces
    full = AugmentSettings()

    def draw(seed, epoch, face):
        rng = sample_rng(seed, epoch, face)
        img, pts, _, _ = augment(crops[1], points[1], [params[1]], rng, full)
        return img, pts, noisy_map_points(pts, rng, full)

    a, b, c = draw(0, 3, "f1"), draw(0, 3, "f1"), draw(0, 4, "f1")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])


def test_map_noise_and_dropout(wild_faces):
    _, _, points = wild_faces
    rng = np.random.default_rng(0)
    none = noisy_map_points(points[0], rng, AugmentSettings(map_dropout=1.0))
    assert np.isnan(none).all()
    noisy = np.stack([noisy_map_points(points[0], rng, AugmentSettings(map_dropout=0, map_point_dropout=0,
                                                                       map_noise_pct=2.0)) for _ in range(200)])
    measured = np.sqrt(np.mean((noisy - points[0]) ** 2)) / np.sqrt(np.prod(np.ptp(points[0], axis=0))) * 100
    assert measured == pytest.approx(2.0, rel=0.1)
    gaps = np.stack([noisy_map_points(points[0], rng, AugmentSettings(map_dropout=0, map_point_dropout=0.3))
                     for _ in range(200)])
    assert np.isnan(gaps[..., 0]).mean() == pytest.approx(0.3, abs=0.03)


def test_landmark_map_leaves_missing_points_out():
    pts = torch.tensor([[[10.0, 20.0], [float("nan"), 5.0], [30.5, 40.2]]])
    m = landmark_map(pts)
    assert int((m > 0).sum()) == 2 and m[0, 0, 20, 10] == 1 and m[0, 0, 40, 30] == 1 and m[0, 0, 0, 0] == -1
    assert int((landmark_map(torch.full((1, 18, 2), float("nan"))) > 0).sum()) == 0


def test_blob_map_is_dense_around_points_and_empty_elsewhere():
    pts = torch.tensor([[[10.0, 20.0], [float("nan"), 5.0], [60.5, 80.0]]])
    m = landmark_map(pts, sigma=2.0)[0, 0]
    assert float(m[20, 10]) == pytest.approx(1.0) and float(m[80, 60]) == pytest.approx(np.exp(-0.25 / 8), rel=1e-5)
    assert float(m[20, 12]) == pytest.approx(np.exp(-4 / 8), rel=1e-5)  # 2 px away: exp(-d^2 / 2 sigma^2)
    assert float(m[0, 119]) == 0.0 and float(m.min()) >= 0.0
    assert float(landmark_map(torch.full((1, 3, 2), float("nan")), sigma=2.0).abs().sum()) == 0.0


def test_wpdc_weighs_depth(bfm):
    # Parameter 11 is the depth translation: it moves no projected x, y, so a 2D-only WPDC gave it
    # weight 0; in 3D it moves every landmark and gets weight.
    mean, std = (torch.as_tensor(a) for a in load_param_stats(MODELS / "3ddfa_v2" / "param_mean_std_62d_120x120.pkl"))
    target = mean[None].clone()
    pred = target.clone()
    pred[0, 11] += std[11]
    pred.requires_grad_()
    loss = losses.wpdc_loss(pred, target, std, lambda p: landmarks_3d(p, bfm))
    (grad,) = torch.autograd.grad(loss, pred)
    assert float(loss.detach()) > 0 and float(grad[0, 11]) > 0
