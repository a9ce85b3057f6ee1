"""Batched JPEG decoding on the GPU (nvJPEG through torchvision), with the CPU decoder as the judge.

Only clean, ordinary JPEGs go to the GPU: baseline-or-progressive RGB/greyscale files whose header
PIL reads, within the pixel limits, ending in the EOI marker. Everything else - PNG, CMYK, MPO,
truncated or corrupt files, anything nvJPEG refuses - goes through `decode.decode_image`, so a bad
file is quarantined with exactly the reason the CPU path gives, and nothing is lost to the GPU path.
EXIF orientation is read from the header and applied on the device (nvJPEG ignores it).

torchvision is imported only here and only on the GPU path (the CPU torch build here has none).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipeline.decode import DecodeError, decode_image
from pipeline.device_images import to_device

JPEG_EOI = b"\xff\xd9"
EXIF_ORIENTATION = 0x0112


def probe_jpeg(data: bytes, *, max_pixels: int, min_side_px: int) -> int | None:
    """The EXIF orientation (1..8, 1 = stored upright) of a JPEG nvJPEG can take as it is, or None
    (the CPU decoder will judge it)."""
    if len(data) < 4 or not data.startswith(b"\xff\xd8") or not data.rstrip(b"\x00\r\n ").endswith(JPEG_EOI):
        return None
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only, no pixels
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        width, height = img.size
        orientation = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - any header trouble is the CPU decoder's to name
        return None
    if width * height > max_pixels or min(width, height) < min_side_px or not 1 <= orientation <= 8:
        return None
    return orientation


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) tensor made upright as PIL's `ImageOps.exif_transpose` does for that EXIF value."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.transpose(-1, -2).flip(-1)  # rotate 90 degrees clockwise
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return image.transpose(-1, -2).flip(-2)  # rotate 90 degrees counter-clockwise
    return image


def nvjpeg_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return True


def _nvjpeg(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode on the GPU, batched; an image nvJPEG fails on comes back None."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the batched call: find it image by image
        out = []
        for e in encoded:
            try:
                out.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_batch(datas: list[bytes], *, device: torch.device, max_pixels: int, min_side_px: int,
                 gpu_decoder=None) -> list[torch.Tensor | np.ndarray | DecodeError]:
    """Each input decoded, or the DecodeError that quarantines it.

    On CUDA with torchvision: (3, H, W) uint8 tensors on `device` (nvJPEG for the JPEGs it can take,
    the CPU decoder plus one copy for the rest). Elsewhere: (H, W, 3) host arrays, `decode_image`.
    `gpu_decoder` replaces nvJPEG (list of bytes -> list of (3, H, W) tensors or None); tests pass a
    CPU stand-in to check the routing and orientation handling around it.
    """
    def on_cpu(data: bytes):
        try:
            return decode_image(data, max_pixels=max_pixels, min_side_px=min_side_px)
        except DecodeError as err:
            return err

    if gpu_decoder is None:
        if not nvjpeg_available(device):
            return [on_cpu(d) for d in datas]
        gpu_decoder = lambda batch: _nvjpeg(batch, device)  # noqa: E731
    orientations = [probe_jpeg(d, max_pixels=max_pixels, min_side_px=min_side_px) for d in datas]
    to_gpu = [k for k, o in enumerate(orientations) if o is not None]
    out: list = [None] * len(datas)
    for k, image in zip(to_gpu, gpu_decoder([datas[k] for k in to_gpu])):
        if image is not None:
            out[k] = apply_orientation(image, orientations[k]).contiguous()
    for k, data in enumerate(datas):
        if out[k] is None:  # not for nvJPEG, or refused by it: the CPU decoder decodes or names the fault
            result = on_cpu(data)
            out[k] = result if isinstance(result, DecodeError) else to_device([result], device)[0]
    return out


def decode_device(catalog) -> torch.device:
    """Where a build decodes: the face detector's CUDA device when `execution.decode` allows it and
    nvJPEG is there, else the host. `decode: gpu` without both is a clear error, not a slow build."""
    from pipeline.device import pick_device

    choice = catalog.execution.decode
    if choice == "cpu":
        return torch.device("cpu")
    device = pick_device(catalog.detectors.face.device)
    if nvjpeg_available(device):
        return device
    if choice == "gpu":
        raise RuntimeError(f"execution.decode is 'gpu' but the face detector's device is {device} "
                           "and/or torchvision (nvJPEG) is not installed; use 'auto' or 'cpu'")
    return torch.device("cpu")
