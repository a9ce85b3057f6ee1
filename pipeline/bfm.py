"""3DDFA's BFM at the 68 landmarks: 62 params <-> pose / shape / expression -> 68 points.

Param layout (3DDFA / 2DASL): [0:12] the 3x4 camera matrix row-major (f*R | t), [12:52] 40 shape
and [52:62] 10 expression coefficients. Points are in 120x120 crop pixels with 3DDFA_V2's
convention (x -= 1, y = 120 - y, z -= 1), which is what the teacher's measured NME was taken with.
Torch functions work on batches [..., 62]; `*_np` twins are plain numpy for the data pipeline.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.crops import CROP_SIZE, roi_window
from pipeline.weights import verified_path

N_SHAPE, N_EXP = 40, 10


@dataclass
class BFM:
    u: Tensor  # (204,) mean shape + mean expression, xyz interleaved per point
    w_shp: Tensor  # (204, 40)
    w_exp: Tensor  # (204, 10)

    def to(self, device) -> BFM:
        return BFM(self.u.to(device), self.w_shp.to(device), self.w_exp.to(device))

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.u.double().cpu().numpy(), self.w_shp.double().cpu().numpy(), self.w_exp.double().cpu().numpy()


def load_bfm(path: str | os.PathLike, device: torch.device | str | None = None,
             sha256: str | None = None) -> BFM:
    """bfm_68.npz (sha256-checked) -> BFM tensors (float32) on `device`."""
    path = verified_path(path, sha256, what="BFM basis")
    with np.load(path, allow_pickle=False) as z:
        u = (z["u_shp"] + z["u_exp"]).reshape(-1)
        bfm = BFM(torch.as_tensor(u, dtype=torch.float32),
                  torch.as_tensor(z["w_shp"][:, :N_SHAPE], dtype=torch.float32),
                  torch.as_tensor(z["w_exp"][:, :N_EXP], dtype=torch.float32))
    return bfm.to(device) if device is not None else bfm


class _ArraysOnly(pickle.Unpickler):
    """The param stats are a pickle: allow only the numpy reconstruction they need, nothing callable else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"param stats pickle refers to {module}.{name}, which is not allowed")
        return super().find_class(module, name)


def load_param_stats(path: str | os.PathLike, sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """param_mean_std_62d_120x120.pkl (sha256-checked) -> (mean, std), each (62,) float32."""
    path = verified_path(path, sha256, what="param mean/std")
    stats = _ArraysOnly(io.BytesIO(path.read_bytes())).load()
    return np.asarray(stats["mean"], np.float32).reshape(62), np.asarray(stats["std"], np.float32).reshape(62)


def split_params(params):
    """[..., 62] -> (R|t [..., 3, 4], shape [..., 40], expression [..., 10]); numpy or torch."""
    return params[..., :12].reshape(*params.shape[:-1], 3, 4), params[..., 12:52], params[..., 52:62]


def landmarks_3d(params: Tensor, bfm: BFM, size: int = CROP_SIZE) -> Tensor:
    """[..., 62] params -> [..., 68, 3] points in crop pixels (x, y image axes; z depth)."""
    if params.dtype != torch.float64:  # float64 stays (tests); everything else computes in float32
        params = params.float()
    pose, shp, exp = split_params(params)
    u, w_shp, w_exp = (t.to(params.dtype) for t in (bfm.u, bfm.w_shp, bfm.w_exp))
    vertex = u + shp @ w_shp.T + exp @ w_exp.T  # [..., 204], xyz interleaved per point
    vertex = vertex.reshape(*vertex.shape[:-1], 68, 3)  # Fortran reshape to 3x68 == this, transposed
    pts = vertex @ pose[..., :3].transpose(-1, -2) + pose[..., None, :, 3]
    x, y, z = pts.unbind(-1)
    return torch.stack([x - 1, size - y, z - 1], dim=-1)


def landmarks_3d_np(params: np.ndarray, bfm: BFM, size: int = CROP_SIZE) -> np.ndarray:
    """Numpy twin of `landmarks_3d` (float64 inside), written out as 3DDFA_V2 does it."""
    params = np.asarray(params, dtype=np.float64)
    u, w_shp, w_exp = bfm.numpy()
    flat = params.reshape(-1, 62)
    out = np.empty((len(flat), 68, 3))
    for i, p in enumerate(flat):
        pose = p[:12].reshape(3, 4)
        vertex = (u + w_shp @ p[12:52] + w_exp @ p[52:62]).reshape(3, -1, order="F")
        pts = pose[:, :3] @ vertex + pose[:, 3:]
        out[i] = np.stack([pts[0] - 1, size - pts[1], pts[2] - 1], axis=1)
    return out.reshape(*params.shape[:-1], 68, 3)


def project_to_image(points_crop: np.ndarray, roi: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Crop-pixel points [..., 68, 2|3] -> original-image pixels for the square `roi` the crop came from."""
    sx, sy, ex, ey = roi_window(roi)
    out = np.array(points_crop, dtype=np.float64, copy=True)
    out[..., 0] = out[..., 0] * (ex - sx) / size + sx
    out[..., 1] = out[..., 1] * (ey - sy) / size + sy
    if out.shape[-1] == 3:
        out[..., 2] = out[..., 2] * ((ex - sx) + (ey - sy)) / (2 * size)
    return out.astype(np.float32)


def _matrix_to_angles(rot: np.ndarray) -> tuple[float, float, float]:
    """3DDFA_V2's matrix2angle: rotation -> (yaw, pitch, roll) radians, with its gimbal-lock branches."""
    if rot[2, 0] > 0.998:
        return math.pi / 2, math.atan2(-rot[0, 1], -rot[0, 2]), 0.0
    if rot[2, 0] < -0.998:
        return -math.pi / 2, math.atan2(rot[0, 1], rot[0, 2]), 0.0
    yaw = math.asin(rot[2, 0])
    c = math.cos(yaw)
    return yaw, math.atan2(rot[2, 1] / c, rot[2, 2] / c), math.atan2(rot[1, 0] / c, rot[0, 0] / c)


def pose_from_params(params: np.ndarray) -> np.ndarray:
    """[..., 62] -> [..., 3] (yaw, pitch, roll) in degrees: scale removed from the camera matrix, then angles."""
    params = np.asarray(params, dtype=np.float64)
    flat = params.reshape(-1, 62)
    out = np.empty((len(flat), 3))
    for i, p in enumerate(flat):
        r1, r2 = p[0:3], p[4:7]
        r1, r2 = r1 / np.linalg.norm(r1), r2 / np.linalg.norm(r2)
        rot = np.stack([r1, r2, np.cross(r1, r2)])
        out[i] = np.degrees(_matrix_to_angles(rot))
    return out.reshape(*params.shape[:-1], 3).astype(np.float32)
