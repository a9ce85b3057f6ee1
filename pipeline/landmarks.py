"""68-point landmark conventions and the AFLW2000-3D evaluation protocol.

Works on numpy arrays and (where noted) torch tensors alike, by indexing only along the point axis.
"""

from __future__ import annotations

import numpy as np

# iBUG 68-point scheme: index of each point's mirror image (left eye <-> right eye, ...).
FLIP_68 = np.array(
    list(range(16, -1, -1))  # jaw 0..16
    + list(range(26, 16, -1))  # brows 17..26
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nose base
    + [45, 44, 43, 42, 47, 46]  # right eye <- left eye
    + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48]  # outer lips
    + [59, 58, 57, 56, 55]
    + [64, 63, 62, 61, 60]  # inner lips
    + [67, 66, 65],
    dtype=np.int64,
)

# 2DASL's 18 stable points (its code's obtain_18pts_map): brows 6, eyes 6 (with lid midpoints),
# nose 3, mouth corners + inner-lip midpoint. Pairs are averaged into one point.
_POINTS_18 = [(17,), (19,), (21,), (22,), (24,), (26,), (36,), (37, 40), (39,), (42,), (43, 46), (45,),
              (31,), (30,), (35,), (48,), (62, 66), (54,)]

YAW_EDGES_DEG = (30.0, 60.0)  # AFLW2000-3D bins: [0, 30], (30, 60], (60, 90]
# The bins' names, as every table, report, page and reason prints them: "0-30", "30-60", "60-90".
YAW_BINS = tuple(f"{lo:g}-{hi:g}" for lo, hi in zip((0.0, *YAW_EDGES_DEG), (*YAW_EDGES_DEG, 90.0)))


def select_18(points68):
    """[..., 68, 2] -> [..., 18, 2] (numpy or torch): 2DASL's 18 points, midpoints averaged."""
    cols = [points68[..., list(ix), :].mean(-2) if len(ix) > 1 else points68[..., ix[0], :] for ix in _POINTS_18]
    if isinstance(points68, np.ndarray):
        return np.stack(cols, axis=-2)
    import torch

    return torch.stack(cols, dim=-2)


def mirror_points(points68: np.ndarray, width: int) -> np.ndarray:
    """Points of an image -> the same face's points in the horizontally mirrored image."""
    out = np.asarray(points68)[..., FLIP_68, :].copy()
    out[..., 0] = width - 1 - out[..., 0]
    return out


def nme_pct(pred, ref):
    """Per-face NME (%) of [B, 68, 2] `pred` vs `ref`, normalised by sqrt(w*h) of ref's bounding box.

    The AFLW2000-3D protocol of 3DDFA and 2DASL. Numpy in, numpy out; torch in, torch out.
    """
    if isinstance(pred, np.ndarray) or isinstance(ref, np.ndarray):
        pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
        span = ref.max(axis=-2) - ref.min(axis=-2)
        norm = np.sqrt(np.maximum(span[..., 0] * span[..., 1], 1e-12))
        return np.linalg.norm(pred - ref, axis=-1).mean(-1) / norm * 100.0
    span = ref.amax(dim=-2) - ref.amin(dim=-2)
    norm = (span[..., 0] * span[..., 1]).clamp_min(1e-12).sqrt()
    return (pred - ref).norm(dim=-1).mean(-1) / norm * 100.0


def yaw_bins(yaw_deg) -> np.ndarray:
    """Per face: 0, 1 or 2 for |yaw| in [0, 30], (30, 60], > 60 degrees; -1 (no bin) where yaw is NaN.

    The protocol's one binning: reference NME tables, the summary's pose bins and the report use it."""
    a = np.abs(np.asarray(yaw_deg, dtype=np.float64))
    bins = np.where(a <= YAW_EDGES_DEG[0], 0, np.where(a <= YAW_EDGES_DEG[1], 1, 2)).astype(np.int64)
    bins[~np.isfinite(a)] = -1
    return bins


def ced_curve(nme: np.ndarray, max_pct: float = 10.0, steps: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: x = NME threshold (%), y = fraction of faces at or below it."""
    nme = np.asarray(nme, dtype=np.float64)
    nme = nme[np.isfinite(nme)]
    x = np.linspace(0.0, max_pct, steps)
    y = (nme[None, :] <= x[:, None]).mean(axis=1) if nme.size else np.zeros_like(x)
    return x, y


def auc_at(nme: np.ndarray, max_pct: float = 7.0) -> float:
    """Area under the CED curve up to `max_pct`, normalised to [0, 1] (1 = every face at 0%)."""
    x, y = ced_curve(nme, max_pct=max_pct, steps=701)
    return float(np.trapezoid(y, x) / max_pct)


def failure_rate(nme: np.ndarray, threshold_pct: float = 10.0) -> float:
    nme = np.asarray(nme, dtype=np.float64)
    nme = nme[np.isfinite(nme)]
    return float((nme > threshold_pct).mean()) if nme.size else float("nan")


def nme_table(nme: np.ndarray, yaw_deg: np.ndarray) -> dict:
    """Mean NME per yaw bin, the balanced mean of the bin means, AUC@7% and failure rate @10%.

    Faces whose NME is NaN (a landmarker that gave no points) are left out and counted separately.
    """
    nme = np.asarray(nme, dtype=np.float64)
    yaw = np.asarray(yaw_deg, dtype=np.float64)
    ok = np.isfinite(nme) & np.isfinite(yaw)
    bins = yaw_bins(yaw[ok])
    vals = nme[ok]
    rows = []
    for b in range(3):
        sel = vals[bins == b]
        rows.append({"mean": float(sel.mean()) if sel.size else None, "count": int(sel.size)})
    means = [r["mean"] for r in rows if r["mean"] is not None]
    return {
        "bins": rows,
        "balanced": float(np.mean(means)) if means else None,
        "mean": float(vals.mean()) if vals.size else None,
        "count": int(vals.size),
        "missing": int((~ok).sum()),
        "auc_7": auc_at(vals, 7.0) if vals.size else None,
        "failure_10": failure_rate(vals, 10.0) if vals.size else None,
    }


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC of `score` ranking positives above negatives (Mann-Whitney U with mid-ranks for ties).

    NaN when either class is empty or no score is finite.
    """
    score = np.asarray(score, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    finite = np.isfinite(score)
    score, positive = score[finite], positive[finite]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    # Mid-ranks: tied scores share the mean of the ranks they span, so ties count one half.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(score)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
