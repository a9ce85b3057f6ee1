"""SCRFD face detector through insightface's own model_zoo code: boxes + 5 points.

insightface's SCRFD detects one image per call (its letterbox and anchor decoding are per image);
the detector is cheap next to the landmarkers, which are where batching pays.
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.detect.base import FaceBox
from pipeline.detect.onnx_session import providers_for
from pipeline.device import pick_device
from pipeline.weights import sha256_file, verified_path


class ScrfdOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score_threshold: float = Field(0.5, ge=0, le=1)
    input_size: int = Field(640, ge=128, le=2048, multiple_of=32)  # letterbox side
    nms_threshold: float = Field(0.4, gt=0, le=1)
    max_faces: int = Field(0, ge=0)  # 0 = all


class ScrfdDetector:
    name = "scrfd"

    def __init__(self, weights, *, weights_sha256: str | None = None, device: str = "auto", batch_size: int = 1,
                 options: ScrfdOptions | None = None):
        from insightface.model_zoo import get_model

        self.options = options or ScrfdOptions()
        path = verified_path(weights, weights_sha256, what="SCRFD weights")
        self.weights_sha256 = sha256_file(path)
        self.device = pick_device(device)
        self.model = get_model(str(path), providers=providers_for(self.device))
        if self.model is None or getattr(self.model, "taskname", None) != "detection":
            raise ValueError(f"{path} is not an insightface detection model")
        ctx = self.device.index or 0 if self.device.type == "cuda" else -1
        self.model.prepare(ctx_id=ctx, input_size=(self.options.input_size,) * 2,
                           det_thresh=self.options.score_threshold, nms_thresh=self.options.nms_threshold)

    def __call__(self, images: list[np.ndarray]) -> list[list[FaceBox]]:
        out = []
        for img in images:
            det, kps = self.model.detect(cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                                         input_size=(self.options.input_size,) * 2, max_num=self.options.max_faces)
            order = np.argsort(-det[:, 4]) if len(det) else []
            out.append([FaceBox(bbox=det[k, :4].astype(np.float32), score=float(det[k, 4]),
                                kps5=None if kps is None else kps[k].astype(np.float32)) for k in order])
        return out
