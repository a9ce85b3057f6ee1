"""A label's predicted NME from everything the verifier says about the face, not only about the label.

The verifier head predicts each point's error of one label at a time. Whether a face's fused label
is wrong also shows in what the head says of the *other* candidates (when the teacher and both 2D
landmarkers are all predicted bad, the face is hard and their mixture rarely good) and in how far
the candidates lie from one another. A ridge regression on the logarithms of those numbers, fit on
cross-fitted head outputs (`trainer/verifier.py`, so it learns how the head errs on faces it never
saw, as on a new catalog's), turns them into the label's predicted NME, in the same % units as the
head's own. It ranks the wild crops' bad labels better than the head's figure alone: the cross-fitted
ROC-AUCs of both, per head, are measured in docs/labels.md.

Its features, in order: log predicted NME of the label; log predicted NME of each CONTEXT candidate;
log mean distance (% of face size) of each pair of CONTEXT candidates; |yaw|, |pitch|, |roll| / 90;
and, for a verifier whose head predicts which AFLW points an annotator would mark, the log of
`marked_box_ratio`. The measured NME averages over the marked points only and divides by *their*
box, so the same label measures worse on a face whose marked points span less of it (how many of the
wild crops' labels over 8% are there only by that is measured in docs/labels.md).
It was fit on faces with every CONTEXT candidate present; an absent candidate is given the label's
own predicted NME and its pairs the mean distance of the present pairs (a neutral guess, not a
measured one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import combinations

import numpy as np

from pipeline.references import aflw21_from_68

_FLOOR = 1e-3  # % : keeps the logarithms finite


def _face_size(points: np.ndarray) -> np.ndarray:
    span = points.max(-2) - points.min(-2)
    return np.sqrt(np.maximum(span[..., 0] * span[..., 1], 1.0))


def marked_box_ratio(points21: np.ndarray, visibility: np.ndarray) -> np.ndarray:
    """[N, 21, 2] AFLW-21 points, [N, 21] chance each is marked -> [N] size (sqrt(w*h)) of the box of the
    points likely marked (p >= 0.5; all of them where fewer than two are) over the box of all 21."""
    marked = np.asarray(visibility) >= 0.5
    marked[marked.sum(1) < 2] = True
    pts = np.asarray(points21, np.float64)
    lo = np.where(marked[..., None], pts, np.inf).min(1)
    hi = np.where(marked[..., None], pts, -np.inf).max(1)
    return _face_size(np.stack([lo, hi], 1)) / _face_size(pts)


def score_features(label_nme: np.ndarray, context_nme: np.ndarray, present: np.ndarray, context: np.ndarray,
                   pose_deg: np.ndarray, visibility: np.ndarray | None = None) -> np.ndarray:
    """label_nme [N] and context_nme [N, K] the head's predicted NMEs (%), present [N, K] bool, context
    [N, K, 68, 2] the CONTEXT candidates (one frame per face), pose_deg [N, 3], visibility [N, 21] (the
    head's marked-point chances at the first candidate's points, or None) -> [N, 1 + K + K(K-1)/2 + 3 (+1)]."""
    label_nme = np.asarray(label_nme, np.float64)
    present = np.asarray(present, bool)
    context = np.asarray(context, np.float64)
    pairs = list(combinations(range(present.shape[1]), 2))
    cand = np.where(present, np.asarray(context_nme, np.float64), label_nme[:, None])
    size = _face_size(context[:, 0])
    pair = np.stack([np.linalg.norm(context[:, a] - context[:, b], axis=-1).mean(-1) / size * 100 for a, b in pairs], 1)
    pair_ok = np.stack([present[:, a] & present[:, b] for a, b in pairs], 1)
    fill = np.where(pair_ok.any(1), (pair * pair_ok).sum(1) / np.maximum(pair_ok.sum(1), 1), 0.0)
    pair = np.where(pair_ok, pair, fill[:, None])
    pose = np.abs(np.nan_to_num(np.asarray(pose_deg, np.float64), nan=0.0)) / 90.0
    log = lambda x: np.log(np.maximum(x, _FLOOR))  # noqa: E731
    columns = [log(label_nme), log(cand), log(pair), pose]
    if visibility is not None:
        columns.append(np.log(marked_box_ratio(aflw21_from_68(context[:, 0]), visibility)))
    return np.column_stack(columns)


@dataclass
class LabelScore:
    """Standardise, ridge, exp: the fitted map from `score_features` to a predicted NME (%)."""

    mean: list[float]
    std: list[float]
    coef: list[float]
    intercept: float
    uses_visibility: bool = False  # its last feature is the marked-box ratio (a head with visibility)

    @classmethod
    def fit(cls, features: np.ndarray, true_nme: np.ndarray, alpha: float = 1.0,
            uses_visibility: bool = False) -> LabelScore:
        """Ridge on log NME (closed form; `alpha` on the standardised features)."""
        x = np.asarray(features, np.float64)
        mean, std = x.mean(0), x.std(0) + 1e-6
        z = (x - mean) / std
        y = np.log(np.maximum(np.asarray(true_nme, np.float64), _FLOOR))
        intercept = y.mean()
        coef = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - intercept))
        return cls(mean.tolist(), std.tolist(), coef.tolist(), float(intercept), uses_visibility)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - np.asarray(self.mean)) / np.asarray(self.std)
        return np.exp(z @ np.asarray(self.coef) + self.intercept)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> LabelScore | None:
        return cls(**d) if d else None
