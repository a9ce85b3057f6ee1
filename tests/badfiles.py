"""Bad and awkward image files, made on the fly (none ship): name -> bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from tests.conftest import DATA


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def face_jpeg() -> bytes:
    return (DATA / "aflw2000-dev" / "image00055.jpg").read_bytes() if (DATA / "aflw2000-dev" / "image00055.jpg").exists() \
        else next((DATA / "aflw2000-dev").glob("*.jpg")).read_bytes()


def huge_header_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG that claims width x height in its header but carries almost no data (a bomb header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def bad_files() -> dict[str, bytes]:
    """Files that must be quarantined (name -> bytes); the name's extension is what a crawler sees."""
    good = face_jpeg()
    png = _png(Image.open(io.BytesIO(good)))
    return {
        "empty.jpg": b"",
        "truncated_half.jpg": good[: len(good) // 2],
        "truncated_header.jpg": good[:200],
        "truncated.png": png[: len(png) // 3],
        "text.jpg": b"this is not an image, just text\n" * 10,
        "html.png": b"<!doctype html><html><body>404 Not Found</body></html>",
        "random.jpg": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "zeros.jpg": b"\0" * 5000,
        "bomb.png": huge_header_png(),
        "tiny_8x8.png": _png(Image.new("RGB", (8, 8), (200, 150, 120))),
        "sliver_20000x1.png": _png(Image.new("L", (20000, 1), 128)),
        "pdf.jpg": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF",
        "corrupt_body.jpg": good[:600] + bytes(len(good) - 600),
        "one_pixel.png": _png(Image.new("RGB", (1, 1), (10, 20, 30))),
    }


def awkward_good_files() -> dict[str, bytes]:
    """Valid images in awkward encodings that must decode (to a face-bearing RGB image)."""
    face = Image.open(io.BytesIO(face_jpeg())).convert("RGB")
    arr16 = (np.asarray(face.convert("L"), dtype=np.uint16) * 257)
    rotated = face.transpose(Image.Transpose.ROTATE_90)  # stored sideways, EXIF says rotate back
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display = stored rotated 90 clockwise, which undoes ROTATE_90
    rgba = face.convert("RGBA")
    rgba.putalpha(200)
    return {
        "cmyk.jpg": _jpeg(face.convert("CMYK")),
        "grey.jpg": _jpeg(face.convert("L")),
        "grey16.png": _png(Image.fromarray(arr16)),
        "palette.png": _png(face.convert("P", palette=Image.Palette.ADAPTIVE)),
        "alpha.png": _png(rgba),
        "exif_rotated.jpg": _jpeg(rotated, exif=exif.tobytes()),
        "webp_as.jpg": (lambda b: (face.save(b, format="WEBP"), b.getvalue())[1])(io.BytesIO()),
        "png_named.jpg": _png(face),  # wrong extension: decoded by content
        "huge_exif.jpg": _jpeg(face, exif=_big_exif()),
        "animated.gif": _animated(face, "GIF"),  # first frame is the face
        "animated.webp": _animated(face, "WEBP"),
    }


def _big_exif() -> bytes:
    """~60 kB of EXIF (a long ImageDescription), near JPEG's 64 kB APP1 limit."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000
    return exif.tobytes()


def _animated(face: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    frames = [face, Image.new("RGB", face.size, (0, 0, 0)), Image.new("RGB", face.size, (255, 255, 255))]
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()
