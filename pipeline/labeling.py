"""One batch of decoded images -> labelled face rows: detect, landmark (primary + others), flip, crop.

The detector chain is built once per process and reused by every batch that process runs.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.catalog import DetectorChain
from pipeline.crops import CROP_SIZE, box_from_full_crop, crop_affine, roi_from_landmarks
from pipeline.detect.base import FaceBox, Landmarks
from pipeline.device_images import crop_rois, crops_to_numpy, image_hw, mirror
from pipeline.landmarks import mirror_points
from pipeline.threads import onnx_threads
from pipeline.timings import stage

log = logging.getLogger(__name__)


@dataclass
class Chain:
    spec: DetectorChain
    _face: object = None
    _landmarkers: list = field(default_factory=list)
    _verifier: object = None
    # The batch threads of a worker share its chain: each model is built once, by the first to ask.
    _load_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def face_detector(self):
        with self._load_lock:
            if self._face is None:  # built lazily: a run of pre-cropped sources never needs it
                from pipeline.detect.factory import build_face_detector

                self._face = build_face_detector(self.spec.face)
            return self._face

    @property
    def landmarkers(self) -> list:
        with self._load_lock:
            if not self._landmarkers:
                from pipeline.detect.factory import build_landmarker

                self._landmarkers = [build_landmarker(s) for s in self.spec.landmarkers]
            return self._landmarkers

    @property
    def verifier(self):
        """The label verifier over the teacher's network, or None when the chain has none."""
        if self.spec.verifier is None:
            return None
        with self._load_lock:
            if self._verifier is None:
                from pipeline.verifier import Verifier

                teacher = next(m for m in self.landmarkers if m.name == "tddfa_mb05")
                self._verifier = Verifier.load(teacher.net, self.spec.verifier.weights, device=teacher.device)
            return self._verifier

    def identity(self) -> list[dict]:
        """Names and weight digests, for the manifest."""
        return [{"role": "face", "name": self.spec.face.name, "weights": str(self.spec.face.weights)}] + [
            {"role": "primary" if i == 0 else "landmarker", "name": s.name, "weights": str(s.weights)}
            for i, s in enumerate(self.spec.landmarkers)
        ]


_CHAINS: dict[str, Chain] = {}
_CHAINS_LOCK = threading.Lock()


def get_chain(spec: DetectorChain) -> Chain:
    """The process-wide chain for `spec` (models load once per worker, not once per batch), one per
    ONNX Runtime thread count (a session's is fixed when it is made: `pipeline.threads`)."""
    key = json.dumps([spec.model_dump(mode="json"), onnx_threads()], sort_keys=True)
    with _CHAINS_LOCK:
        if key not in _CHAINS:
            _CHAINS[key] = Chain(spec)
        return _CHAINS[key]


@dataclass
class LabelledFace:
    face_index: int
    box: FaceBox
    primary: Landmarks
    alts: list[tuple[str, Landmarks]]
    flip_points: np.ndarray | None
    crop_rgb: np.ndarray
    crop_jpeg: bytes
    affine: np.ndarray
    roi: np.ndarray
    # Every candidate label (name, (68, 2) image pixels), the primary first, all in iBUG-68 order.
    candidates: list[tuple[str, np.ndarray]] = field(default_factory=list)
    label: np.ndarray | None = None  # the face's label: the fusion, or the primary's points
    label_source: str = ""  # "fused" or the candidate it is
    candidate_nme_pred: np.ndarray | None = None  # (K,) the verifier's predicted NME of each candidate
    fusion_weights: np.ndarray | None = None  # (K, regions) mean fusion weight per region
    label_nme_pred: float = float("nan")  # the verifier's predicted NME of the label


FLIP_SUFFIX = ".flip"  # the primary on the mirrored image, mirrored back: a candidate of its own


def _choose_labels(chain: Chain, faces: list[LabelledFace]) -> None:
    """Each face's label: the primary's points, or with a verifier in the chain its judged candidates'
    fusion (`judge_candidates`), for every face of the call in two batched verifier passes."""
    for face in faces:
        face.label, face.label_source = face.candidates[0][1], face.candidates[0][0]
    verifier = chain.verifier
    if verifier is None or not faces:
        return
    from pipeline.judging import FaceCandidates, judge_candidates

    unknown = np.full(3, np.nan, np.float32)
    judged = judge_candidates(verifier, [
        FaceCandidates(face.crop_rgb, face.candidates,
                       face.primary.pose_deg if face.primary.pose_deg is not None else unknown, to_crop=face.affine)
        for face in faces], tau_pct=chain.spec.verifier.tau_pct or verifier.tau_pct, fuse_labels=chain.spec.verifier.fuse)
    for face, judgement in zip(faces, judged.faces):
        face.label, face.label_source = judgement.label, judgement.label_source
        face.candidate_nme_pred = judgement.head_nme
        face.fusion_weights = judgement.fusion_weights
        face.label_nme_pred = judgement.label_nme


def _mirror_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 0] = width - 1 - boxes[:, 2]
    out[:, 2] = width - 1 - boxes[:, 0]
    return out


def label_images(chain: Chain, images: list, pre_cropped: list[bool],
                 boxes: list[np.ndarray | None] | None = None,
                 timings: dict[str, float] | None = None) -> list[list[LabelledFace]]:
    """Faces with labels for each image; batched across all images of the call.

    `images` are host arrays (the CPU path) or device tensors (the GPU path, `device_images`); the
    same steps run on either, and only the finished crops and points come back to the host.
    `boxes[i]`, when given (an (n_i, 4) array of face boxes in image px), replaces detection (and the
    pre-cropped box) for image i, one face per box with score 1: evaluation labels the reference's
    face this way (trainer/evaluate.py). None, or a None entry, detects as usual.
    `timings`, when given, gathers each step's seconds (`pipeline.timings`): detect, each landmarker,
    the primary on the mirrored images, crop, verifier.
    """
    sizes = [image_hw(img) for img in images]
    given = boxes if boxes is not None else [None] * len(images)
    if len(given) != len(images):
        raise ValueError(f"boxes: {len(given)} entries for {len(images)} images")
    # 1. Boxes: one detector call over every image that needs detection.
    boxes: list[list[FaceBox]] = [[] for _ in images]
    need = [i for i, pc in enumerate(pre_cropped) if not pc and given[i] is None]
    if need:
        with stage(timings, "detect"):
            for i, found in zip(need, chain.face_detector([images[i] for i in need])):
                boxes[i] = list(found)
    for i, pc in enumerate(pre_cropped):
        if given[i] is not None:
            boxes[i] = [FaceBox(bbox=np.asarray(b, np.float32), score=1.0)
                        for b in np.asarray(given[i], np.float32).reshape(-1, 4)]
        elif pc:
            h, w = sizes[i]
            boxes[i] = [FaceBox(bbox=box_from_full_crop(w, h), score=1.0)]
    box_arrays = [np.array([b.bbox for b in bs], dtype=np.float32).reshape(-1, 4) for bs in boxes]

    # 2. Landmarks from every landmarker, and the primary's on the mirrored images (flip consistency).
    landmarkers = chain.landmarkers
    primary, alts = landmarkers[0], landmarkers[1:]
    results = []
    for m in landmarkers:
        with stage(timings, m.name):
            results.append(m(images, box_arrays))
    with stage(timings, primary.name + FLIP_SUFFIX):
        mirrored = [mirror(img) for img in images]
        flipped = primary(mirrored, [_mirror_boxes(b, w) for b, (_, w) in zip(box_arrays, sizes)])

    # 3. The trainer's crop: where the primary has 3DMM params, the roi it predicted them in (so
    # params_62 is in the crop's frame); otherwise the 3DDFA roi of its 68 points. All in one call.
    out: list[list[LabelledFace]] = [[] for _ in images]
    everyone: list[LabelledFace] = []
    with stage(timings, "crop"):
        faces_at = [(i, j) for i in range(len(images)) for j in range(len(boxes[i]))]
        rois = []
        for i, j in faces_at:
            first = results[0][i][j]
            rois.append((i, first.roi if first.params_62 is not None else roi_from_landmarks(first.points)))
        crops = crops_to_numpy(crop_rois(images, rois, CROP_SIZE))

        for (i, j), (_, roi), crop in zip(faces_at, rois, crops):
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise RuntimeError("JPEG encoding of a face crop failed")
            face = LabelledFace(
                face_index=j,
                box=boxes[i][j],
                primary=results[0][i][j],
                alts=[(m.name, results[k + 1][i][j]) for k, m in enumerate(alts)],
                flip_points=mirror_points(flipped[i][j].points, sizes[i][1]),
                crop_rgb=crop,
                crop_jpeg=jpeg.tobytes(),
                affine=crop_affine(roi),
                roi=roi,
            )
            face.candidates = ([(primary.name, face.primary.points),
                                (primary.name + FLIP_SUFFIX, face.flip_points)]
                               + [(name, lm.points) for name, lm in face.alts])
            out[i].append(face)
            everyone.append(face)
    with stage(timings, "verifier"):
        _choose_labels(chain, everyone)
    return out
