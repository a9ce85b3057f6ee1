"""Property-based fuzzing (hypothesis) of the two parsers of untrusted input: the image decoder and
the catalog loader. Each either succeeds or raises its own clear error type; nothing else escapes.

The default run tries 150 cases per property; the long run (documented in docs/reliability.md):
    FACECURATE_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics
"""

from __future__ import annotations

import os

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.catalog import CatalogError, parse_catalog
from pipeline.decode import DecodeError, decode_image
from tests.badfiles import awkward_good_files, face_jpeg

FUZZ_EXAMPLES = int(os.environ.get("FACECURATE_FUZZ_EXAMPLES", "150"))
SEEDS = [face_jpeg()] + list(awkward_good_files().values())
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _decode_or_refuse(data: bytes) -> None:
    try:
        rgb = decode_image(data, max_pixels=4_000_000)
    except DecodeError as err:
        assert err.reason  # refused, with a reason
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and min(rgb.shape[:2]) >= 16


@st.composite
def mutated_images(draw):
    """A real image file, then truncated, bit-flipped, spliced or padded: what the web serves."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "zero":
            data[pos:pos + draw(st.integers(1, 512))] = bytes(min(512, len(data) - pos))
    return bytes(data)


@FUZZ
@given(mutated_images())
def test_decoder_on_mutated_images(data):
    _decode_or_refuse(data)


@FUZZ
@given(st.binary(max_size=4096))
def test_decoder_on_random_bytes(data):
    _decode_or_refuse(data)


SOURCE_KEYS = ["name", "kind", "path", "include", "pre_cropped", "labels", "split", "max_bytes", "timeout_s", "retries"]
values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) |
                      st.text(max_size=20), lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@st.composite
def catalogs(draw):
    """Near-valid catalogs: the bundled one with fields dropped, retyped or added at random."""
    base = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "catalog.yaml")))
    base["sources"] = [{"name": "s", "kind": "folder", "path": "/tmp"}]
    targets = {"top": base, "source": base["sources"][0], "rule": base["rules"],
               "detector": base["detectors"]["landmarkers"][0]}  # held here: a mutation may unlink them
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(sorted(targets)))
        target = targets[where]
        keys = SOURCE_KEYS if where == "source" else list(target) + ["bogus"]
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(values)
    return base


def _parse_or_refuse(data) -> None:
    try:
        parse_catalog(data, name="fuzz.yaml")
    except CatalogError as err:
        assert str(err).startswith("fuzz.yaml: ")  # names the file, then the field
        assert "Traceback" not in str(err)


@FUZZ
@given(catalogs())
def test_catalog_loader_on_mutated_catalogs(data):
    _parse_or_refuse(data)


@FUZZ
@given(values)
def test_catalog_loader_on_any_yaml_value(data):
    _parse_or_refuse(data)
