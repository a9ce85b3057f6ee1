"""Build a detector or landmarker from its catalog entry (`pipeline.detect.spec.DetectorSpec`): the
registry says where its class lives; its module is imported only now."""

from __future__ import annotations

import importlib

from pipeline.detect.spec import DetectorSpec, check_role, registered, validate_options


def _build(spec: DetectorSpec):
    entry = registered(spec.name)
    if entry.needs_weights and spec.weights is None:
        raise ValueError(f"detector {spec.name!r} needs `weights:` (a weight file path)")
    factory = getattr(importlib.import_module(entry.module), entry.cls)
    return factory(spec.weights, weights_sha256=spec.sha256, device=spec.device, batch_size=spec.batch_size,
                   precision=spec.precision, options=validate_options(spec))


def build_face_detector(spec: DetectorSpec):
    return _build(check_role(spec, "face"))


def build_landmarker(spec: DetectorSpec):
    return _build(check_role(spec, "landmarker"))
