"""Detector names -> where each one lives. Models are imported only when built.

Adding a detector or landmarker: one module in `pipeline/detect/` (a class built from
(weights, weights_sha256, device, batch_size, precision, options) and its pydantic options model)
and one line below. The catalog's allowed names are these keys; `pipeline.detect.spec` checks a
catalog entry against them, `pipeline.detect.factory` builds one.
"""

from __future__ import annotations

from typing import NamedTuple

from pipeline.rounds import STUDENT_PREFIX  # a trainer round's model as a candidate ("student:r1")


class Entry(NamedTuple):
    module: str
    cls: str
    options: str  # the module's pydantic options model
    needs_weights: bool = True  # False: it finds its own weights (a hub cache, a model pack)
    # Which jaw contour its 68 points follow: "3d" for a 3DMM fit (the projected contour of the 3D
    # face, AFLW2000-3D's and 300W-LP's convention), "2d" for a 2D landmarker (the visible outline,
    # a different curve beyond ~30 degrees of yaw). pipeline.fusion lets only one kind vote on the jaw.
    contour: str = "2d"


FACE_DETECTORS: dict[str, Entry] = {
    "scrfd": Entry("pipeline.detect.scrfd", "ScrfdDetector", "ScrfdOptions"),
    "faceboxes": Entry("pipeline.detect.faceboxes", "FaceBoxesDetector", "FaceBoxesOptions"),
}
LANDMARKERS: dict[str, Entry] = {
    "tddfa_mb05": Entry("pipeline.detect.tddfa", "TDDFALandmarker", "TDDFAOptions", contour="3d"),
    "peppa68": Entry("pipeline.detect.peppa", "PeppaLandmarker", "PeppaOptions"),
    "openseeface": Entry("pipeline.detect.openseeface", "OpenSeeFaceLandmarker", "OpenSeeFaceOptions"),
    "fan": Entry("pipeline.detect.fan", "FanLandmarker", "FanOptions", needs_weights=False),
    "insightface68": Entry("pipeline.detect.insightface68", "Insightface68Landmarker", "Insightface68Options",
                           needs_weights=False),
}


def contour_convention(candidate: str) -> str:
    """'3d' or '2d' for a candidate label's name: a landmarker, its mirrored pass ('tddfa_mb05.flip'),
    or a trainer round's student; unknown names count as '2d'."""
    if candidate.startswith(STUDENT_PREFIX):  # the student is a 3DMM fit, like its teacher
        return "3d"
    entry = LANDMARKERS.get(candidate.split(".", 1)[0])
    return entry.contour if entry is not None else "2d"


def known_names() -> list[str]:
    """Every registered detector and landmarker name, sorted."""
    return sorted({**FACE_DETECTORS, **LANDMARKERS})
