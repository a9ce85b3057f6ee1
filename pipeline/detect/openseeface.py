"""OpenSeeFace landmark model 0: a third independent 68-point opinion (heatmaps + offsets, 224x224).

Recipe (models/openseeface/README.md): the face's tight box grown by 10% of its width left and right
and 12.5% of its height top and bottom, stretched (not squared) to 224x224 RGB, ImageNet-normalised.
The net gives 66 heatmaps at 28x28 and per-cell offsets; each point is the heatmap's argmax cell
plus its offset (logit / 16). Its 66 points are iBUG-68 with the two inner mouth corners merged:
`TO_68` restores the 68-point convention every other candidate uses.
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

INPUT_SIZE = 224
HEATMAP_SIZE = 28
N_RAW = 66
_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0

# iBUG-68 index -> raw OpenSeeFace index. 0-47 are the same; the mouth's inner corners (60, 64) are
# the outer ones (48, 54) in the 66-point model, so those raw points serve twice.
TO_68 = np.array(
    list(range(48))
    + [58, 48, 49, 50, 51, 52, 62, 53, 54, 55, 56, 57]  # outer lips 48-59
    + [58, 59, 60, 61, 62, 63, 64, 65],  # inner lips 60-67
    dtype=np.int64,
)


class OpenSeeFaceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grow_x: float = Field(0.10, ge=0.0, le=1.0)  # of the box width, on each side
    grow_y: float = Field(0.125, ge=0.0, le=1.0)  # of the box height, top and bottom
    # A second pass from the model's own points (upstream's tracking recipe): the first box is a face
    # detector's, not the tight landmark box the model was trained on.
    refine: bool = True
    backend: Literal["auto", "onnxruntime", "torch"] = "auto"  # auto: torch on CUDA, onnxruntime on CPU


def osf_box(tight_box: np.ndarray, grow_x: float, grow_y: float) -> np.ndarray:
    """Tight face box (l, t, r, b) -> the model's crop box (grown, not squared)."""
    left, top, right, bottom = (float(v) for v in tight_box[:4])
    w, h = right - left, bottom - top
    return np.array([left - grow_x * w, top - grow_y * h, right + grow_x * w, bottom + grow_y * h],
                    dtype=np.float32)


def _tensor(per_channel: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(per_channel, device=device).view(1, 3, 1, 1)


def decode_heatmaps(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, 198, 28, 28] -> points [N, 66, 2] in 224-crop pixels (x, y), confidences [N, 66]."""
    n = out.shape[0]
    heat = out[:, :N_RAW].reshape(n, N_RAW, -1)
    cell = heat.argmax(-1)
    conf = np.take_along_axis(heat, cell[..., None], -1)[..., 0]
    row, col = cell // HEATMAP_SIZE, cell % HEATMAP_SIZE

    def offset(first: int) -> np.ndarray:
        p = np.take_along_axis(out[:, first:first + N_RAW].reshape(n, N_RAW, -1), cell[..., None], -1)[..., 0]
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p)) / 16.0

    scale = INPUT_SIZE - 1
    v = scale * (row / (HEATMAP_SIZE - 1) + offset(N_RAW))
    u = scale * (col / (HEATMAP_SIZE - 1) + offset(2 * N_RAW))
    return np.stack([u, v], -1).astype(np.float32), conf.astype(np.float32)


class OpenSeeFaceLandmarker:
    name = "openseeface"

    def __init__(self, weights, *, weights_sha256: str | None = None, device: str = "auto", batch_size: int | None = None,
                 precision: str = "auto", options: OpenSeeFaceOptions | None = None):
        self.options = options or OpenSeeFaceOptions()
        path = verified_path(weights, weights_sha256, what="OpenSeeFace weights")
        self.weights_sha256 = sha256_file(path)
        self.device = pick_device(device)
        self.batch_size = resolve_batch_size(batch_size, self.device, cpu=8, gpu=64)
        self.backend = resolve_backend(self.options.backend, self.device)
        self.precision = resolve_precision(precision, self.device, backend=self.backend)
        self._run = OnnxRunner(path, self.device, self.backend, self.precision, session_model=None)

    def _points(self, images: list, rois: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """68 image-pixel points and scores for each (image index, crop box)."""
        pts_all, conf_all = [], []
        for start in range(0, len(rois), self.batch_size):
            chunk = rois[start:start + self.batch_size]
            crops = crop_rois(images, chunk, INPUT_SIZE)
            if isinstance(crops, torch.Tensor):  # [N, 3, 224, 224] RGB grey levels, on the device
                x = (crops - _tensor(_MEAN, crops.device)) / _tensor(_STD, crops.device)
            else:  # bytes laid out NCHW first, then the same float32 steps in place: the same values in less
                # time (figures: docs/benchmarks.md, 'The bundled build against c679b14, ...')
                x = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous().float()
                x = x.sub_(_tensor(_MEAN, x.device)).div_(_tensor(_STD, x.device)).numpy()
            uv, conf = decode_heatmaps(self._run(x))
            for (_, roi), p, c in zip(chunk, uv, conf):
                sx, sy, ex, ey = roi_window(roi)
                scale = np.array([(ex - sx) / INPUT_SIZE, (ey - sy) / INPUT_SIZE], np.float32)
                pts_all.append((p * scale + np.array([sx, sy], np.float32))[TO_68])
                conf_all.append(np.clip(c, 0.0, 1.0)[TO_68])
        return np.asarray(pts_all, np.float32).reshape(-1, 68, 2), np.asarray(conf_all, np.float32).reshape(-1, 68)

    def __call__(self, images: list, boxes: list[np.ndarray]) -> list[list[Landmarks]]:
        if self.backend == "onnxruntime" and is_tensor_batch(images):
            images = [as_numpy(img) for img in images]
        o = self.options
        faces = [(i, b) for i, bs in enumerate(boxes) for b in bs]
        rois = [(i, osf_box(b, o.grow_x, o.grow_y)) for i, b in faces]
        points, scores = self._points(images, rois)
        if o.refine and len(rois):
            # The tight box of its own 66 distinct points, as upstream tracks a face from frame to frame.
            rois = [(i, osf_box(np.concatenate([p.min(0), p.max(0)]), o.grow_x, o.grow_y))
                    for (i, _), p in zip(rois, points)]
            points, scores = self._points(images, rois)
        out: list[list[Landmarks]] = [[] for _ in images]
        for (i, roi), p, s in zip(rois, points, scores):
            out[i].append(Landmarks(points=p, scores=s, roi=roi))
        return out
