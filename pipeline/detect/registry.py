"""Detector names -> (module, class, options model). Models are imported only when built."""

from __future__ import annotations

import importlib

from pydantic import BaseModel

from pipeline.detect.spec import DetectorSpec

FACE_DETECTORS: dict[str, tuple[str, str, str]] = {
    "scrfd": ("pipeline.detect.scrfd", "ScrfdDetector", "ScrfdOptions"),
    "faceboxes": ("pipeline.detect.faceboxes", "FaceBoxesDetector", "FaceBoxesOptions"),
}
LANDMARKERS: dict[str, tuple[str, str, str]] = {
    "tddfa_mb05": ("pipeline.detect.tddfa", "TDDFALandmarker", "TDDFAOptions"),
    "peppa68": ("pipeline.detect.peppa", "PeppaLandmarker", "PeppaOptions"),
    "openseeface": ("pipeline.detect.openseeface", "OpenSeeFaceLandmarker", "OpenSeeFaceOptions"),
    "fan": ("pipeline.detect.fan", "FanLandmarker", "FanOptions"),
    "insightface68": ("pipeline.detect.insightface68", "Insightface68Landmarker", "Insightface68Options"),
}
NEEDS_WEIGHTS = {"scrfd", "faceboxes", "tddfa_mb05", "peppa68", "openseeface"}  # fan / insightface68 find theirs


def _entry(name: str) -> tuple[str, str, str]:
    entry = FACE_DETECTORS.get(name) or LANDMARKERS.get(name)
    if entry is None:
        raise ValueError(f"unknown detector {name!r}")
    return entry


def validate_options(spec: DetectorSpec) -> BaseModel:
    """The detector's typed options; raises pydantic.ValidationError with the field path."""
    module, _, options = _entry(spec.name)
    return getattr(importlib.import_module(module), options).model_validate(spec.options)


def _build(spec: DetectorSpec):
    if spec.name in NEEDS_WEIGHTS and spec.weights is None:
        raise ValueError(f"detector {spec.name!r} needs `weights:` (a weight file path)")
    module, cls, _ = _entry(spec.name)
    factory = getattr(importlib.import_module(module), cls)
    return factory(spec.weights, weights_sha256=spec.sha256, device=spec.device, batch_size=spec.batch_size,
                   precision=spec.precision, options=validate_options(spec))


def build_face_detector(spec: DetectorSpec):
    if spec.name not in FACE_DETECTORS:
        raise ValueError(f"{spec.name!r} is not a face detector (one of {sorted(FACE_DETECTORS)})")
    return _build(spec)


def build_landmarker(spec: DetectorSpec):
    if spec.name not in LANDMARKERS:
        raise ValueError(f"{spec.name!r} is not a landmarker (one of {sorted(LANDMARKERS)})")
    return _build(spec)
