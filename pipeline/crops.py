"""3DDFA-style crop geometry: face box or 68 points -> square roi box -> 120x120 crop.

These conventions are 3DDFA_V2's (the teacher's), kept exactly so its measured NME reproduces.
A crop maps image pixels to crop pixels by `crop_xy = (img_xy - roi[:2]) * (size / roi_side)`.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

CROP_SIZE = 120


def roi_from_box(box: np.ndarray) -> np.ndarray:
    """Detector box (l, t, r, b) -> square roi: side int(1.58 * mean(w, h)), centre shifted down 0.14."""
    left, top, right, bottom = (float(v) for v in box[:4])
    old_size = (right - left + bottom - top) / 2
    center_x = right - (right - left) / 2.0
    center_y = bottom - (bottom - top) / 2.0 + old_size * 0.14
    size = int(old_size * 1.58)
    return np.array(
        [center_x - size / 2, center_y - size / 2, center_x + size / 2, center_y + size / 2], dtype=np.float32
    )


def box_from_full_crop(width: int, height: int) -> np.ndarray:
    """The face box whose `roi_from_box` is (about) the whole image.

    For pre-cropped sources (3DDFA-style crops like aflw-wild-crops) the whole image *is* the roi;
    inverting the box->roi rule gives the face box every landmarker can start from.
    """
    side = min(width, height) / 1.58
    cx = width / 2.0
    cy = height / 2.0 - 0.14 * side
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dtype=np.float32)


def roi_from_landmarks(points_68: np.ndarray) -> np.ndarray:
    """68 points (68, 2) -> roi: bounding box made square (side max(w, h)), then side x sqrt(2)."""
    x0, y0 = points_68.min(axis=0)
    x1, y1 = points_68.max(axis=0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    radius = max(x1 - x0, y1 - y0) / 2
    side = math.sqrt(2) * 2 * radius
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dtype=np.float32)


def roi_window(roi: np.ndarray) -> tuple[int, int, int, int]:
    """The whole-pixel window [sx, ex) x [sy, ey) a crop of `roi` is cut from: every crop, its affine
    and every mapping of crop points back to the image round the same way."""
    return tuple(int(round(float(v))) for v in roi[:4])


def crop_roi(image: np.ndarray, roi: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Cut `roi` out of `image` (zero-padded where it leaves the image), resize to size x size."""
    h, w = image.shape[:2]
    sx, sy, ex, ey = roi_window(roi)
    if 0 <= sx < ex <= w and 0 <= sy < ey <= h and image.strides[1] > 0:
        # Inside the image: resized from the view itself, without the zero-padded copy (the same pixels)
        return cv2.resize(image[sy:ey, sx:ex], dsize=(size, size), interpolation=cv2.INTER_LINEAR)
    dh, dw = max(ey - sy, 1), max(ex - sx, 1)
    out = np.zeros((dh, dw) + image.shape[2:], dtype=image.dtype)
    src_x0, src_y0, src_x1, src_y1 = max(sx, 0), max(sy, 0), min(ex, w), min(ey, h)
    if src_x1 > src_x0 and src_y1 > src_y0:
        window = image[src_y0:src_y1, src_x0:src_x1]
        if window.strides[1] < 0:  # a mirrored view (`device_images.mirror`): the same pixels, but
            window = cv2.flip(window[:, ::-1], 1)  # OpenCV flips far faster than numpy's reversed copy
        out[src_y0 - sy : src_y1 - sy, src_x0 - sx : src_x1 - sx] = window
    return cv2.resize(out, dsize=(size, size), interpolation=cv2.INTER_LINEAR)


def crop_affine(roi: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The 2x3 matrix (flattened to 6) taking image pixels to crop pixels for `crop_roi(img, roi)`."""
    sx, sy, ex, ey = roi_window(roi)
    scale_x = size / max(ex - sx, 1)
    scale_y = size / max(ey - sy, 1)
    return np.array([scale_x, 0.0, -sx * scale_x, 0.0, scale_y, -sy * scale_y], dtype=np.float32)


def apply_affine(points: np.ndarray, affine6: np.ndarray) -> np.ndarray:
    """Map points through flattened 2x3 affines: (N, 2) points through one (6,) affine, or a batch
    [B, N, 2] through one affine per face [B, 6]. Float64 inside, float32 out."""
    m = np.asarray(affine6, dtype=np.float64)
    if m.ndim == 1:
        m = m.reshape(2, 3)
        return (points @ m[:, :2].T + m[:, 2]).astype(np.float32)
    m = m.reshape(*m.shape[:-1], 2, 3)
    return (np.einsum("...ij,...nj->...ni", m[..., :2], points) + m[..., None, :, 2]).astype(np.float32)


def invert_affine(affine6: np.ndarray) -> np.ndarray:
    m = np.asarray(affine6, dtype=np.float64).reshape(2, 3)
    return cv2.invertAffineTransform(m).reshape(6).astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (l, t, r, b) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match_reference(boxes: list[np.ndarray], ref_points: np.ndarray, min_iou: float = 0.3) -> int | None:
    """Index of the detected box that is the reference's face (IoU > min_iou with the bounding box
    of its points, the best such), or None when no box is."""
    ref_box = np.concatenate([ref_points.min(axis=0), ref_points.max(axis=0)])
    ious = [box_iou(b, ref_box) for b in boxes]
    if not ious or max(ious) <= min_iou:
        return None
    return int(np.argmax(ious))
