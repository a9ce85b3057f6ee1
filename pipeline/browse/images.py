"""A face's original image, read from its row's own uri, and what draws points over images.

The app never takes a path from a request: a face is named by its face_id, and its image is read
from the uri stored in that face's row (a file, an fsspec URL or a tar member `path#member`, read
with the build's own readers and their safety checks). Remote (http) images are not fetched by a
local read-only viewer; the page links to them instead.
"""

from __future__ import annotations

import base64

import numpy as np

from pipeline.sources import FetchError, SourceItem, TarReader, read_file

MAX_IMAGE_BYTES = 64 << 20
_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


class ImageUnavailable(Exception):
    """Why a face's original image cannot be shown (missing, unreadable, remote, not an image)."""


def image_type(data: bytes) -> str | None:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def read_image(uri: str) -> tuple[bytes, str]:
    """(bytes, mime type) of the image at a row's uri, or ImageUnavailable with the reason."""
    if uri.startswith(("http://", "https://")):
        raise ImageUnavailable("remote image: not fetched by the browser app (open the link)")
    item = SourceItem("browse", uri, None, None)
    try:
        if "#" in uri:  # a tar member: only a member of that tar, refused if unsafe (links, ../, devices)
            reader = TarReader()
            try:
                data = reader.read(item, MAX_IMAGE_BYTES)
            finally:
                reader.close()
        else:
            data = read_file(item, MAX_IMAGE_BYTES)
    except FetchError as err:
        raise ImageUnavailable(str(err)) from None
    except Exception as err:  # noqa: BLE001 - a broken tar, a permission error...: shown, never a crash
        raise ImageUnavailable(f"{type(err).__name__}: {err}") from None
    mime = image_type(data)
    if mime is None:
        raise ImageUnavailable("not an image (unknown file type)")
    return data, mime


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def points_path(points, affine=None) -> str:
    """SVG path data drawing each of the (x, y) points as a dot (a zero-length segment with round
    caps): one element per label instead of 68 circles. `affine` (2x3 row-major) maps them first."""
    if points is None:
        return ""
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if affine is not None:
        a = np.asarray(affine, dtype=np.float64).reshape(2, 3)
        xy = xy @ a[:, :2].T + a[:, 2]
    xy = xy[np.isfinite(xy).all(axis=1)]
    return "".join(f"M{x:.1f} {y:.1f}h0" for x, y in xy)
