"""A detector's catalog entry: which model, which weight file (sha256-checked), its options.

Each detector validates its own `options` with a pydantic model named in the registry, so a bad
option fails at catalog load with its field path, before any model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.detect.registry import check_name


class DetectorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # a key of pipeline/detect/registry.py
    weights: Path | None = None  # main weight file; None for detectors that find their own (fan)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")  # defaults to KNOWN_SHA256
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = Field(default=64, ge=1, le=4096)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    options: dict = Field(default_factory=dict)  # validated by the detector's own options model

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return check_name(name)
