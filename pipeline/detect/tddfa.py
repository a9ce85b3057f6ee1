"""3DDFA_V2's mb05 as a landmarker: box -> 3DDFA crop -> 62 3DMM params -> 68 points and head pose.

The teacher of the 2DASL trainer. Recipe (models README): crop side int(1.58 x box size), centre
shifted down 0.14; BGR (x - 127.5) / 128; params = net * std + mean; points from the `bfm/` basis.
With `refine` a second pass re-crops from the first pass's 68 points (3DDFA_V2's own two-step
use), which the measured figures show closes most of the gap to ground-truth crops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from pipeline.crops import CROP_SIZE, roi_from_box, roi_from_landmarks
from pipeline.detect import onnx_session
from pipeline.detect.base import Landmarks
from pipeline.device import autocast, pick_device, resolve_batch_size, resolve_precision
from pipeline.device_images import crop_rois
from pipeline.weights import sha256_file, verified_path


class TDDFAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bfm: Path  # bfm/bfm_68.npz
    param_stats: Path  # 3ddfa_v2/param_mean_std_62d_120x120.pkl
    refine: bool = True  # second pass from the first pass's landmarks
    # auto: the network as an ONNX graph in ONNX Runtime on CPU (faster there, same weights), torch on CUDA
    backend: Literal["auto", "onnxruntime", "torch"] = "auto"


def bgr_normalized(crops: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] RGB uint8 crops -> the network's input, [N, 3, H, W] BGR float32 (v - 127.5) / 128.

    The same float32 operations as the tensor path of `predict_crops`, so the same values, in one
    strided copy and two in-place passes instead of five (timing: docs/benchmarks.md, sixth session)."""
    x = np.empty((crops.shape[0], 3, *crops.shape[1:3]), np.float32)
    np.copyto(x, crops[..., ::-1].transpose(0, 3, 1, 2), casting="unsafe")
    x -= np.float32(127.5)
    x /= np.float32(128.0)
    return x


class TDDFALandmarker:
    name = "tddfa_mb05"

    def __init__(self, weights, *, weights_sha256: str | None = None, device: str = "auto", batch_size: int | None = None,
                 precision: str = "auto", options: TDDFAOptions):
        from pipeline.bfm import landmarks_3d, load_bfm, load_param_stats
        from pipeline.mobilenet import fused_for_inference, load_teacher_mobilenet

        self.device = pick_device(device)
        self.backend = onnx_session.resolve_backend(options.backend, self.device)
        self.precision = resolve_precision(precision, self.device, backend=self.backend)
        self.batch_size = resolve_batch_size(batch_size, self.device, cpu=16, gpu=128)
        self.refine = options.refine
        path = verified_path(weights, weights_sha256, what="3DDFA_V2 mb05 weights")
        self.weights_sha256 = sha256_file(path)
        teacher = load_teacher_mobilenet(path, in_channels=3, weights_sha256=self.weights_sha256)
        # BN folded into the convs: same outputs. The verifier reads its trunk (`labeling.Chain.verifier`).
        self.net = fused_for_inference(teacher).to(self.device)
        self.session = None  # the torch network runs the passes
        if self.backend == "onnxruntime":
            example = torch.zeros(1, 3, CROP_SIZE, CROP_SIZE)
            self.session = onnx_session.session(onnx_session.onnx_graph(self.net, example), self.device)
        self.bfm = load_bfm(options.bfm, device=self.device)
        mean, std = load_param_stats(options.param_stats)
        self.mean = torch.as_tensor(mean, device=self.device)
        self.std = torch.as_tensor(std, device=self.device)
        self._to_points = landmarks_3d

    @torch.inference_mode()
    def predict_crops(self, crops) -> tuple[np.ndarray, np.ndarray]:
        """RGB crops -> (params [N, 62], crop-pixel points [N, 68, 3]), batched.

        `crops`: [N, 120, 120, 3] uint8 host array, or [N, 3, 120, 120] float tensor of grey levels
        (`device_images.crop_rois` on the GPU path: no host round trip)."""
        params, points = [np.zeros((0, 62), np.float32)], [np.zeros((0, 68, 3), np.float32)]
        for i in range(0, len(crops), self.batch_size):
            x = self._net_input(crops[i:i + self.batch_size])
            if self.session is not None:
                p = torch.from_numpy(self.session.run(None, {"x": x})[0]).to(self.device)
            else:
                with autocast(self.device, self.precision):
                    p = self.net(x).float()
            p = p * self.std + self.mean
            params.append(p.cpu().numpy())
            points.append(self._to_points(p, self.bfm).cpu().numpy())
        return np.concatenate(params), np.concatenate(points)

    def _net_input(self, chunk):
        """A chunk of crops as the network takes it, BGR (v - 127.5) / 128: a host array for ONNX Runtime,
        else a channels-last tensor on the device (faster convolutions)."""
        if self.session is not None and not isinstance(chunk, torch.Tensor):
            return bgr_normalized(chunk)  # host crops: the same values in fewer passes
        if isinstance(chunk, torch.Tensor):
            x = chunk.to(self.device).float()
        else:
            x = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device).permute(0, 3, 1, 2).float()
        x = (x.flip(1) - 127.5) / 128.0  # RGB -> BGR, as trained
        if self.session is not None:
            return x.contiguous().cpu().numpy()
        return x.contiguous(memory_format=torch.channels_last)

    def predict_rois(self, images: list, rois: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """One roi per (image index, roi) pair flattened -> (params [N, 62], image-pixel points [N, 68, 3])."""
        from pipeline.bfm import project_to_image

        params, pts = self.predict_crops(crop_rois(images, rois, CROP_SIZE))
        image_pts = np.stack([project_to_image(p, roi) for p, (_, roi) in zip(pts, rois)]) if rois else pts
        return params, image_pts

    def __call__(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[list[Landmarks]]:
        from pipeline.bfm import pose_from_params

        rois = [(i, roi_from_box(b)) for i, bs in enumerate(boxes) for b in bs]
        params, pts = self.predict_rois(images, rois)
        if self.refine and rois:
            rois = [(i, roi_from_landmarks(p[:, :2])) for (i, _), p in zip(rois, pts)]
            params, pts = self.predict_rois(images, rois)
        poses = pose_from_params(params) if len(params) else np.zeros((0, 3), np.float32)
        out: list[list[Landmarks]] = [[] for _ in images]
        for (i, roi), p, pt, pose in zip(rois, params, pts, poses):
            out[i].append(Landmarks(points=pt[:, :2].astype(np.float32), scores=np.ones(68, np.float32),
                                    roi=roi.astype(np.float32), pose_deg=pose, params_62=p.astype(np.float32)))
        return out
