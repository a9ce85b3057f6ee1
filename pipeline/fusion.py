"""Fuse a face's candidate labels into one: per point, a soft vote weighted by the verifier.

Each candidate's point gets weight softmax(-predicted error / tau) over the candidates present, so
a landmarker that the verifier expects to be wrong at this pose, on this face, in this region,
fades out, and agreeing good candidates average their independent noise away. tau was chosen on
the training split's cross-fitted predictions (docs/labels.md), never on the evaluation split.
"""

from __future__ import annotations

import numpy as np

from pipeline.verifier import REGIONS

TAU_PCT = 2.0


def fusion_weights(point_err: np.ndarray, tau: float = TAU_PCT) -> np.ndarray:
    """[K, 68] predicted point errors (%) -> [K, 68] weights that sum to 1 over the K candidates."""
    z = -np.asarray(point_err, np.float64) / tau
    z -= z.max(axis=0, keepdims=True)
    w = np.exp(z)
    return (w / w.sum(axis=0, keepdims=True)).astype(np.float32)


def fuse(candidates: np.ndarray, point_err: np.ndarray, tau: float = TAU_PCT) -> tuple[np.ndarray, np.ndarray]:
    """[K, 68, 2] candidates (one point convention, same frame) -> fused [68, 2] and weights [K, 68]."""
    w = fusion_weights(point_err, tau)
    return (w[..., None] * candidates).sum(axis=0).astype(np.float32), w


def region_weights(weights: np.ndarray) -> np.ndarray:
    """[K, 68] point weights -> [K, R] mean weight of each candidate in each region (REGIONS order),
    what the row keeps to say which landmarker each part of the label came from."""
    return np.stack([weights[:, ix].mean(axis=1) for ix in REGIONS.values()], axis=1).astype(np.float32)
