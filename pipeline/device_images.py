"""Images that live on the torch device: the GPU curation path's resize, letterbox and crop cutting.

The CPU path keeps images as (H, W, 3) uint8 numpy arrays and cuts crops with OpenCV. The GPU path
keeps them as (3, H, W) uint8 tensors on the device (decoded there by nvJPEG, see `gpu_decode`), and
every resize and crop below is the same arithmetic as its OpenCV twin, done by `grid_sample` /
`interpolate`: half-pixel centres, bilinear, no antialiasing, zero outside the image. The two paths
differ only by OpenCV's fixed-point rounding (at most a grey level or two; tests hold them together).

Every detector and landmarker accepts either kind of image; the helpers here dispatch on the type.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.crops import crop_roi, roi_window

Image = np.ndarray | Tensor  # (H, W, 3) uint8 RGB array, or (3, H, W) uint8 RGB tensor


def is_tensor_batch(images: list) -> bool:
    return bool(images) and isinstance(images[0], Tensor)


def image_hw(image: Image) -> tuple[int, int]:
    return tuple(image.shape[-2:]) if isinstance(image, Tensor) else tuple(image.shape[:2])


def as_numpy(image: Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB on the host, whatever the kind (the models without a torch path need it)."""
    if isinstance(image, Tensor):
        return np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    return image


def mirror(image: Image) -> Image:
    """The image flipped left-right. A host image comes back as a view, not a copy: the landmarkers
    only cut their crops' windows out of it, so copying a whole photo to read a face from it cost
    more than the teacher's pass on that face (docs/benchmarks.md)."""
    if isinstance(image, Tensor):
        return image.flip(-1)
    return image[:, ::-1]


def to_device(images: list[np.ndarray], device: torch.device) -> list[Tensor]:
    """Host arrays -> (3, H, W) uint8 device tensors; pinned and asynchronous on CUDA, so the copy
    overlaps whatever the host does next."""
    out = []
    for img in images:
        t = torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1)  # PIL's are read-only
        if device.type == "cuda":
            out.append(t.contiguous().pin_memory().to(device, non_blocking=True))
        else:
            out.append(t.to(device))
    return out


def _crop_grid(roi: np.ndarray, size: int, height: int, width: int, device) -> Tensor:
    """The sampling grid (size, size, 2), in grid_sample's normalised coordinates, that reproduces
    `crops.crop_roi`: the window [sx, ex) x [sy, ey) zero-padded outside the image, resized by
    OpenCV's INTER_LINEAR (source = (dst + 0.5) * scale - 0.5, clamped to the window's edge)."""
    sx, sy, ex, ey = roi_window(roi)  # crop_roi's window
    dw, dh = max(ex - sx, 1), max(ey - sy, 1)
    steps = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    xs = (steps * (dw / size) - 0.5).clamp(0, dw - 1) + sx
    ys = (steps * (dh / size) - 0.5).clamp(0, dh - 1) + sy
    gx = (2 * xs + 1) / width - 1  # align_corners=False: pixel x sits at (2x + 1) / W - 1
    gy = (2 * ys + 1) / height - 1
    return torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)


def crop_rois(images: list[Image], rois: list[tuple[int, np.ndarray]], size: int) -> np.ndarray | Tensor:
    """Cut `(image index, roi)` crops at size x size.

    numpy images -> (N, size, size, 3) uint8 array (OpenCV, `crops.crop_roi`);
    tensor images -> (N, 3, size, size) float32 tensor of whole grey levels on their device.
    """
    if not is_tensor_batch(images):
        if not rois:
            return np.zeros((0, size, size, 3), np.uint8)
        return np.stack([crop_roi(images[i], roi, size) for i, roi in rois])
    device = images[0].device
    # Channels-last, as the host path's NHWC arrays are: the convolutions run faster so on CPU.
    out = torch.empty((len(rois), 3, size, size), device=device).contiguous(memory_format=torch.channels_last)
    by_image: dict[int, list[int]] = {}
    for k, (i, _) in enumerate(rois):
        by_image.setdefault(i, []).append(k)
    for i, ks in by_image.items():  # one grid_sample per image, all of its faces at once
        h, w = image_hw(images[i])
        grid = torch.cat([_crop_grid(rois[k][1], size, h, w, device) for k in ks], dim=0)  # (n*size, size, 2)
        source = images[i].unsqueeze(0).float()
        cut = F.grid_sample(source, grid.unsqueeze(0), mode="bilinear", padding_mode="zeros", align_corners=False)
        out[ks] = cut[0].reshape(3, len(ks), size, size).transpose(0, 1)
    return out.round_().clamp_(0, 255)


def resize(image: Tensor, height: int, width: int) -> Tensor:
    """cv2.resize(..., INTER_LINEAR) of a (3, H, W) uint8 tensor -> (3, height, width) float32."""
    x = F.interpolate(image.unsqueeze(0).float(), size=(height, width), mode="bilinear", align_corners=False,
                      antialias=False)
    return x[0].round_().clamp_(0, 255)


def crops_to_numpy(crops: np.ndarray | Tensor) -> np.ndarray:
    """`crop_rois` output -> (N, size, size, 3) uint8 host array (for JPEG encoding and features)."""
    if isinstance(crops, Tensor):
        return np.ascontiguousarray(crops.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return crops
