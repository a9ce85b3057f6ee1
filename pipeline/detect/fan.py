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
from pipeline.device import PRECISIONS, pick_device, resolve_precision
from pipeline.device_images import as_numpy
from pipeline.weights import WeightsError, sha256_file

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

    def __init__(self, weights=None, *, weights_sha256: str | None = None, device: str = "auto", batch_size: int = 32,
                 precision: str = "auto", options: FanOptions | None = None):
        import face_alignment

        from pipeline.settings import shared_root

        options = options or FanOptions()
        path = resolve_fan_weights(weights, weights_sha256)
        self.weights_sha256 = sha256_file(path)
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        blaze = Path(shared_root()) / "models" / "blazeface"
        detector_kwargs = {"path_to_detector": str(options.blazeface_weights or blaze / "blazeface.pth"),
                           "path_to_anchor": str(options.blazeface_anchors or blaze / "anchors.npy")}
        with _hub_dir(path):
            self.fa = face_alignment.FaceAlignment(
                face_alignment.LandmarksType.TWO_D, device=str(self.device), flip_input=options.flip_input,
                face_detector="blazeface", face_detector_kwargs=detector_kwargs, compile=False,
                dtype=PRECISIONS[self.precision] or torch.float32)  # its own half-precision switch

    def __call__(self, images: list, boxes: list[np.ndarray]) -> list[list[Landmarks]]:
        """Batched across images: face-alignment's own crop, network and heatmap decoding, but one
        forward per `batch_size` faces of the whole call instead of one call per image."""
        from face_alignment.utils import CENTER_Y_OFFSET, crop, flip, get_preds_fromhm

        from pipeline.crops import roi_from_box

        faces = []  # (image index, box, centre, scale, 256x256 crop)
        for i, (img, bs) in enumerate(zip(images, boxes)):
            for b in np.asarray(bs, np.float64).reshape(-1, 4):  # float64: its torch maths refuses f32 scalars
                centre = np.array([b[2] - (b[2] - b[0]) / 2.0, b[3] - (b[3] - b[1]) / 2.0])
                centre[1] -= (b[3] - b[1]) * CENTER_Y_OFFSET
                scale = (b[2] - b[0] + b[3] - b[1]) / self.fa.face_detector.reference_scale
                faces.append((i, b, centre, scale, crop(as_numpy(img), centre, scale).transpose(2, 0, 1)))
        heatmaps = []
        with torch.inference_mode():
            for start in range(0, len(faces), self.batch_size):
                x = torch.from_numpy(np.stack([f[4] for f in faces[start:start + self.batch_size]]))
                x = x.to(self.device, dtype=self.fa.dtype) / 255.0
                out = self._forward(x)
                if self.fa.flip_input:
                    out = out + flip(self._forward(flip(x)), is_label=True)
                heatmaps.append(out.float().cpu().numpy())
        out_hm = np.concatenate(heatmaps) if heatmaps else np.zeros((0, 68, 64, 64), np.float32)
        result: list[list[Landmarks]] = [[] for _ in images]
        for (i, b, centre, scale, _), hm in zip(faces, out_hm):
            _, pts_img, scores = get_preds_fromhm(hm[None], centre, scale)
            result[i].append(Landmarks(points=np.asarray(pts_img, np.float32).reshape(68, 2),
                                       scores=np.clip(np.asarray(scores, np.float32).reshape(68), 0, 1),
                                       roi=roi_from_box(b)))
        return result

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fa.face_alignment_net(x)
        return (out[-1] if isinstance(out, list) else out).detach()
