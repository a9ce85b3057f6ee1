"""A detector's catalog entry: which model, which weight file (sha256-checked), its options; and the
checks of an entry against the registry, all here: its name is registered, it is of the role the
chain gives it (face detector or landmarker), and its options are valid.

Each detector validates its own `options` with a pydantic model named in the registry, so a bad
option fails at catalog load with its field path, before any model is built.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.detect.registry import FACE_DETECTORS, LANDMARKERS, Entry, known_names

# role -> (what a model of it is called, the registry's models of it)
_ROLES = {"face": ("a face detector", FACE_DETECTORS), "landmarker": ("a landmarker", LANDMARKERS)}


def check_name(name: str) -> str:
    """`name` if it is registered; ValueError listing the known names otherwise."""
    if name not in FACE_DETECTORS and name not in LANDMARKERS:
        raise ValueError(f"unknown detector {name!r}; known detectors: {', '.join(known_names())} "
                         "(pipeline/detect/registry.py lists them)")
    return name


def registered(name: str) -> Entry:
    """The registry's entry of `name` (ValueError, listing the known names, if it has none)."""
    return FACE_DETECTORS.get(name) or LANDMARKERS.get(check_name(name))


class DetectorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # a key of pipeline/detect/registry.py
    weights: Path | None = None  # main weight file; None for detectors that find their own (fan)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")  # defaults to KNOWN_SHA256
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # crops per forward pass; None: the model's default for its device (small on CPU, large on a GPU)
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    options: dict = Field(default_factory=dict)  # validated by the detector's own options model

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return check_name(name)


def check_role(spec: DetectorSpec, role: Literal["face", "landmarker"], where: str = "") -> DetectorSpec:
    """`spec` if its model is of `role`; ValueError (prefixed by `where`) listing that role's models otherwise."""
    what, models = _ROLES[role]
    if spec.name not in models:
        raise ValueError(f"{where}{spec.name!r} is not {what} (one of {sorted(models)})")
    return spec


def validate_options(spec: DetectorSpec) -> BaseModel:
    """The detector's typed options; raises pydantic.ValidationError with the field path."""
    entry = registered(spec.name)
    return getattr(importlib.import_module(entry.module), entry.options).model_validate(spec.options)
