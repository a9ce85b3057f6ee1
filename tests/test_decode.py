"""Decoding: awkward but valid encodings decode right; every kind of bad file fails with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import DecodeError, decode_image
from tests.badfiles import awkward_good_files, bad_files, face_jpeg

EXPECTED_REASON = {
    "empty.jpg": "empty file",
    "truncated_half.jpg": "truncated image",
    "truncated_header.jpg": None,  # any reason: the decoder may call it corrupt or truncated
    "truncated.png": None,
    "text.jpg": "not an image",
    "html.png": "not an image",
    "random.jpg": "not an image",
    "zeros.jpg": "not an image",
    "bomb.png": "too many pixels",
    "tiny_8x8.png": "too small",
    "sliver_20000x1.png": "too small",
    "pdf.jpg": "not an image",
    "corrupt_body.jpg": None,
    "one_pixel.png": "too small",
}


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_file_is_refused_with_a_reason(name):
    with pytest.raises(DecodeError) as err:
        decode_image(bad_files()[name])
    assert err.value.reason
    if EXPECTED_REASON[name]:
        assert err.value.reason == EXPECTED_REASON[name]


@pytest.mark.parametrize("name", sorted(awkward_good_files()))
def test_awkward_encodings_decode_to_upright_rgb(name):
    reference = np.asarray(Image.open(io.BytesIO(face_jpeg())).convert("L"), dtype=np.float32)
    rgb = decode_image(awkward_good_files()[name])
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[:2] == reference.shape  # EXIF rotation undone: same orientation as the original
    grey = rgb.astype(np.float32).mean(axis=2)
    # Same picture (not a blank or a rotated one): strong correlation with the original's grey levels.
    corr = np.corrcoef(grey.ravel(), reference.ravel())[0, 1]
    assert corr > 0.9, corr


def test_exif_rotation_is_applied():
    face = Image.open(io.BytesIO(face_jpeg())).convert("RGB").resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 270 to display: stored landscape, shown portrait
    buf = io.BytesIO()
    face.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).shape[:2] == (300, 200)


def test_pixel_limit_is_a_setting():
    data = bad_files()["bomb.png"]
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(data, max_pixels=10_000)
    big = io.BytesIO()
    Image.new("RGB", (200, 200)).save(big, format="PNG")
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(big.getvalue(), max_pixels=100 * 100)
    assert decode_image(big.getvalue(), max_pixels=200 * 200).shape == (200, 200, 3)
