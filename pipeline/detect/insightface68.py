"""insightface's `landmark_3d_68` model (the `1k3d68.onnx` of its packs) through its own model_zoo code.

The packs cannot be obtained offline here; insightface looks in `<root>/models/<pack>/`. A missing
file is refused with an error naming it, before insightface could try to download anything.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.detect.base import Landmarks
from pipeline.detect.fan import MissingWeights
from pipeline.detect.onnx_session import providers_for
from pipeline.device import pick_device, resolve_precision
from pipeline.device_images import as_numpy
from pipeline.weights import sha256_file, verified_path

MODEL_FILE = "1k3d68.onnx"


class Insightface68Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: Path = Path("~/.insightface")  # insightface's model root
    pack: str = "buffalo_l"


def resolve_pack_file(weights: Path | None, options: Insightface68Options) -> Path:
    path = Path(weights).expanduser() if weights else options.root.expanduser() / "models" / options.pack / MODEL_FILE
    if not path.is_file():
        raise MissingWeights(
            f"insightface landmark model not found: {path}. The {options.pack} pack's {MODEL_FILE} cannot be "
            f"downloaded here; unpack the pack into {path.parent} (or set `weights:` of the insightface68 entry)")
    return path


class Insightface68Landmarker:
    name = "insightface68"

    def __init__(self, weights=None, *, weights_sha256: str | None = None, device: str = "auto", batch_size: int | None = None,
                 precision: str = "auto", options: Insightface68Options | None = None):
        from insightface.model_zoo import get_model

        options = options or Insightface68Options()
        path = resolve_pack_file(weights, options)
        path = verified_path(path, weights_sha256, what="insightface landmark_3d_68 weights")
        self.weights_sha256 = sha256_file(path)
        self.device = pick_device(device)
        resolve_precision(precision, self.device, backend="onnxruntime")  # refuses half precision by name
        self.model = get_model(str(path), providers=providers_for(self.device))
        if getattr(self.model, "taskname", None) != "landmark_3d_68":
            raise ValueError(f"{path} is not an insightface landmark_3d_68 model")
        self.model.prepare(ctx_id=(self.device.index or 0) if self.device.type == "cuda" else -1)

    def __call__(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[list[Landmarks]]:
        from insightface.app.common import Face

        from pipeline.crops import roi_from_box

        out: list[list[Landmarks]] = []
        for img, bs in zip(images, boxes):
            bgr = cv2.cvtColor(as_numpy(img), cv2.COLOR_RGB2BGR)
            faces = []
            for b in bs:
                face = Face(bbox=np.asarray(b, np.float32))
                pts = self.model.get(bgr, face)
                faces.append(Landmarks(points=np.asarray(pts[:, :2], np.float32), scores=np.ones(68, np.float32),
                                       roi=roi_from_box(b)))
            out.append(faces)
        return out
