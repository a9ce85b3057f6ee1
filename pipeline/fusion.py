"""Fuse a face's candidate labels into one: per point, a soft vote weighted by the verifier.

Each candidate's point gets weight softmax(-predicted error / tau) over the candidates present, so
a landmarker that the verifier expects to be wrong at this pose, on this face, in this region,
fades out, and agreeing good candidates average their independent noise away. tau was chosen on
the training split's cross-fitted predictions (docs/labels.md), never on the evaluation split.

The 17 jaw points are voted on only by candidates in the 3D contour convention (3DMM fits: the
teacher, its mirrored pass, a round's student) whenever one is present. The jaw has two conventions:
the projected contour of the 3D face (what AFLW2000-3D's references and any 62-parameter fit use)
and the visible outline 2D landmarkers give, a different curve once the head turns. A label for 3D
reconstruction needs the first, and the verifier cannot arbitrate: the AFLW references it learns
from hold 3 of the 17 jaw points, annotated the 2D way. On aflw2000-dev's references (68 points, 3D
convention) the jaw of the label fused over every candidate is worse than the teacher's beyond 60
degrees, while every other point of it beats the teacher in every yaw bin (measured in docs/labels.md,
"The jaw: two contour conventions").
"""

from __future__ import annotations

import numpy as np

from pipeline.verifier import REGIONS

JAW = REGIONS["jaw"]

TAU_PCT = 2.0
# Names how labels are fused; the manifest records it, and a build whose rule differs from its
# parent's re-labels every image (as new verifier weights do).
FUSION_RULE = "jaw-3d-contour"


def voters(names: list[str] | tuple[str, ...]) -> np.ndarray:
    """[K, 68] bool: which of the named candidates may vote on each point (module docstring)."""
    from pipeline.detect.registry import contour_convention

    three_d = np.array([contour_convention(n) == "3d" for n in names], bool)
    mask = np.ones((len(names), 68), bool)
    if three_d.any():
        mask[np.ix_(~three_d, JAW)] = False
    return mask


def fusion_weights(point_err: np.ndarray, tau: float = TAU_PCT, may_vote: np.ndarray | None = None) -> np.ndarray:
    """[K, 68] predicted point errors (%) -> [K, 68] weights that sum to 1 over the K candidates
    (over those `may_vote` allows, [K, 68] bool, where given)."""
    z = -np.asarray(point_err, np.float64) / tau
    if may_vote is not None:
        z = np.where(may_vote, z, -np.inf)
    z -= z.max(axis=0, keepdims=True)
    w = np.exp(z)
    return (w / w.sum(axis=0, keepdims=True)).astype(np.float32)


def fuse(candidates: np.ndarray, point_err: np.ndarray, tau: float = TAU_PCT,
         may_vote: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[K, 68, 2] candidates (iBUG-68 order, same frame) -> fused [68, 2] and weights [K, 68]."""
    w = fusion_weights(point_err, tau, may_vote)
    return (w[..., None] * candidates).sum(axis=0).astype(np.float32), w


def region_weights(weights: np.ndarray) -> np.ndarray:
    """[K, 68] point weights -> [K, R] mean weight of each candidate in each region (REGIONS order),
    what the row keeps to say which landmarker each part of the label came from."""
    return np.stack([weights[:, ix].mean(axis=1) for ix in REGIONS.values()], axis=1).astype(np.float32)
