"""The BFM at 68 points and the `.mat` reference conversion, checked against the references themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.bfm import (
    landmarks_3d,
    landmarks_3d_np,
    load_bfm,
    load_param_stats,
    pose_from_params,
    project_to_image,
)
from pipeline.crops import apply_affine, crop_affine, roi_from_landmarks
from pipeline.landmarks import FLIP_68, mirror_points, nme_pct, nme_table, select_18
from pipeline.references import BadReference, load_mat_reference, params_image_to_crop
from tests.conftest import DATA, MODELS

DEV_MATS = sorted((DATA / "aflw2000-dev").glob("*.mat"))


@pytest.fixture(scope="module")
def bfm():
    return load_bfm(MODELS / "bfm/bfm_68.npz")


def test_torch_and_numpy_bfm_agree(bfm):
    mean, std = load_param_stats(MODELS / "3ddfa_v2/param_mean_std_62d_120x120.pkl")
    params = mean + 0.5 * std * np.random.default_rng(0).standard_normal((5, 62))
    pts_np = landmarks_3d_np(params, bfm)
    pts_t = landmarks_3d(torch.tensor(params, dtype=torch.float64), bfm).numpy()
    np.testing.assert_allclose(pts_t, pts_np, atol=1e-6)
    assert (pts_np[..., :2] > 0).all() and (pts_np[..., :2] < 120).all()  # a plausible face fills the crop


def test_mat_params_reproduce_their_own_points_in_the_crop(bfm):
    """The 62-param conversion of Pose/Shape/Exp_Para gives pt3d_68 within the truncation error
    (0.9% NME on average, measured), through the crop frame the trainer sees."""
    nmes, yaw_gap = [], []
    for path in DEV_MATS[:60]:
        ref = load_mat_reference(path, image_height=450)
        roi = roi_from_landmarks(ref.landmarks_68)
        crop_params = params_image_to_crop(ref.params_62, roi, 450)
        pts = landmarks_3d_np(crop_params, bfm)[:, :2]
        nmes.append(nme_pct(pts[None], apply_affine(ref.landmarks_68, crop_affine(roi))[None])[0])
        back = project_to_image(pts, roi)
        assert nme_pct(back[None], ref.landmarks_68[None])[0] < 3.0
        yaw_gap.append(abs(abs(pose_from_params(crop_params)[0]) - abs(ref.yaw_pitch_roll_deg[0])))
    assert np.mean(nmes) < 1.2 and np.max(nmes) < 3.0
    assert np.median(yaw_gap) < 3.0  # same pose, decomposed with 3DDFA_V2's matrix2angle


def test_bad_reference_files_are_named(tmp_path):
    bad = tmp_path / "x.mat"
    bad.write_bytes(b"MATLAB 5.0 but not really")
    with pytest.raises(BadReference, match="unreadable"):
        load_mat_reference(bad, 450)
    import scipy.io

    scipy.io.savemat(tmp_path / "y.mat", {"pt3d_68": np.zeros((3, 21))})
    with pytest.raises(BadReference, match="shape"):
        load_mat_reference(tmp_path / "y.mat", 450)
    good = scipy.io.loadmat(DEV_MATS[0])
    cases = {"nan": ("non-finite", {"pt3d_68": np.where(np.arange(204).reshape(3, 68) == 5, np.nan, 100.0)}),
             "far": ("beyond", {"pt3d_68": np.full((3, 68), 1e7)}),
             "nokeys": ("no pt3d_68", {"Pose_Para": good["Pose_Para"]}),
             "short": ("Shape_Para", {"pt3d_68": good["pt3d_68"], "Pose_Para": good["Pose_Para"],
                                      "Shape_Para": np.zeros((10, 1)), "Exp_Para": np.zeros((29, 1))})}
    for name, (message, content) in cases.items():
        scipy.io.savemat(tmp_path / f"{name}.mat", content)
        with pytest.raises(BadReference, match=message):
            load_mat_reference(tmp_path / f"{name}.mat", 450)


def test_landmark_helpers():
    assert sorted(FLIP_68.tolist()) == list(range(68)) and (FLIP_68[FLIP_68] == np.arange(68)).all()
    pts = np.random.default_rng(1).uniform(10, 90, (68, 2)).astype(np.float32)
    np.testing.assert_allclose(mirror_points(mirror_points(pts, 100), 100), pts, atol=1e-4)
    assert select_18(pts).shape == (18, 2) and select_18(torch.from_numpy(pts)[None]).shape == (1, 18, 2)
    table = nme_table(np.array([1.0, 2.0, 3.0, 4.0, np.nan]), np.array([10.0, -20.0, 45.0, 80.0, 5.0]))
    assert [b["count"] for b in table["bins"]] == [2, 1, 1] and table["missing"] == 1
    assert table["balanced"] == pytest.approx((1.5 + 3 + 4) / 3)
