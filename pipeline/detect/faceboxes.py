"""FaceBoxes face detector, ported from 3DDFA_V2 (github cleardusk/3DDFA_V2, folder FaceBoxes/).

The network (CReLU stem, three Inception blocks, two strided convs, SSD-style multibox heads on
three feature maps) and the inference recipe follow the original: images are BGR float with the
Caffe mean (104, 117, 123) subtracted, no scaling to [0, 1]; priors are generated for the input size
(min sizes [[32, 64, 128], [256], [512]], steps [32, 64, 128], dense tiling of the 32 and 64 px
anchors); boxes are decoded with variances (0.1, 0.2); candidates above 0.05 are kept, the best 5000
go through greedy NMS (IoU 0.3, "+1" pixel areas as in py_cpu_nms) and at most 750 survive.

Differences from the original wrapper: a single long-side cap (`max_side`) instead of its 720x1080
logic, batched forwards (images grouped by their resized shape) and boxes mapped back with the exact
per-axis resize ratio.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pipeline.detect.base import FaceBox
from pipeline.device import autocast, pick_device, resolve_batch_size, resolve_precision
from pipeline.device_images import as_numpy
from pipeline.weights import sha256_file, verified_path

# Fixed facts of the released FaceBoxesProd.pth model.
MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
MIN_SIZES = ((32, 64, 128), (256,), (512,))
STEPS = (32, 64, 128)
VARIANCE = (0.1, 0.2)
PRE_NMS_SCORE = 0.05  # the original's confidence_threshold
PRE_NMS_TOP_K = 5000
POST_NMS_TOP_K = 750


class FaceBoxesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score_threshold: float = Field(0.5, ge=0, le=1)  # final cut on face score
    nms_threshold: float = Field(0.3, gt=0, le=1)  # IoU above which a lower-scored box is dropped
    max_side: int = Field(720, ge=64)  # images are scaled down so their long side is at most this
    min_face_px: float = Field(0, ge=0)  # drop boxes whose shorter side (original pixels) is smaller


# --------------------------------------------------------------------------- network


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class CRelu(nn.Module):
    """conv (no bias) -> BN -> concat(x, -x) -> ReLU: doubles the channels."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(torch.cat([x, -x], 1), inplace=True)


class Inception(nn.Module):
    """128 -> 4 x 32 channels: 1x1; avgpool+1x1; 1x1+3x3; 1x1+3x3+3x3."""

    def __init__(self):
        super().__init__()
        self.branch1x1 = BasicConv2d(128, 32, kernel_size=1, padding=0)
        self.branch1x1_2 = BasicConv2d(128, 32, kernel_size=1, padding=0)
        self.branch3x3_reduce = BasicConv2d(128, 24, kernel_size=1, padding=0)
        self.branch3x3 = BasicConv2d(24, 32, kernel_size=3, padding=1)
        self.branch3x3_reduce_2 = BasicConv2d(128, 24, kernel_size=1, padding=0)
        self.branch3x3_2 = BasicConv2d(24, 32, kernel_size=3, padding=1)
        self.branch3x3_3 = BasicConv2d(32, 32, kernel_size=3, padding=1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch1x1_2(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        c = self.branch3x3(self.branch3x3_reduce(x))
        d = self.branch3x3_3(self.branch3x3_2(self.branch3x3_reduce_2(x)))
        return torch.cat([a, b, c, d], 1)


class FaceBoxesNet(nn.Module):
    """Returns (loc (N, P, 4) raw offsets, scores (N, P) face probability) for P priors."""

    def __init__(self):
        super().__init__()
        self.conv1 = CRelu(3, 24, kernel_size=7, stride=4, padding=3)
        self.conv2 = CRelu(48, 64, kernel_size=5, stride=2, padding=2)
        self.inception1 = Inception()
        self.inception2 = Inception()
        self.inception3 = Inception()
        self.conv3_1 = BasicConv2d(128, 128, kernel_size=1, stride=1, padding=0)
        self.conv3_2 = BasicConv2d(128, 256, kernel_size=3, stride=2, padding=1)
        self.conv4_1 = BasicConv2d(256, 128, kernel_size=1, stride=1, padding=0)
        self.conv4_2 = BasicConv2d(128, 256, kernel_size=3, stride=2, padding=1)
        # Heads: 21 anchors per cell on the stride-32 map (16 + 4 + 1), one on the others; 2 classes.
        anchors, chans = (21, 1, 1), (128, 256, 256)
        self.loc = nn.Sequential(*[nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(chans, anchors)])
        self.conf = nn.Sequential(*[nn.Conv2d(c, a * 2, 3, padding=1) for c, a in zip(chans, anchors)])

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        x = F.max_pool2d(self.conv2(x), kernel_size=3, stride=2, padding=1)
        s1 = self.inception3(self.inception2(self.inception1(x)))
        s2 = self.conv3_2(self.conv3_1(s1))
        s3 = self.conv4_2(self.conv4_1(s2))
        n, sources = x.shape[0], (s1, s2, s3)
        # (N, A*k, H, W) -> (N, H*W*A, k): priors ordered row, column, anchor, as in the prior list.
        loc = torch.cat([h(s).permute(0, 2, 3, 1).reshape(n, -1, 4) for s, h in zip(sources, self.loc)], 1)
        conf = torch.cat([h(s).permute(0, 2, 3, 1).reshape(n, -1, 2) for s, h in zip(sources, self.conf)], 1)
        return loc, F.softmax(conf, dim=-1)[..., 1]


# --------------------------------------------------------------------------- priors, decode, NMS


def _cell_anchors(min_sizes: tuple[int, ...]) -> np.ndarray:
    """(A, 3) anchors of one cell as (x offset, y offset in cell units, size px), in the original order.

    32 px anchors are tiled 4x4 inside the cell, 64 px ones 2x2, larger ones sit at the cell centre;
    within a tiling, y is the outer loop and x the inner one.
    """
    rows = []
    for size in min_sizes:
        if size == 32:
            offs = (0.0, 0.25, 0.5, 0.75)
        elif size == 64:
            offs = (0.0, 0.5)
        else:
            offs = (0.5,)
        rows += [(ox, oy, size) for oy in offs for ox in offs]
    return np.array(rows, dtype=np.float64)


def make_priors(height: int, width: int) -> np.ndarray:
    """(P, 4) float32 priors (cx, cy, w, h), normalised by the image size, for an input of height x width."""
    out = []
    for sizes, step in zip(MIN_SIZES, STEPS):
        fh, fw = -(-height // step), -(-width // step)  # ceil
        cell = _cell_anchors(sizes)  # (A, 3)
        i, j = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")  # row-major cells
        cx = (j.reshape(-1, 1) + cell[:, 0]) * step / width  # (cells, A)
        cy = (i.reshape(-1, 1) + cell[:, 1]) * step / height
        sw = np.broadcast_to(cell[:, 2] / width, cx.shape)
        sh = np.broadcast_to(cell[:, 2] / height, cx.shape)
        out.append(np.stack([cx, cy, sw, sh], -1).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def decode(loc: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """SSD decode: (P, 4) offsets + (P, 4) priors -> (P, 4) normalised l, t, r, b."""
    centre = priors[:, :2] + loc[:, :2] * VARIANCE[0] * priors[:, 2:]
    size = priors[:, 2:] * np.exp(loc[:, 2:] * VARIANCE[1])
    return np.concatenate([centre - size / 2, centre + size / 2], 1)


def nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """Greedy NMS with the original's "+1" pixel areas; returns kept indices, best score first."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= thresh]
    return np.array(keep, dtype=np.int64)


def _strip_prefix(state: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


# --------------------------------------------------------------------------- detector


class FaceBoxesDetector:
    name = "faceboxes"

    def __init__(
        self,
        weights: str | Path,
        *,
        weights_sha256: str | None = None,
        device: str = "auto",
        batch_size: int | None = None,
        precision: str = "auto",
        options: FaceBoxesOptions | None = None,
    ):
        path = verified_path(weights, weights_sha256, what="FaceBoxes weights")
        self.weights_sha256 = sha256_file(path)
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = resolve_batch_size(batch_size, self.device, cpu=16, gpu=64)
        self.options = options or FaceBoxesOptions()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        net = FaceBoxesNet()
        net.load_state_dict(_strip_prefix(state), strict=True)
        self.net = net.eval().to(self.device)
        self._priors: dict[tuple[int, int], np.ndarray] = {}

    def _priors_for(self, h: int, w: int) -> np.ndarray:
        if (h, w) not in self._priors:
            self._priors[(h, w)] = make_priors(h, w)
        return self._priors[(h, w)]

    def _prepare(self, img: np.ndarray) -> np.ndarray:
        """RGB uint8 -> resized (long side <= max_side) BGR float32 with the mean subtracted, (H, W, 3)."""
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"FaceBoxes expects RGB (H, W, 3) images, got shape {img.shape}")
        h, w = img.shape[:2]
        scale = min(1.0, self.options.max_side / max(h, w))
        if scale < 1.0:
            img = cv2.resize(img, (max(1, int(round(w * scale))), max(1, int(round(h * scale)))))
        return img[:, :, ::-1].astype(np.float32) - MEAN_BGR

    def _postprocess(self, loc: np.ndarray, scores: np.ndarray, in_hw, orig_hw) -> list[FaceBox]:
        opts = self.options
        (ih, iw), (oh, ow) = in_hw, orig_hw
        keep = scores > min(PRE_NMS_SCORE, opts.score_threshold)
        if not keep.any():
            return []
        priors = self._priors_for(ih, iw)[keep]
        loc, scores = loc[keep], scores[keep]
        order = scores.argsort()[::-1][:PRE_NMS_TOP_K]
        # Normalised -> original-image pixels (the exact per-axis resize ratio).
        boxes = decode(loc[order], priors[order]) * np.array([ow, oh, ow, oh], dtype=np.float32)
        scores = scores[order]
        kept = nms(boxes, scores, opts.nms_threshold)[:POST_NMS_TOP_K]
        faces = []
        for k in kept:
            b, s = boxes[k], float(scores[k])
            if s <= opts.score_threshold:
                continue
            if min(b[2] - b[0], b[3] - b[1]) < opts.min_face_px:
                continue
            faces.append(FaceBox(bbox=b.astype(np.float32), score=s))
        return faces

    def __call__(self, images: list[np.ndarray]) -> list[list[FaceBox]]:
        images = [as_numpy(im) for im in images]  # its resize and mean run on the host
        prepared = [self._prepare(np.asarray(im)) for im in images]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for idx, p in enumerate(prepared):
            groups[p.shape[:2]].append(idx)
        results: list[list[FaceBox]] = [[] for _ in images]
        with torch.inference_mode(), autocast(self.device, self.precision):
            for (h, w), idxs in groups.items():
                for start in range(0, len(idxs), self.batch_size):
                    chunk = idxs[start : start + self.batch_size]
                    batch = np.stack([prepared[i] for i in chunk]).transpose(0, 3, 1, 2)
                    loc, scores = self.net(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
                    loc, scores = loc.float().cpu().numpy(), scores.float().cpu().numpy()
                    for n, i in enumerate(chunk):
                        results[i] = self._postprocess(loc[n], scores[n], (h, w), images[i].shape[:2])
        return results
