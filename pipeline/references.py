"""Reference labels in the AFLW2000-3D / 300W-LP `.mat` layout, converted to facecurate's conventions.

`pt3d_68` gives the 68 reference points (image pixels); `Pose_Para` (pitch, yaw, roll, tx, ty, tz,
scale), `Shape_Para` (199) and `Exp_Para` (29) give the 3DMM fit, which we truncate to 3DDFA's
62-param layout (first 40 shape, first 10 expression) in the BFM units of `bfm_68.npz`. In the
`.mat` frame image y is measured from the bottom: y_img = H + 1 - Y.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.io

from pipeline.crops import CROP_SIZE, crop_affine


class BadReference(ValueError):
    """A reference file that cannot be read or lacks a field; the image is kept, without reference."""


@dataclass
class Reference:
    landmarks_68: np.ndarray  # (68, 2) float32 image pixels (x, y of pt3d_68)
    params_62: np.ndarray | None  # (62,) float64 in the image frame (see params_image_to_crop)
    yaw_pitch_roll_deg: np.ndarray  # (3,) degrees, from Pose_Para


def angles_to_matrix(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """3DDFA's angle2matrix (face3d `angle2matrix_3ddfa`): R = Rx(pitch) @ Ry(yaw) @ Rz(roll)."""
    cx, sx, cy, sy, cz, sz = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw), np.cos(roll), np.sin(roll)
    rx = np.array([[1, 0, 0], [0, cx, sx], [0, -sx, cx]])
    ry = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    rz = np.array([[cz, sz, 0], [-sz, cz, 0], [0, 0, 1]])
    return rx @ ry @ rz


def params_from_mat_fit(pose_para: np.ndarray, shape_para: np.ndarray, exp_para: np.ndarray) -> np.ndarray:
    """`.mat` fit -> 62 params in the image frame: [s*R | t] row-major, shape[:40], exp[:10]."""
    pitch, yaw, roll, tx, ty, tz, scale = (float(v) for v in np.asarray(pose_para).reshape(-1)[:7])
    camera = np.concatenate([scale * angles_to_matrix(pitch, yaw, roll), [[tx], [ty], [tz]]], axis=1)
    shape = np.asarray(shape_para, np.float64).reshape(-1)
    exp = np.asarray(exp_para, np.float64).reshape(-1)
    if shape.size < 40 or exp.size < 10:
        raise BadReference(f"Shape_Para has {shape.size} and Exp_Para {exp.size} values; need at least 40 and 10")
    return np.concatenate([camera.reshape(12), shape[:40], exp[:10]])


def load_mat_reference(file, image_height: int) -> Reference:
    """Read one `.mat` (path or file object) -> Reference; BadReference names what is wrong."""
    try:
        mat = scipy.io.loadmat(file)
    except Exception as err:  # scipy raises several types for a damaged file
        raise BadReference(f"unreadable .mat file ({type(err).__name__}: {err})") from None
    if "pt3d_68" not in mat:
        raise BadReference(".mat file has no pt3d_68")
    pts = np.asarray(mat["pt3d_68"], dtype=np.float64)
    if pts.shape[0] < 2 or pts.shape[-1] != 68:
        raise BadReference(f"pt3d_68 has shape {pts.shape}, expected (3, 68)")
    landmarks = pts[:2].T.astype(np.float32)
    if not np.isfinite(landmarks).all():
        raise BadReference("pt3d_68 holds non-finite values")
    span = 4 * image_height  # images are about as wide as tall; points this far out are not this image's
    if (np.abs(landmarks) > span).any():
        raise BadReference(f"pt3d_68 has points beyond +-{span} px of a {image_height} px high image")
    params, ypr = None, np.full(3, np.nan, np.float32)
    if "Pose_Para" in mat:
        pose = np.asarray(mat["Pose_Para"], np.float64).reshape(-1)
        ypr = np.degrees([pose[1], pose[0], pose[2]]).astype(np.float32)
        if "Shape_Para" in mat and "Exp_Para" in mat:
            params = params_from_mat_fit(pose, mat["Shape_Para"], mat["Exp_Para"])
    return Reference(landmarks_68=landmarks, params_62=params, yaw_pitch_roll_deg=ypr)


def params_image_to_crop(params_62: np.ndarray, roi: np.ndarray, image_height: int,
                         size: int = CROP_SIZE) -> np.ndarray:
    """Image-frame params (`.mat` convention) -> params whose 3DDFA crop points land on the crop of `roi`.

    The crop maps x_c = a*x + c, y_c = e*y + f (crop_affine). The 3DDFA crop convention reads
    x_c = X' - 1, y_c = size - Y'; the image frame reads x = X, y = H + 1 - Y. Solving for the
    camera rows gives the scaled rows and shifted translations below (z is scaled like x).
    """
    a, _, c, _, e, f = (float(v) for v in crop_affine(roi, size))
    camera = np.asarray(params_62, np.float64)[:12].reshape(3, 4).copy()
    camera[0] *= a
    camera[0, 3] += c + 1
    camera[1] *= e
    camera[1, 3] += size - e * (image_height + 1) - f
    camera[2] *= a
    out = np.array(params_62, dtype=np.float64, copy=True)
    out[:12] = camera.reshape(12)
    return out


# --------------------------------------------------------------------------------- AFLW 21 points

# AFLW's 21 points as iBUG-68 index groups (the shared data README's mapping): where a 68-point label
# is measured against them. Ear lobes (12, 16) stand on jaw points 2 and 14.
AFLW21_FROM_68 = ([17], [19], [21], [22], [24], [26], [36], list(range(36, 42)), [39], [42], list(range(42, 48)),
                  [45], [2], [31], [30], [35], [14], [48], list(range(60, 68)), [54], [8])


def aflw21_from_68(points68: np.ndarray) -> np.ndarray:
    """[..., 68, 2] -> [..., 21, 2]: a 68-point label at AFLW's 21 points (groups averaged)."""
    return np.stack([np.asarray(points68)[..., ix, :].mean(-2) for ix in AFLW21_FROM_68], -2)


def nme21_pct(points68: np.ndarray, ref21: np.ndarray) -> np.ndarray:
    """Per face: NME (%) of [N, 68, 2] labels at AFLW's 21 points against [N, 21, 2] references (NaN: not
    annotated), normalised by sqrt(w*h) of the annotated reference points' box (the wild crops' protocol)."""
    pred = aflw21_from_68(points68)
    ref = np.asarray(ref21, np.float64)
    seen = np.isfinite(ref).all(-1)
    lo = np.where(seen[..., None], ref, np.inf).min(-2)
    hi = np.where(seen[..., None], ref, -np.inf).max(-2)
    span = hi - lo
    norm = np.sqrt(np.maximum(span[..., 0] * span[..., 1], 1e-6))
    err = np.linalg.norm(pred - np.nan_to_num(ref), axis=-1) / norm[..., None] * 100.0
    err = np.where(seen, err, np.nan)
    with np.errstate(invalid="ignore"):
        return np.nanmean(err, -1)


@lru_cache(maxsize=4)
def load_aflw21(path: str) -> dict[str, tuple[np.ndarray, float]]:
    """An AFLW-21 reference file (npz: names, pts21 (n, 2, 21) with -1 = not annotated, yaw_deg) ->
    {file stem: ((21, 2) points with NaN where not annotated, yaw in degrees)}."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names, pts, yaw = z["names"], z["pts21"].astype(np.float32), z["yaw_deg"].astype(np.float32)
    except (OSError, KeyError, ValueError) as err:
        raise BadReference(f"{path}: not an AFLW-21 reference file ({err}); it needs names, pts21, yaw_deg") from err
    pts = pts.transpose(0, 2, 1)
    pts[(pts < 0).any(-1)] = np.nan
    return {str(n): (p, float(y)) for n, p, y in zip(names, pts, yaw)}
