"""Training augmentation that matches the crops curation makes, and the noisy landmark map 2DASL feeds.

Crop geometry, stated once: every crop the model sees, in training and at inference, is the 3DDFA
roi of a face (`pipeline.crops`): at build time the teacher's refine-pass roi (from its own first
pass; from the detector's box on photos), at evaluation the same roi (`detector` protocol) or the roi
of the reference points (`gt`). What differs between those crops is where the roi sits around the
face: on aflw2000-dev the detector crop's centre and side scatter around the reference crop's by a
few percent of the side (measured by bench/roi_spread.py; figures: docs/rounds.md, 'The CPU round trip
that beats the teacher'). Training jitters the roi wider than that (shift, scale), rotates it in
plane, mirrors it with the 68-point index swap, and changes colour, sharpness and occludes parts, so
the student learns faces rather than the one way its training crops were cut.

Everything geometric is one 2x3 similarity (or a mirror) of the 120x120 crop; the labels move
with it and so do the teacher's 3DMM params (exactly: pose and translation are rewritten, shape and
expression stay), so the anchor and the critic still see params that fit the augmented crop. A
mirrored face has no params (its shape coefficients would have to be mirrored too): the sample says so.

The randomness of a sample depends only on (seed, epoch, face id): a resumed run and a run with
another number of loader workers draw the same augmentations.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

from pipeline.crops import CROP_SIZE
from pipeline.landmarks import FLIP_68

_CENTRE = (CROP_SIZE - 1) / 2.0
# landmarks_3d's crop frame: x = v0 - 1, y = CROP_SIZE - v1 (image rows grow downwards)
_FLIP_Y = np.diag([1.0, -1.0])
_OFFSET = np.array([-1.0, float(CROP_SIZE)])


@dataclass(frozen=True)
class AugmentSettings:
    """Strengths of each augmentation (0 switches one off); TrainConfig's augmentation section."""

    shift: float = 0.06  # roi centre moves up to this fraction of its side (uniform, x and y)
    scale: float = 0.12  # roi side x exp(U(-scale, scale))
    rotate_deg: float = 12.0  # in-plane rotation, uniform +-
    mirror: float = 0.5  # probability of a horizontal mirror (labels swap left and right)
    color: float = 0.3  # brightness / contrast / saturation factors in 1 +- color; grey 10% of that
    blur: float = 0.2  # probability of a Gaussian blur or a down-and-up resize (low-resolution faces)
    occlude: float = 0.2  # probability of a random box over part of the face
    map_dropout: float = 0.15  # probability that the map carries no points at all
    map_candidate: float = 0.3  # probability that the map is another landmarker's points for the face
    map_corrupt: float = 0.35  # probability that the map is the label corrupted (`corrupt_label`)
    map_extra: int = 3  # more labels drawn the same way per face, for the reader and the critic alone
    map_point_dropout: float = 0.1  # probability of each map point missing
    map_noise_pct: float = 1.5  # per-point Gaussian noise of the map, % of the face size (sqrt(w*h))


def face_size_px(points: np.ndarray) -> float:
    """sqrt(w * h) of the points' bounding box (NaN points left out), at least 1 px: the face size the
    noise, the corruptions and the map's NME are measured in."""
    span = np.nanmax(points, 0) - np.nanmin(points, 0)
    return math.sqrt(max(float(span[0] * span[1]), 1.0))


def sample_rng(seed: int, epoch: int, face_id: str) -> np.random.Generator:
    """A generator for one sample, from what identifies it (not from a stream position)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{face_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def similarity(rng: np.random.Generator, s: AugmentSettings) -> np.ndarray:
    """A random 2x3 crop-px -> crop-px similarity: the crop of a jittered, rotated roi of the same face."""
    roi_scale = math.exp(rng.uniform(-s.scale, s.scale)) if s.scale else 1.0
    zoom = 1.0 / roi_scale  # a larger roi shows the face smaller
    theta = math.radians(rng.uniform(-s.rotate_deg, s.rotate_deg)) if s.rotate_deg else 0.0
    shift = rng.uniform(-s.shift, s.shift, size=2) * CROP_SIZE if s.shift else np.zeros(2)
    c, si = math.cos(theta) * zoom, math.sin(theta) * zoom
    a = np.array([[c, -si], [si, c]])
    b = np.array([_CENTRE, _CENTRE]) - a @ np.array([_CENTRE, _CENTRE]) - shift * zoom
    return np.hstack([a, b[:, None]])


def mirror_matrix() -> np.ndarray:
    return np.array([[-1.0, 0.0, CROP_SIZE - 1.0], [0.0, 1.0, 0.0]])


def transform_points(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    return (points @ m[:, :2].T + m[:, 2]).astype(np.float32)


def transform_params(params: np.ndarray, m: np.ndarray) -> np.ndarray:
    """62 3DDFA params whose projected points are those of `params` moved by the similarity `m`.

    The projection is p_img = F (P[:2] @ [S; 1]) + c (F flips y, c the offset of landmarks_3d), so
    an image-frame map p -> A p + b is, in the model's frame, A_v = F A F and b_v = F (A c + b - c);
    depth scales with the similarity's scale, so f R stays a scaled rotation."""
    a, b = m[:, :2], m[:, 2]
    a_v = _FLIP_Y @ a @ _FLIP_Y
    b_v = _FLIP_Y @ (a @ _OFFSET + b - _OFFSET)
    scale = math.sqrt(abs(np.linalg.det(a)))
    pose = np.asarray(params[:12], np.float64).reshape(3, 4)
    out = pose.copy()
    out[:2, :3] = a_v @ pose[:2, :3]
    out[:2, 3] = a_v @ pose[:2, 3] + b_v
    out[2] = pose[2] * scale
    result = np.asarray(params, np.float64).copy()
    result[:12] = out.reshape(12)
    return result.astype(np.float32)


def _color(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    x = img.astype(np.float32)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    if rng.random() < 0.1 * strength / 0.3:
        x = np.repeat(grey[..., None], 3, axis=2)
    else:
        sat = rng.uniform(1 - strength, 1 + strength)
        x = grey[..., None] + sat * (x - grey[..., None])
    contrast = rng.uniform(1 - strength, 1 + strength)
    x = x.mean() + contrast * (x - x.mean())
    x = x * rng.uniform(1 - strength, 1 + strength)
    return np.clip(x, 0, 255).astype(np.uint8)


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        return cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.5, 1.8))
    side = int(CROP_SIZE * rng.uniform(0.3, 0.7))  # a small face seen through a bigger crop
    small = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LINEAR)


def _occlude(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    w, h = (int(CROP_SIZE * rng.uniform(0.12, 0.35)) for _ in range(2))
    x, y = int(rng.integers(0, CROP_SIZE - w)), int(rng.integers(0, CROP_SIZE - h))
    if rng.random() < 0.5:
        out[y:y + h, x:x + w] = rng.integers(0, 256, size=3, dtype=np.uint8)
    else:
        out[y:y + h, x:x + w] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return out


def augment(img: np.ndarray, points: np.ndarray, params: list[np.ndarray | None], rng: np.random.Generator,
            s: AugmentSettings, others: list[np.ndarray] | None = None
            ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None], bool]:
    """One face: RGB crop [120,120,3], label [68,2] crop px, params (each 62 or None) ->
    the augmented (crop, label, params, mirrored). Params of a mirrored face become None. `others`
    (more [68,2] point sets of the face, e.g. its candidates) are moved in place the same way."""
    m = np.hstack([np.eye(2), np.zeros((2, 1))])
    if s.shift or s.scale or s.rotate_deg:
        m = similarity(rng, s)
    mirrored = bool(s.mirror and rng.random() < s.mirror)
    full = m
    if mirrored:
        mm = mirror_matrix()
        full = np.hstack([mm[:, :2] @ m[:, :2], (mm[:, :2] @ m[:, 2] + mm[:, 2])[:, None]])
    if not np.allclose(full, np.hstack([np.eye(2), np.zeros((2, 1))])):
        img = cv2.warpAffine(img, full, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
    points = transform_points(points, full)
    for k, other in enumerate(others or []):
        moved = transform_points(other, full)
        others[k] = moved[FLIP_68] if mirrored else moved
    if mirrored:
        points = points[FLIP_68]  # the left eye of the mirrored face is the right eye of the face
        params = [None for _ in params]
    else:
        params = [None if p is None else transform_params(p, m) for p in params]
    if s.color:
        img = _color(img, rng, s.color)
    if s.blur and rng.random() < s.blur:
        img = _blur(img, rng)
    if s.occlude and rng.random() < s.occlude:
        img = _occlude(img, rng)
    return np.ascontiguousarray(img), points, params, mirrored


def noisy_map_points(points: np.ndarray, rng: np.random.Generator, s: AugmentSettings) -> np.ndarray:
    """The points drawn into the 4th channel: the label with per-point noise and dropped points
    (NaN: not drawn), or none at all; so the model must read the map and the image together."""
    out = points.astype(np.float32).copy()
    if s.map_dropout and rng.random() < s.map_dropout:
        return np.full_like(out, np.nan)
    if s.map_noise_pct:
        size = face_size_px(out)
        out += rng.normal(0.0, s.map_noise_pct / 100.0 * size, size=out.shape).astype(np.float32)
    if s.map_point_dropout:
        out[rng.random(len(out)) < s.map_point_dropout] = np.nan
    return out


# 68-point regions the corruptions move (iBUG order).
_JAW = np.arange(0, 17)
_EYES = (np.r_[17:22, 36:42], np.r_[22:27, 42:48])  # a brow with its eye
_NOSE = np.arange(27, 36)
_MOUTH = np.arange(48, 68)
CORRUPTIONS = ("jaw", "eye", "nose", "mouth", "shift", "scale", "rotate", "swap")


def corrupt_label(points: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """The label with one kind of error real landmarkers make, at a random strength (fractions of face size):
    the jaw pulled off the face (bent toward one side or widened), one eye with its brow, the nose or
    the mouth moved, the whole label shifted / scaled / rotated, or its left and right swapped."""
    kind = kind or CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
    out = points.astype(np.float32).copy()
    size, centre = face_size_px(points), points.mean(0)

    def move(idx: np.ndarray, lo: float, hi: float) -> None:
        angle = rng.uniform(0, 2 * math.pi)
        out[idx] += rng.uniform(lo, hi) * size * np.array([math.cos(angle), math.sin(angle)], np.float32)

    if kind == "jaw":
        if rng.random() < 0.5:  # bent: a smooth bump along the contour, peaking at a random jaw point
            peak = rng.integers(0, 17)
            bump = np.exp(-0.5 * ((np.arange(17) - peak) / rng.uniform(2.0, 5.0)) ** 2)[:, None]
            angle = rng.uniform(0, 2 * math.pi)
            out[_JAW] += bump * rng.uniform(0.06, 0.25) * size * np.array([math.cos(angle), math.sin(angle)],
                                                                           np.float32)
        else:  # too wide or too narrow a face outline
            out[_JAW] = centre + (out[_JAW] - centre) * rng.uniform(0.75, 1.3)
    elif kind == "eye":
        move(_EYES[int(rng.integers(2))], 0.04, 0.15)
    elif kind == "nose":
        move(_NOSE, 0.04, 0.15)
    elif kind == "mouth":
        if rng.random() < 0.5:
            move(_MOUTH, 0.04, 0.15)
        else:  # opened or closed
            mc = out[_MOUTH].mean(0)
            out[_MOUTH, 1] = mc[1] + (out[_MOUTH, 1] - mc[1]) * rng.uniform(0.4, 2.0)
    elif kind == "shift":
        move(np.arange(68), 0.04, 0.2)
    elif kind == "scale":
        out = centre + (out - centre) * math.exp(rng.uniform(0.08, 0.3) * rng.choice([-1, 1]))
    elif kind == "rotate":
        t = math.radians(rng.uniform(6, 25) * rng.choice([-1, 1]))
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], np.float32)
        out = (out - centre) @ rot.T + centre
    elif kind == "swap":
        out = out[FLIP_68]  # the right eye labelled left: positions kept, names swapped
    else:
        raise ValueError(f"corruption {kind!r}: expected one of {CORRUPTIONS}")
    return out.astype(np.float32)


def choose_map(points: np.ndarray, candidates: list[np.ndarray], rng: np.random.Generator,
               s: AugmentSettings) -> np.ndarray:
    """The label the student is given for a face whose best label is `points`: none at all, another
    landmarker's points (`candidates`), the label corrupted, or the label with noise and gaps; the
    student is trained to answer `points` whichever it gets, so it learns to correct its label."""
    u = rng.random()
    if u < s.map_dropout:
        return np.full_like(points, np.nan, dtype=np.float32)
    u -= s.map_dropout
    if u < s.map_candidate:  # a face without candidates gets its label here (noisy, below)
        if not candidates:
            return noisy_map_points(points, rng, replace(s, map_dropout=0.0))
        out = candidates[int(rng.integers(len(candidates)))].astype(np.float32).copy()
    elif u < s.map_candidate + s.map_corrupt:
        out = corrupt_label(points, rng)
    else:
        return noisy_map_points(points, rng, replace(s, map_dropout=0.0))
    if s.map_point_dropout:
        out[rng.random(len(out)) < s.map_point_dropout] = np.nan
    return out
