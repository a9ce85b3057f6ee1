"""Per-face quality features and the catalog's keep / drop / weight rules over them.

Features are computed once per face and stored; rules are a pure function of the stored features,
so a changed rule set re-decides every face without running a model again.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from pipeline.catalog import Rules
from pipeline.landmarks import YAW_BINS, nme_pct, yaw_bins


def blur_score(crop_rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the aligned grey crop: sharp faces score high."""
    grey = cv2.cvtColor(crop_rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def out_of_frame_frac(points: np.ndarray, width: int, height: int) -> float:
    inside = (points[:, 0] >= 0) & (points[:, 0] <= width - 1) & (points[:, 1] >= 0) & (points[:, 1] <= height - 1)
    return float(1.0 - inside.mean())


def face_features(*, bbox: np.ndarray, det_score: float, pose_deg: np.ndarray | None, points: np.ndarray,
                  point_scores: np.ndarray, alt_points: list[np.ndarray], flip_points: np.ndarray | None,
                  crop_rgb: np.ndarray, width: int, height: int) -> dict[str, float]:
    """The stored quality features of one face (see pipeline.catalog.FEATURES for their meaning)."""
    yaw, pitch, roll = (float(v) for v in (pose_deg if pose_deg is not None else (np.nan,) * 3))
    agreement = [float(nme_pct(alt, points)) for alt in alt_points]
    return {
        "face_px": float(np.sqrt(max((bbox[2] - bbox[0]) * (bbox[3] - bbox[1]), 0.0))),
        "det_score": float(det_score),
        "yaw_deg": yaw,
        "pitch_deg": pitch,
        "roll_deg": roll,
        "abs_yaw_deg": abs(yaw),
        "blur": blur_score(crop_rgb),
        "agreement_nme_pct": float(np.mean(agreement)) if agreement else float("nan"),
        "flip_nme_pct": float(nme_pct(flip_points, points)) if flip_points is not None else float("nan"),
        "out_of_frame_frac": out_of_frame_frac(points, width, height),
        "landmark_score": float(np.mean(point_scores)),
    }


_BIN_NAMES = {**dict(enumerate(YAW_BINS)), -1: "unknown"}


def apply_rules(features: pd.DataFrame, rules: Rules) -> pd.DataFrame:
    """Decide keep / weight / reject_reason for every row of `features` (one column per feature).

    A face is dropped by the first rule it fails, with that rule as its reason; a missing (NaN)
    feature never drops a face (that feature was not measured for it). Weights multiply.
    """
    n = len(features)
    keep = np.ones(n, dtype=bool)
    reason = np.full(n, None, dtype=object)
    for rule in rules.drop:
        values = features[rule.feature].to_numpy(dtype=np.float64)
        for bound, fails, word in ((rule.min, lambda v, b: v < b, "<"), (rule.max, lambda v, b: v > b, ">")):
            if bound is None:
                continue
            with np.errstate(invalid="ignore"):
                failed = fails(values, bound) & ~np.isnan(values) & keep
            for i in np.flatnonzero(failed):
                reason[i] = f"{rule.feature} {values[i]:.3g} {word} {'min' if word == '<' else 'max'} {bound:g}"
            keep &= ~failed
        if rule.max_by_yaw_bin is not None:
            bins = yaw_bins(features["abs_yaw_deg"].to_numpy(dtype=np.float64))
            bound = np.asarray(rule.max_by_yaw_bin, dtype=np.float64)[np.maximum(bins, 0)]
            bound[bins < 0] = max(rule.max_by_yaw_bin)  # pose unknown: the most lenient bound
            with np.errstate(invalid="ignore"):
                failed = (values > bound) & ~np.isnan(values) & keep
            for i in np.flatnonzero(failed):
                reason[i] = f"{rule.feature} {values[i]:.3g} > max {bound[i]:g} (yaw bin {_BIN_NAMES[bins[i]]})"
            keep &= ~failed
    weight = np.ones(n, dtype=np.float64)
    for rule in rules.weight:
        values = np.nan_to_num(features[rule.feature].to_numpy(dtype=np.float64), nan=rule.offset)
        weight *= np.exp(-np.maximum(values - rule.offset, 0.0) / rule.scale)
    weight = np.clip(weight, rules.min_weight, 1.0)
    weight[~keep] = 0.0
    out = pd.DataFrame({"keep": keep, "weight": weight.astype(np.float32)}, index=features.index)
    # object dtype: pandas would otherwise infer a string dtype and turn None into NaN.
    out["reject_reason"] = pd.Series(list(reason), index=features.index, dtype=object)
    return out
