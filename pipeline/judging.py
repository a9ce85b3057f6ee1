"""Judging a face's candidate labels: the verifier scores every candidate, the fusion weighs them by those
scores, and the label score measures the label that results.

One function, `judge_candidates`, for the build (`pipeline/labeling.py`: the face's label) and for a
round's relabelling (`trainer/rescore.py`: the student as one more candidate), so the label a round
proposes is judged exactly as the build judged the label it may replace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.crops import apply_affine
from pipeline.fusion import fuse, region_weights, voters
from pipeline.verifier import Verifier, VerifierInputs, context_nme, face_nme

FUSED = "fused"  # the label_source of a fused label


@dataclass
class FaceCandidates:
    """One face to judge. Every point set is (68, 2) in one frame, the one `to_crop` maps to crop px."""

    crop_rgb: np.ndarray  # (120, 120, 3) uint8: the teacher's crop the verifier reads
    candidates: list[tuple[str, np.ndarray]]  # named, the primary first: fused, and the verifier's context
    pose_deg: np.ndarray  # (3,) yaw, pitch, roll; NaN where unknown
    to_crop: np.ndarray | None = None  # (6,) affine from the points' frame to crop px; None: already crop px
    # Fused with the candidates but no part of the context the verifier reads them in (a round's student:
    # the build's context has no student, so the current label and the proposal are read alike).
    joining: list[tuple[str, np.ndarray]] = field(default_factory=list)
    # Scored in the same pass, neither fused nor context (the face's current label, to compare with).
    others: list[np.ndarray] = field(default_factory=list)

    def in_crop(self, points: np.ndarray) -> np.ndarray:
        if self.to_crop is None:
            return points
        return apply_affine(points.reshape(-1, 2), self.to_crop).reshape(points.shape)


@dataclass
class Judgement:
    """One face's candidates judged."""

    head_nme: np.ndarray  # (K + J + L,) float32: the head's predicted NME of the candidates, joining, others
    fusion_weights: np.ndarray  # (K + J, regions): each fused candidate's mean weight per region
    label: np.ndarray  # (68, 2) in the face's frame: the fusion, or the primary's points when not fusing
    label_source: str  # FUSED, or the primary's name
    label_nme: float  # the label score's predicted NME of `label`


@dataclass
class Judged:
    """`judge_candidates`' answer: per face, and what measuring one more label of the faces needs."""

    faces: list[Judgement]
    context_nme: np.ndarray  # [N, len(CONTEXT)] the head's figures for the candidates, in CONTEXT order
    visibility: np.ndarray | None  # [N, 21] the faces' marked-point chances from the candidates' pass
    _inputs: list = field(repr=False, default_factory=list)  # per face: label (crop px) -> VerifierInputs

    def measure(self, verifier: Verifier, labels: list[np.ndarray], head_nme: np.ndarray) -> np.ndarray:
        """[N] the label score's predicted NME of one label per face ((68, 2) crop px), given the head's
        figure for it from the candidates' pass (one of `Judgement.head_nme`): measured as the label is."""
        return verifier.label_nme([inputs(label[None]) for inputs, label in zip(self._inputs, labels)],
                                  np.asarray(head_nme, np.float64), self.context_nme, self.visibility)


def _head_nmes(errs: list[np.ndarray]) -> list[np.ndarray]:
    """Per face [L, 68] predicted point errors -> per face [L] predicted NME, in one call (face_nme builds
    its matrix per call)."""
    import torch

    flat = face_nme(torch.from_numpy(np.concatenate(errs))).numpy()
    return np.split(flat, np.cumsum([len(e) for e in errs])[:-1])


def judge_candidates(verifier: Verifier, faces: list[FaceCandidates], *, tau_pct: float, fuse_labels: bool) -> Judged:
    """Score every face's candidates (with its joining labels and others) in one verifier pass, fuse the
    candidates and joining labels by those scores (`tau_pct`, the jaw voted on by 3D-contour candidates
    only), score the fusions in a second pass and measure each face's label with the label score.

    With `fuse_labels` False the label is the primary's points, already scored as a candidate; the
    fusion weights are still given (the row keeps them to say which candidate each region would follow)."""
    frame = [np.stack([p for _, p in f.candidates + f.joining] + list(f.others)) for f in faces]
    # Each face's points in crop px, once: the labels of the first pass and the context of every label
    # judged, so the teacher's points are among those labels exactly (the pass reads visibility there).
    crop = [f.in_crop(points) for f, points in zip(faces, frame)]

    def inputs_of(i: int):
        named = [(name, points) for (name, _), points in zip(faces[i].candidates, crop[i])]
        return lambda labels: VerifierInputs.of(faces[i].crop_rgb, labels, named, faces[i].pose_deg)

    inputs = [inputs_of(i) for i in range(len(faces))]
    scored = verifier.score_with_visibility([make(c) for make, c in zip(inputs, crop)])
    head = _head_nmes(scored.point_err)
    context = np.stack([context_nme([n for n, _ in f.candidates], nme[:len(f.candidates)])
                        for f, nme in zip(faces, head)])
    fused, weights = [], []
    for f, points, err in zip(faces, frame, scored.point_err):
        n = len(f.candidates) + len(f.joining)
        label, w = fuse(points[:n], err[:n], tau_pct, voters([name for name, _ in f.candidates + f.joining]))
        fused.append(label)
        weights.append(region_weights(w))
    if fuse_labels:
        labels = fused
        labels_crop = [f.in_crop(label[None]) for f, label in zip(faces, fused)]
        fused_inputs = [make(c) for make, c in zip(inputs, labels_crop)]
        label_head = [nme[0] for nme in _head_nmes(verifier.score(fused_inputs, scored.maps))]
    else:
        labels = [points[0] for points in frame]
        labels_crop = [c[:1] for c in crop]
        label_head = [nme[0] for nme in head]
    judged = Judged([], context, scored.visibility, inputs)
    label_nme = judged.measure(verifier, [c[0] for c in labels_crop], np.asarray(label_head, np.float64))
    judged.faces = [Judgement(nme, w, label, FUSED if fuse_labels else f.candidates[0][0], float(score))
                    for f, nme, w, label, score in zip(faces, head, weights, labels, label_nme)]
    return judged
