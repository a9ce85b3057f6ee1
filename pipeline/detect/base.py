"""The two detector contracts: face detectors give boxes, landmarkers give 68 points per box.

Both are batched over images and run on the device they were built for. Images are RGB uint8
(H, W, 3) numpy arrays; coordinates are original-image pixels, 0-based, pixel centres at integers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class FaceBox:
    bbox: np.ndarray  # (4,) float32: left, top, right, bottom
    score: float
    kps5: np.ndarray | None = None  # (5, 2) float32: eyes, nose, mouth corners, when the model gives them


@dataclass
class Landmarks:
    points: np.ndarray  # (68, 2) float32, iBUG 68-point scheme, image pixels
    scores: np.ndarray  # (68,) float32 per-point confidence in [0, 1]; ones when the model has none
    roi: np.ndarray  # (4,) float32: the square crop box the model looked at
    pose_deg: np.ndarray | None = None  # (3,) yaw, pitch, roll in degrees, from 3DMM landmarkers
    params_62: np.ndarray | None = None  # (62,) de-whitened 3DMM params (12 pose, 40 shape, 10 exp)
    extra: dict = field(default_factory=dict)


@runtime_checkable
class FaceDetector(Protocol):
    name: str
    weights_sha256: str

    def __call__(self, images: list[np.ndarray]) -> list[list[FaceBox]]:
        """One list of faces per image, best score first."""
        ...


@runtime_checkable
class Landmarker(Protocol):
    name: str
    weights_sha256: str

    def __call__(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[list[Landmarks]]:
        """`boxes[i]` is an (n_i, 4) float array of face boxes in `images[i]`; returns n_i results each."""
        ...
