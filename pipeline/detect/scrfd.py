"""SCRFD face detector: boxes + 5 points.

Two backends over the same ONNX file. `onnxruntime` runs insightface's own model_zoo code, one
image per call (the CPU default). `torch` runs the graph in PyTorch (`onnx_torch`), batched across
images, for the GPU (onnxruntime's GPU build cannot be carried); its letterbox, anchor decoding
and NMS follow insightface's `SCRFD.detect` step for step, and a test holds the two together.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.detect.base import FaceBox
from pipeline.detect.onnx_session import providers_for, resolve_backend, session_options
from pipeline.device import autocast, pick_device, resolve_batch_size, resolve_precision
from pipeline.device_images import as_numpy, image_hw, is_tensor_batch, resize
from pipeline.weights import sha256_file, verified_path


class ScrfdOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score_threshold: float = Field(0.5, ge=0, le=1)
    input_size: int = Field(640, ge=128, le=2048, multiple_of=32)  # letterbox side
    nms_threshold: float = Field(0.4, gt=0, le=1)
    max_faces: int = Field(0, ge=0)  # 0 = all
    backend: Literal["auto", "onnxruntime", "torch"] = "auto"  # auto: torch on CUDA, onnxruntime on CPU


class ScrfdDetector:
    name = "scrfd"

    def __init__(self, weights, *, weights_sha256: str | None = None, device: str = "auto", batch_size: int | None = None,
                 precision: str = "auto", options: ScrfdOptions | None = None):
        self.options = options or ScrfdOptions()
        path = verified_path(weights, weights_sha256, what="SCRFD weights")
        self.weights_sha256 = sha256_file(path)
        self.device = pick_device(device)
        self.batch_size = resolve_batch_size(batch_size, self.device, cpu=16, gpu=64)  # the torch backend's
        self.backend = resolve_backend(self.options.backend, self.device)
        self.precision = resolve_precision(precision, self.device, backend=self.backend)
        if self.backend == "torch":
            from pipeline.detect.onnx_torch import OnnxModule, head_tensors

            self.net = OnnxModule(path).eval().to(self.device)
            self.heads = head_tensors(self.net)  # score x3, box x3, kps x3 (strides 8, 16, 32)
            if len(self.heads) != 9:
                raise ValueError(f"{path}: expected SCRFD's 9 outputs (scores, boxes, 5 points x 3 strides)")
            return
        from insightface.model_zoo import get_model

        self.model = get_model(str(path), providers=providers_for(self.device), sess_options=session_options())
        if self.model is None or getattr(self.model, "taskname", None) != "detection":
            raise ValueError(f"{path} is not an insightface detection model")
        ctx = self.device.index or 0 if self.device.type == "cuda" else -1
        self.model.prepare(ctx_id=ctx, input_size=(self.options.input_size,) * 2,
                           det_thresh=self.options.score_threshold, nms_thresh=self.options.nms_threshold)

    def __call__(self, images: list[np.ndarray]) -> list[list[FaceBox]]:
        if self.backend == "torch":
            out = []
            for start in range(0, len(images), self.batch_size):
                out += self._detect_torch(images[start:start + self.batch_size])
            return out
        out = []
        for img in images:
            det, kps = self.model.detect(cv2.cvtColor(as_numpy(img), cv2.COLOR_RGB2BGR),
                                         input_size=(self.options.input_size,) * 2, max_num=self.options.max_faces)
            out.append(self._faces(det, kps))
        return out

    @staticmethod
    def _faces(det: np.ndarray, kps: np.ndarray | None) -> list[FaceBox]:
        order = np.argsort(-det[:, 4], kind="stable") if len(det) else []
        return [FaceBox(bbox=det[k, :4].astype(np.float32), score=float(det[k, 4]),
                        kps5=None if kps is None else kps[k].astype(np.float32)) for k in order]

    # ------------------------------------------------------------------ the batched torch path

    def _letterbox_shape(self, h: int, w: int) -> tuple[int, int]:
        """insightface's: keep aspect, fit into size x size (placed top-left, zero padding)."""
        size = self.options.input_size
        if h / w > 1.0:
            return size, int(size / (h / w))
        return int(size * (h / w)), size

    def _letterbox(self, images: list) -> tuple[torch.Tensor, list[float]]:
        """The batch as the network's float input [N, 3, size, size] on the device, and each scale."""
        size = self.options.input_size
        shapes = [self._letterbox_shape(*image_hw(img)) for img in images]
        scales = [new_h / image_hw(img)[0] for img, (new_h, _) in zip(images, shapes)]
        if is_tensor_batch(images):  # GPU path: resize where the pixels already are
            x = torch.zeros((len(images), 3, size, size), device=self.device).contiguous(
                memory_format=torch.channels_last)  # as the host path's NHWC canvas
            for k, (img, (new_h, new_w)) in enumerate(zip(images, shapes)):
                x[k, :, :new_h, :new_w] = resize(img.to(self.device), new_h, new_w)
            return x, scales
        canvas = np.zeros((len(images), size, size, 3), np.uint8)
        for k, (img, (new_h, new_w)) in enumerate(zip(images, shapes)):
            canvas[k, :new_h, :new_w] = cv2.resize(img, (new_w, new_h))
        return torch.from_numpy(canvas).to(self.device).permute(0, 3, 1, 2).float(), scales

    def _detect_torch(self, images: list) -> list[list[FaceBox]]:
        x, scales = self._letterbox(images)
        x = (x - 127.5) / 128.0  # RGB, as insightface's blob (it swaps its BGR input)
        with torch.inference_mode(), autocast(self.device, self.precision):
            values = self.net.run(x, [name for name, _ in self.heads])
        heads = [values[name].float() for name, _ in self.heads]
        heads = [torch.sigmoid(h) if sigmoid else h for h, (_, sigmoid) in zip(heads, self.heads)]
        levels = []
        for level, stride in enumerate((8, 16, 32)):
            score, dist, kps = (heads[level + 3 * k] for k in range(3))
            n, anchors, fh, fw = score.shape
            # [N, A*k, H, W] -> [N, H*W*A, k]: insightface's (row, column, anchor) order.
            score = score.permute(0, 2, 3, 1).reshape(n, -1, 1)
            dist = dist.permute(0, 2, 3, 1).reshape(n, -1, 4) * stride
            kps = kps.permute(0, 2, 3, 1).reshape(n, -1, 5, 2) * stride
            ys, xs = torch.meshgrid(torch.arange(fh, device=x.device), torch.arange(fw, device=x.device),
                                    indexing="ij")
            centres = (torch.stack([xs, ys], -1).reshape(-1, 1, 2) * stride).expand(-1, anchors, 2).reshape(-1, 2)
            centres = centres.to(dist.dtype)
            box = torch.cat([centres - dist[..., :2], centres + dist[..., 2:]], -1)
            pts = centres[:, None, :] + kps
            levels.append(torch.cat([box, score, pts.reshape(n, -1, 10)], -1))
        rows = torch.cat(levels, 1)  # [N, all anchors, 15]: box, score, 5 points
        image_index, anchor = (rows[..., 4] >= self.options.score_threshold).nonzero(as_tuple=True)
        kept = rows[image_index, anchor].float().cpu().numpy()  # one copy to the host for the batch
        image_index = image_index.cpu().numpy()
        out = []
        for i in range(len(images)):
            rows = kept[image_index == i]  # a copy: scaled in place below
            if not len(rows):
                out.append([])
                continue
            rows[:, :4] /= scales[i]
            rows[:, 5:] /= scales[i]
            rows = rows[np.argsort(-rows[:, 4], kind="stable")]
            rows = rows[_nms(rows[:, :5], self.options.nms_threshold)]
            if self.options.max_faces:
                rows = rows[: self.options.max_faces]  # insightface ranks by area and centring; rare
            out.append(self._faces(rows[:, :5], rows[:, 5:].reshape(-1, 5, 2)))
        return out


def _nms(dets: np.ndarray, threshold: float) -> list[int]:
    """insightface's NMS (pixel-inclusive areas, +1), on score-sorted rows."""
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        overlap = w * h / (areas[i] + areas[order[1:]] - w * h)
        order = order[1:][overlap <= threshold]
    return keep
