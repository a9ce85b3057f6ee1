"""A FAN chain: face-alignment's own per-image API vs our FAN landmarker batched across images.

Same images, same boxes (the references' boxes, so detection is out of the comparison), same
network. FAN's trained weights cannot be had offline; a FAN of the released architecture with
random weights costs exactly the same, so it is saved under the file name face-alignment expects.
The ceiling: the bare FAN forward (our chain's dtype: fp16 on CUDA) at --batch on device-resident input.
Usage: .venv/bin/python bench/fan_chain.py [--images 16] [--batch 32] [--device auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import emit, header, timed

from pipeline.decode import decode_image
from pipeline.detect.factory import build_landmarker
from pipeline.detect.spec import DetectorSpec
from pipeline.references import load_mat_reference
from pipeline.settings import shared_root
from pipeline.weights import sha256_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from face_alignment.models import FAN

    paths = sorted((shared_root() / "data" / "aflw2000-dev").glob("*.jpg"))[: args.images]
    images = [decode_image(p.read_bytes()) for p in paths]
    refs = [load_mat_reference(p.with_suffix(".mat"), image_height=img.shape[0]) for p, img in zip(paths, images)]
    boxes = [np.array([np.r_[r.landmarks_68.min(0), r.landmarks_68.max(0)]], np.float64) for r in refs]
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "checkpoints" / "2DFAN4-11f355bf06.pth.tar"
        weights.parent.mkdir()
        torch.manual_seed(0)
        torch.save(FAN(4).state_dict(), weights)
        spec = DetectorSpec(name="fan", weights=weights, sha256=sha256_file(weights), device=args.device,
                            batch_size=args.batch)
        ours = build_landmarker(spec)
        fa = ours.fa  # the same FaceAlignment object, so the same network and device
        ours([images[0]], [boxes[0]])  # warm up

        def api_loop(flip: bool):
            fa.flip_input = flip
            return [fa.get_landmarks_from_image(img, detected_faces=list(b)) for img, b in zip(images, boxes)]

        t_api_flip, _ = timed(lambda: api_loop(True), repeats=1)
        t_api, api_out = timed(lambda: api_loop(False))
        fa.flip_input = False
        t_ours, ours_out = timed(lambda: ours(images, boxes))
        max_diff = max(float(np.abs(o[0].points - a[0][:, :2]).max()) for o, a in zip(ours_out, api_out))
        bare = bare_forward_rate(fa, ours.device, args.batch, images[0])
    n = len(images)
    emit({**header(), "images": n, "faces": n, "batch": args.batch,
          "api_flip_images_per_s": n / t_api_flip, "api_images_per_s": n / t_api,
          "ours_batched_images_per_s": n / t_ours, "ours_over_api": t_api / t_ours,
          "ours_over_api_flip": t_api_flip / t_ours, "max_point_diff_px": max_diff,
          "bare_forward_faces_per_s": bare, "ours_over_bare_forward": (n / t_ours) / bare,
          "dtype": str(fa.dtype)}, args.json)


def bare_forward_rate(fa, device: torch.device, batch: int, image: np.ndarray) -> float:
    """The network alone, in our chain's dtype, on one batch already on the device: the ceiling.
    The input is a real picture (random input runs slower on CPUs: denormals). Best of three timed
    forwards after a warm-up one (cuDNN picks its kernels there)."""
    import cv2

    face = torch.from_numpy(cv2.resize(image, (256, 256))).permute(2, 0, 1).float() / 255.0
    x = face.expand(batch, -1, -1, -1).contiguous().to(device, dtype=fa.dtype)
    best = 0.0
    for layout in (torch.contiguous_format, torch.channels_last):  # the faster layout is the ceiling
        x = x.contiguous(memory_format=layout)

        def forward(x=x):  # bound now: timed() calls it within this iteration
            with torch.inference_mode():
                fa.face_alignment_net(x)
            if device.type == "cuda":
                torch.cuda.synchronize()

        forward()
        seconds, _ = timed(forward, repeats=3)
        best = max(best, batch / seconds)
    return best


if __name__ == "__main__":
    main()
