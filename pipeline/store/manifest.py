"""A version's manifest.json, typed: what the version holds (its files, its counts), where it came
from (parent, catalog, detector chain, folded trainer rounds) and what its build cost. Written last,
by atomic rename, it is the version's commit point; it is read and written here only.

Every part is typed where the code reads it. What a manifest holds is kept as it was written: keys
this code does not know stay (a newer or older writer's), keys a manifest lacks stay absent (older
versions lack some), and key order is kept, so `Manifest.read(...).to_dict()` is the file's JSON
and `write` of a manifest read gives back the same file.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from pipeline.store.files import write_atomic
from pipeline.store.layout import MANIFEST, Store


class _Part(BaseModel):
    """A manifest part: typed fields, unknown keys kept, and `to_dict` gives back what it was made of."""

    model_config = ConfigDict(extra="allow")
    _order: tuple[str, ...] = PrivateAttr(default=())  # the keys it was made of, in their order

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler):
        part = handler(data)
        if isinstance(data, dict) and part is not data:
            part._order = tuple(data)
        return part

    def to_dict(self) -> dict:
        """The JSON object: the keys it was made of in their order, then any set since."""
        extra = self.__pydantic_extra__ or {}
        present = [k for k in type(self).model_fields if k in self.model_fields_set] + list(extra)
        keys = [k for k in self._order if k in present] + [k for k in present if k not in self._order]
        return {k: _plain(getattr(self, k)) for k in keys}


def _plain(value: Any) -> Any:
    if isinstance(value, _Part):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class FileEntry(_Part):
    """One file of the version: a faces shard or a side table (images, quarantine, scores)."""

    file: str  # its name in the version folder
    rows: int = 0
    bytes: int = 0
    sha256: str | None = None


class DetectorEntry(_Part):
    """One model of the chain that labelled the version (`pipeline.plan.chain_identity`)."""

    role: str | None = None  # face | primary | landmarker | verifier
    name: str | None = None
    weights: str | None = None  # the weight file's path
    weights_sha256: str | None = None
    fuse: bool | None = None  # the verifier's: it fuses the candidates into the label
    tau_pct: int | float | None = None
    fusion: str | None = None  # the verifier's fusion rule (pipeline.fusion.FUSION_RULE)


class Counts(_Part):
    """What the version holds, image by image and face by face (absent in an older manifest: 0)."""

    images_seen: int = 0
    images_decoded: int = 0
    images_quarantined: int = 0
    images_duplicate: int = 0
    images_with_faces: int = 0
    images_without_faces: int = 0
    faces: int = 0
    faces_kept: int = 0
    faces_dropped: int = 0
    drop_reasons: dict[str, int] = Field(default_factory=dict)  # the first failed rule's feature -> faces
    quarantine_reasons: dict[str, int] = Field(default_factory=dict)
    images_new: int = 0  # read by this build
    images_unchanged: int = 0  # already in the parent's ledger
    faces_relabelled: int = 0  # whose label a folded trainer round changed


class Timings(_Part):
    """This build's batches only (resumed ones as first run): stage -> seconds summed over batches."""

    faces: int = 0
    seconds: dict[str, int | float] = Field(default_factory=dict)


class Manifest(_Part):
    schema_version: int | None = None  # pipeline.store.schema.SCHEMA_VERSION when written
    dataset: str | None = None
    version: int | None = None
    parent: int | None = None  # None: the first version
    created_at: str | None = None
    note: str = ""
    catalog_path: str | None = None
    catalog_hash: str | None = None
    rules_hash: str | None = None
    detectors: list[DetectorEntry] | None = None
    counts: Counts = Field(default_factory=Counts)
    shards: list[FileEntry] = Field(default_factory=list)  # its faces files, in row order
    tables: dict[str, FileEntry] = Field(default_factory=dict)  # images, quarantine, scores (a folded round's)
    timings: Timings | None = None
    relabelled: str | None = None  # the chain change that re-labelled every face (the parent's not carried)
    round_folded: list[int] | None = None  # the trainer rounds whose scores this version folds
    round_weights_from: int | None = None  # the version whose folded scores.parquet was re-applied

    @classmethod
    def read(cls, store: Store, version: int) -> Manifest:
        with store.fs.open(f"{store.version_dir(version)}/{MANIFEST}", "rb") as f:
            return cls.from_dict(json.loads(f.read()))

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return cls.model_validate(data)

    def write(self, store: Store) -> None:
        """Write it as `self.version`'s manifest, atomically: the version's commit point."""
        path = f"{store.version_dir(self.version)}/{MANIFEST}"
        write_atomic(store.fs, path, json.dumps(self.to_dict(), indent=2).encode())

    def detector_dicts(self) -> list[dict] | None:
        """`detectors` as written (what `pipeline.plan.chain_change` compares), None if it has none."""
        return None if self.detectors is None else [d.to_dict() for d in self.detectors]
