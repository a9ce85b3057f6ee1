"""Image bytes -> RGB uint8 array, or a DecodeError whose reason goes to the quarantine table.

Handles what in-the-wild crawls contain: EXIF rotation, CMYK, grayscale, 16-bit, palette and alpha,
animations (first frame); refuses empty, truncated, non-image, bomb-sized and degenerate inputs.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# We check the pixel count ourselves from the header, before any pixel is decoded, and give a
# clearer reason than PIL's DecompressionBombError; keep PIL's own guard as a second line.
Image.MAX_IMAGE_PIXELS = 200_000_000
ALLOWED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"}


class DecodeError(ValueError):
    """An input that cannot become an RGB image; `reason` is short and stable (it is grouped on)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_uint8_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grey: scale the actual range down to 8 bits instead of clipping to white.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite transparent pixels onto mid-grey: neither black nor white biases the face crop.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode == "RGB":
        return np.asarray(img)  # convert("RGB") of an RGB image is one more full copy
    return np.asarray(img.convert("RGB"))


def decode_image(data: bytes, *, max_pixels: int = 40_000_000, min_side_px: int = 16) -> np.ndarray:
    """Decode `data` to an (H, W, 3) uint8 RGB array, upright per its EXIF orientation."""
    if not data:
        raise DecodeError("empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            width, height = img.size
            if fmt not in ALLOWED_FORMATS:
                raise DecodeError("unsupported format", str(fmt))
            if width * height > max_pixels:
                raise DecodeError("too many pixels", f"{width}x{height} > {max_pixels} (decompression bomb guard)")
            if min(width, height) < min_side_px:
                raise DecodeError("too small", f"{width}x{height}, min side {min_side_px}px")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animations: the first frame is the image
            img.load()
            # In place: without it PIL returns a full copy even when there is nothing to turn.
            ImageOps.exif_transpose(img, in_place=True)
            rgb = _to_uint8_rgb(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image", f"{len(data)} bytes, starts {data[:8]!r}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError("too many pixels", str(err)) from None
    except OSError as err:
        text = str(err)
        reason = "truncated image" if "truncated" in text or "broken data stream" in text else "corrupt image"
        raise DecodeError(reason, text) from None
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError, MemoryError) as err:
        raise DecodeError("corrupt image", f"{type(err).__name__}: {err}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DecodeError("corrupt image", f"decoded to shape {rgb.shape} {rgb.dtype}")
    return np.ascontiguousarray(rgb)
