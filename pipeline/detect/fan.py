"""face-alignment's FAN (2DFAN-4) through its own API, on boxes the chain's face detector found.

FAN's weights cannot be obtained offline here. face-alignment looks for them by file name in torch
hub's `checkpoints/` directory and would download them if absent; we check first and refuse with
an error naming the file and where to put it, so a run never tries the network.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from pipeline.detect.base import Landmarks
from pipeline.device import PRECISIONS, pick_device, resolve_batch_size, resolve_precision
from pipeline.device_images import crop_rois
from pipeline.weights import WeightsError, sha256_file

FAN_INPUT = 256.0  # face-alignment's crop side
FAN_FILE = "2DFAN4-11f355bf06.pth.tar"  # face-alignment's name; "11f355bf06" is its sha256 prefix


class MissingWeights(WeightsError):
    """A model's weight file is not on this machine (and will not be downloaded)."""


class FanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blazeface_weights: Path | None = None  # face-alignment builds its detector even when boxes are given
    blazeface_anchors: Path | None = None
    flip_input: bool = False


def default_checkpoint() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / FAN_FILE


@contextlib.contextmanager
def _hub_dir(path: Path):
    """face-alignment reads `<hub dir>/checkpoints/<file>`: point the hub at the configured file's folder."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(path.parent.parent))
    try:
        yield
    finally:
        torch.hub.set_dir(old)


def resolve_fan_weights(weights: Path | None, sha256: str | None) -> Path:
    path = Path(weights).expanduser() if weights else default_checkpoint()
    if path.name != FAN_FILE or path.parent.name != "checkpoints":
        raise WeightsError(f"FAN weights must be a file named {FAN_FILE} inside a folder named checkpoints/ "
                           f"(face-alignment's layout), got {path}")
    if not path.is_file():
        raise MissingWeights(
            f"FAN weights not found: {path}. face-alignment's 2DFAN-4 ({FAN_FILE}, ~95 MB) cannot be downloaded "
            f"here; copy it to {path} (or set `weights:` of the fan entry in catalog.yaml to where it is)")
    digest = sha256_file(path)
    expected = (sha256 or FAN_FILE.split("-")[1].split(".")[0]).lower()
    if not digest.startswith(expected):
        raise WeightsError(f"FAN weights {path} failed their sha256 check (expected {expected[:12]}..., "
                           f"got {digest[:12]}...)")
    return path


class FanLandmarker:
    name = "fan"

    def __init__(self, weights=None, *, weights_sha256: str | None = None, device: str = "auto", batch_size: int | None = None,
                 precision: str = "auto", options: FanOptions | None = None):
        import face_alignment

        from pipeline.settings import shared_root

        options = options or FanOptions()
        path = resolve_fan_weights(weights, weights_sha256)
        self.weights_sha256 = sha256_file(path)
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = resolve_batch_size(batch_size, self.device, cpu=32, gpu=64)
        blaze = Path(shared_root()) / "models" / "blazeface"
        detector_kwargs = {"path_to_detector": str(options.blazeface_weights or blaze / "blazeface.pth"),
                           "path_to_anchor": str(options.blazeface_anchors or blaze / "anchors.npy")}
        with _hub_dir(path):
            self.fa = face_alignment.FaceAlignment(
                face_alignment.LandmarksType.TWO_D, device=str(self.device), flip_input=options.flip_input,
                face_detector="blazeface", face_detector_kwargs=detector_kwargs, compile=False,
                dtype=PRECISIONS[self.precision] or torch.float32)  # its own half-precision switch

    def __call__(self, images: list, boxes: list[np.ndarray]) -> list[list[Landmarks]]:
        """Batched across images, with face-alignment's own crop window, network and heatmap decoding
        rules; the crops are cut and the heatmaps decoded where the images are (on the GPU path, on
        the device), one forward per `batch_size` faces of the whole call instead of one per image."""
        from face_alignment.utils import CENTER_Y_OFFSET, flip, transform

        from pipeline.crops import roi_from_box

        faces, rois = [], []  # (image index, box, centre, scale); (image index, crop window)
        for i, bs in enumerate(boxes):
            for b in np.asarray(bs, np.float64).reshape(-1, 4):  # float64: its torch maths refuses f32 scalars
                centre = np.array([b[2] - (b[2] - b[0]) / 2.0, b[3] - (b[3] - b[1]) / 2.0])
                centre[1] -= (b[3] - b[1]) * CENTER_Y_OFFSET
                scale = (b[2] - b[0] + b[3] - b[1]) / self.fa.face_detector.reference_scale
                # face-alignment's `crop`: the integer window [ul, br) zero-padded, resized to 256.
                ul = transform([1, 1], centre, scale, FAN_INPUT, True).numpy()
                br = transform([FAN_INPUT, FAN_INPUT], centre, scale, FAN_INPUT, True).numpy()
                faces.append((i, b, centre, scale))
                rois.append((i, np.array([ul[0], ul[1], br[0], br[1]], np.float64)))
        points, scores = [np.zeros((0, 68, 2), np.float32)], [np.zeros((0, 68), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(faces), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                crops = crop_rois(images, rois[chunk], int(FAN_INPUT))
                if not isinstance(crops, torch.Tensor):
                    crops = torch.from_numpy(crops).permute(0, 3, 1, 2)
                # channels-last: faster convolutions than NCHW for FAN on CPU (measured in docs/benchmarks.md)
                x = crops.to(self.device, dtype=self.fa.dtype).contiguous(memory_format=torch.channels_last) / 255.0
                out = self._forward(x)
                if self.fa.flip_input:
                    out = out + flip(self._forward(flip(x)), is_label=True)
                centres = torch.as_tensor(np.array([f[2] for f in faces[chunk]]), device=self.device)
                scales = torch.as_tensor(np.array([f[3] for f in faces[chunk]]), device=self.device)
                pts, sc = decode_heatmaps(out.float(), centres, scales)
                points.append(pts.cpu().numpy())
                scores.append(sc.cpu().numpy())
        result: list[list[Landmarks]] = [[] for _ in images]
        for (i, b, _, _), pts, sc in zip(faces, np.concatenate(points), np.concatenate(scores)):
            result[i].append(Landmarks(points=pts.astype(np.float32), scores=np.clip(sc, 0, 1).astype(np.float32),
                                       roi=roi_from_box(b)))
        return result

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fa.face_alignment_net(x)
        return (out[-1] if isinstance(out, list) else out).detach()


def decode_heatmaps(hm: torch.Tensor, centres: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """face-alignment's `get_preds_fromhm`, batched on the heatmaps' device: [N, 68, 64, 64] heatmaps,
    crop centres [N, 2], scales [N] -> image points [N, 68, 2] and peak values [N, 68].

    Its rules, kept: the arg-max cell, a quarter-cell step towards the larger neighbour (inner cells
    only), minus half a cell, then its inverse crop transform and its truncation to whole pixels."""
    n, c, h, w = hm.shape
    flat = hm.reshape(n, c, h * w)
    peak, idx = flat.max(dim=-1)
    px, py = idx % w, idx // w
    inner = (px > 0) & (px < w - 1) & (py > 0) & (py < h - 1)

    def at(y, x):
        return flat.gather(-1, (y.clamp(0, h - 1) * w + x.clamp(0, w - 1)).unsqueeze(-1)).squeeze(-1)

    step_x = torch.sign(at(py, px + 1) - at(py, px - 1)) * 0.25
    step_y = torch.sign(at(py + 1, px) - at(py - 1, px)) * 0.25
    preds = torch.stack([px + 1, py + 1], -1).float()
    preds = preds + torch.stack([step_x, step_y], -1) * inner.unsqueeze(-1)
    preds = (preds - 0.5).double()
    size = 200.0 * scales.double()[:, None, None]  # face-alignment's SCALE_FACTOR * scale
    image_points = preds * size / h + centres.double()[:, None, :] - size / 2
    return torch.trunc(image_points).float(), peak
