"""The AFLW2000-3D protocol's yaw bins, one function for every table: edges belong to the lower bin,
NaN belongs to none."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.landmarks import YAW_BINS, nme_table, yaw_bins
from pipeline.summary import pose_bins


def test_yaw_bin_edges_and_nan():
    yaw = [0.0, 29.99, 30.0, -30.0, 30.01, 60.0, -60.0, 60.01, 90.0, -120.0, np.nan]
    assert yaw_bins(yaw).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, -1]
    assert yaw_bins(np.float32(30.0)).tolist() == 0
    assert yaw_bins(np.zeros(0)).tolist() == []


def test_nme_table_and_pose_bins_agree_on_the_edges():
    yaw = np.array([30.0, 60.0, 61.0, np.nan])
    table = nme_table(np.array([1.0, 2.0, 3.0, 4.0]), yaw)
    assert [b["count"] for b in table["bins"]] == [1, 1, 1] and table["missing"] == 1
    assert [b["mean"] for b in table["bins"]] == [1.0, 2.0, 3.0]
    faces = pa.table({"yaw_deg": pa.array(yaw, pa.float32()), "keep": [True, False, True, True]})
    assert pose_bins(faces) == {YAW_BINS[0]: {"faces": 1, "kept": 1}, YAW_BINS[1]: {"faces": 1, "kept": 0},
                                YAW_BINS[2]: {"faces": 1, "kept": 1}}
    assert pd.Series(yaw_bins(yaw)).value_counts().get(-1) == 1  # the report's table leaves NaN out too


def test_one_affine_for_a_face_and_for_a_batch():
    from pipeline.crops import apply_affine, crop_affine, invert_affine

    rng = np.random.default_rng(0)
    points = rng.uniform(0, 400, (5, 68, 2)).astype(np.float32)
    affines = np.stack([crop_affine(np.array([x, x / 2, x + 150, x / 2 + 150], np.float32)) for x in (0, 10, 33, 70, 99)])
    batched = apply_affine(points, affines)
    assert batched.dtype == np.float32 and batched.shape == (5, 68, 2)
    for p, a, b in zip(points, affines, batched):
        np.testing.assert_array_equal(apply_affine(p, a), b)
        np.testing.assert_allclose(apply_affine(b, invert_affine(a)), p, atol=1e-3)
    # each face its own affine: x_c = (x - sx) * 120 / side
    np.testing.assert_allclose(batched[1, :, 0], (points[1, :, 0] - 10) * 120 / 150, rtol=1e-5)
