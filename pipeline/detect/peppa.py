"""Peppa slim_160: an independent 68-point regressor, the chain's second opinion.

Recipe (models README): the face box's centre, a square of 1.4 x box width, 160x160 BGR,
(x - 127) / 127; the first 136 outputs are 68 (x, y) in [0, 1] of that crop. The released ONNX
file fixes batch 1; its graph has no reshape, so we relabel the batch axis as dynamic and batch.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.crops import roi_window
from pipeline.detect.base import Landmarks
from pipeline.detect.onnx_session import OnnxRunner, resolve_backend
from pipeline.device import pick_device, resolve_batch_size, resolve_precision
from pipeline.device_images import as_numpy, crop_rois, is_tensor_batch
from pipeline.weights import sha256_file, verified_path

INPUT_SIZE = 160


class PeppaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    box_scale: float = Field(1.4, ge=1.0, le=3.0)
    backend: Literal["auto", "onnxruntime", "torch"] = "auto"  # auto: torch on CUDA, onnxruntime on CPU


def _dynamic_batch(path) -> bytes:
    import onnx

    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]  # weights listed as inputs block folding
    del model.graph.input[:]
    model.graph.input.extend(graph_inputs)
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return model.SerializeToString()


def peppa_roi(box: np.ndarray, scale: float) -> np.ndarray:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = scale * (box[2] - box[0])
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dtype=np.float32)


class PeppaLandmarker:
    name = "peppa68"

    def __init__(self, weights, *, weights_sha256: str | None = None, device: str = "auto", batch_size: int | None = None,
                 precision: str = "auto", options: PeppaOptions | None = None):
        self.options = options or PeppaOptions()
        path = verified_path(weights, weights_sha256, what="Peppa weights")
        self.weights_sha256 = sha256_file(path)
        self.device = pick_device(device)
        self.batch_size = resolve_batch_size(batch_size, self.device, cpu=8, gpu=64)
        self.backend = resolve_backend(self.options.backend, self.device)
        self.precision = resolve_precision(precision, self.device, backend=self.backend)
        self._run = OnnxRunner(path, self.device, self.backend, self.precision, session_model=_dynamic_batch)

    def __call__(self, images: list, boxes: list[np.ndarray]) -> list[list[Landmarks]]:
        rois = [(i, peppa_roi(b, self.options.box_scale)) for i, bs in enumerate(boxes) for b in bs]
        if self.backend == "onnxruntime" and is_tensor_batch(images):
            images = [as_numpy(img) for img in images]
        out: list[list[Landmarks]] = [[] for _ in images]
        for start in range(0, len(rois), self.batch_size):
            chunk = rois[start:start + self.batch_size]
            crops = crop_rois(images, chunk, INPUT_SIZE)
            if isinstance(crops, torch.Tensor):  # [N, 3, 160, 160] RGB grey levels, on the device
                x = (crops.flip(1) - 127.0) / 127.0
            else:
                x = np.ascontiguousarray(((crops[..., ::-1].astype(np.float32) - 127.0) / 127.0).transpose(0, 3, 1, 2))
            y = self._run(x)
            for (i, roi), row in zip(chunk, y):
                sx, sy, ex, ey = roi_window(roi)
                pts = row[:136].reshape(68, 2) * np.array([ex - sx, ey - sy]) + np.array([sx, sy])
                out[i].append(Landmarks(points=pts.astype(np.float32), scores=np.ones(68, np.float32),
                                        roi=roi))
        return out
