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

log = logging.getLogger(__name__)


@dataclass
class Chain:
    spec: DetectorChain
    _face: object = None
    _landmarkers: list = field(default_factory=list)

    @property
    def face_detector(self):
        if self._face is None:  # built lazily: a run of pre-cropped sources never needs it
            from pipeline.detect.registry import build_face_detector

            self._face = build_face_detector(self.spec.face)
        return self._face

    @property
    def landmarkers(self) -> list:
        if not self._landmarkers:
            from pipeline.detect.registry import build_landmarker

            self._landmarkers = [build_landmarker(s) for s in self.spec.landmarkers]
        return self._landmarkers

    def identity(self) -> list[dict]:
        """Names and weight digests, for the manifest."""
        return [{"role": "face", "name": self.spec.face.name, "weights": str(self.spec.face.weights)}] + [
            {"role": "primary" if i == 0 else "landmarker", "name": s.name, "weights": str(s.weights)}
            for i, s in enumerate(self.spec.landmarkers)
        ]


_CHAINS: dict[str, Chain] = {}
_CHAINS_LOCK = threading.Lock()


def get_chain(spec: DetectorChain) -> Chain:
    """The process-wide chain for `spec` (models load once per worker, not once per batch)."""
    key = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
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


def _mirror_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 0] = width - 1 - boxes[:, 2]
    out[:, 2] = width - 1 - boxes[:, 0]
    return out


def label_images(chain: Chain, images: list, pre_cropped: list[bool]) -> list[list[LabelledFace]]:
    """Faces with labels for each image; batched across all images of the call.

    `images` are host arrays (the CPU path) or device tensors (the GPU path, `device_images`); the
    same steps run on either, and only the finished crops and points come back to the host.
    """
    sizes = [image_hw(img) for img in images]
    # 1. Boxes: one detector call over every image that needs detection.
    boxes: list[list[FaceBox]] = [[] for _ in images]
    need = [i for i, pc in enumerate(pre_cropped) if not pc]
    if need:
        for i, found in zip(need, chain.face_detector([images[i] for i in need])):
            boxes[i] = list(found)
    for i, pc in enumerate(pre_cropped):
        if pc:
            h, w = sizes[i]
            boxes[i] = [FaceBox(bbox=box_from_full_crop(w, h), score=1.0)]
    box_arrays = [np.array([b.bbox for b in bs], dtype=np.float32).reshape(-1, 4) for bs in boxes]

    # 2. Landmarks from every landmarker, and the primary's on the mirrored images (flip consistency).
    landmarkers = chain.landmarkers
    primary, alts = landmarkers[0], landmarkers[1:]
    results = [m(images, box_arrays) for m in landmarkers]
    mirrored = [mirror(img) for img in images]
    flipped = primary(mirrored, [_mirror_boxes(b, w) for b, (_, w) in zip(box_arrays, sizes)])

    # 3. The trainer's crop: where the primary has 3DMM params, the roi it predicted them in (so
    # params_62 is in the crop's frame); otherwise the 3DDFA roi of its 68 points. All in one call.
    faces_at = [(i, j) for i in range(len(images)) for j in range(len(boxes[i]))]
    rois = []
    for i, j in faces_at:
        first = results[0][i][j]
        rois.append((i, first.roi if first.params_62 is not None else roi_from_landmarks(first.points)))
    crops = crops_to_numpy(crop_rois(images, rois, CROP_SIZE))

    out: list[list[LabelledFace]] = [[] for _ in images]
    for (i, j), (_, roi), crop in zip(faces_at, rois, crops):
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise RuntimeError("JPEG encoding of a face crop failed")
        out[i].append(
            LabelledFace(
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
        )
    return out
