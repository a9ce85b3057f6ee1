"""The typed catalog: sources to crawl, detector chain, quality rules, output, schedule.

Read once at the edge (`load_catalog`) and passed down; every error names file, field path and problem.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.detect.spec import DetectorSpec, check_role, validate_options
from pipeline.settings import expand_vars
from pipeline.store.layout import DATASET_NAME, Store, parse_ref

FEATURES = (
    "face_px",  # sqrt(w*h) of the face box, pixels
    "det_score",  # face detector confidence
    "yaw_deg",
    "pitch_deg",
    "roll_deg",
    "abs_yaw_deg",
    "blur",  # variance of the Laplacian of the aligned crop: low = blurry
    "agreement_nme_pct",  # NME between the primary landmarker and the others (mean)
    "flip_nme_pct",  # NME between the primary's points and its points on the mirrored image
    "out_of_frame_frac",  # fraction of primary points outside the image
    "landmark_score",  # mean per-point confidence of the primary landmarker
    "verifier_nme_pct",  # the verifier's predicted NME of the face's label (pipeline/verifier.py)
)
Feature = Literal[FEATURES]  # type: ignore[valid-type]


class CatalogError(ValueError):
    """A catalog that cannot be used; the message names file, field and problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _SourceBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    pre_cropped: bool = False  # one face fills the image (3DDFA-style crop): skip detection
    # "mat": <stem>.mat beside each image (AFLW2000-3D layout); "aflw21": AFLW's 21 points of each
    # image, by file stem, from `labels_file` (the wild crops' references: measurement only, never a target)
    labels: Literal["none", "mat", "aflw21"] = "none"
    labels_file: str | None = None
    split: Literal["train", "eval"] = "train"  # eval sources are never trained on
    include: tuple[str, ...] = ("*.jpg", "*.jpeg", "*.png", "*.webp", "*.bmp", "*.gif", "*.tif", "*.tiff")
    max_bytes: int = Field(default=50_000_000, ge=1)


    @model_validator(mode="after")
    def _labels_file(self) -> _SourceBase:
        if (self.labels == "aflw21") != (self.labels_file is not None):
            raise ValueError("`labels: aflw21` and `labels_file` (an .npz of names, pts21, yaw_deg) go together")
        return self


class FolderSource(_SourceBase):
    kind: Literal["folder"]
    path: str  # local path or any fsspec URL; searched recursively


class UrlListSource(_SourceBase):
    kind: Literal["urls"]
    path: str  # a text file, one http(s) URL a line; '#' starts a comment
    timeout_s: float = Field(default=20.0, gt=0)
    retries: int = Field(default=3, ge=0, le=10)
    backoff_s: float = Field(default=0.5, ge=0)


class TarSource(_SourceBase):
    kind: Literal["tar"]
    path: str  # a tar file, a folder of them, or a glob


SourceSpec = Annotated[FolderSource | UrlListSource | TarSource, Field(discriminator="kind")]


class VerifierSpec(_Strict):
    """The label verifier (pipeline/verifier.py): scores every candidate label, fuses them."""

    weights: Path | None = None  # None: the verifier shipped with the package (pipeline/assets/verifier.pt)
    fuse: bool = True  # the face's label is the verifier-weighted fusion of the candidates (else the primary's)
    # softness of the per-point vote (pipeline/fusion.py); None: the one the verifier was trained with
    tau_pct: float | None = Field(default=None, gt=0)


class DetectorChain(_Strict):
    face: DetectorSpec  # boxes (skipped for pre_cropped sources)
    landmarkers: tuple[DetectorSpec, ...] = Field(min_length=1)  # first = primary pseudo-labels
    verifier: VerifierSpec | None = None  # needs a tddfa_mb05 landmarker (its network's features)

    @model_validator(mode="after")
    def _roles(self) -> DetectorChain:
        check_role(self.face, "face", where="face: ")
        for i, spec in enumerate(self.landmarkers):
            check_role(spec, "landmarker", where=f"landmarkers[{i}]: ")
        if self.verifier is not None and not any(s.name == "tddfa_mb05" for s in self.landmarkers):
            raise ValueError("verifier: needs a tddfa_mb05 landmarker in the chain (it reads that network's features)")
        return self


class DropRule(_Strict):
    feature: Feature
    min: float | None = None
    max: float | None = None
    # One upper bound per AFLW2000-3D yaw bin (|yaw| <= 30, 30-60, > 60, from abs_yaw_deg): a rule
    # calibrated so each pose keeps the same share of its good labels (docs/labels.md).
    max_by_yaw_bin: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _bound(self) -> DropRule:
        if self.min is None and self.max is None and self.max_by_yaw_bin is None:
            raise ValueError("a drop rule needs `min`, `max` or `max_by_yaw_bin`")
        return self


class WeightRule(_Strict):
    feature: Feature
    scale: float = Field(gt=0)  # weight *= exp(-max(feature - offset, 0) / scale)
    offset: float = 0.0


class Rules(_Strict):
    drop: tuple[DropRule, ...] = ()
    weight: tuple[WeightRule, ...] = ()
    min_weight: float = Field(default=0.05, ge=0, le=1)  # weights are clipped to [min_weight, 1]


class Limits(_Strict):
    max_pixels: int = Field(default=40_000_000, ge=1)  # decompression-bomb guard
    min_side_px: int = Field(default=16, ge=1)


class Execution(_Strict):
    batch_images: int = Field(default=64, ge=1, le=100_000)  # images per work unit (one shard part)
    # A build of few images is cut into at least this many batches (of 8 images or more, pipeline/plan.py),
    # so that no batch slot idles while another runs the last big batch: a few large batches on two
    # slots leave one of them idle at the end (figures: docs/benchmarks.md, ninth session).
    min_batches: int = Field(default=16, ge=1, le=100_000)
    dask_address: str | None = None  # an existing scheduler; None = LocalCluster
    dask_workers: int = Field(default=1, ge=1)
    dask_processes: bool | None = None  # None: threads in ephemeral Prefect mode, processes with a server
    dask_cuda: bool = False  # a dask_cuda.LocalCUDACluster: one worker process per GPU (needs dask-cuda)
    # Batches each local worker runs at once. None: one per core of the worker's share on CPU, each batch's
    # models on one thread; 2 on GPU workers, so one batch's host work overlaps another's GPU work
    # (pipeline/threads.py says why).
    threads_per_worker: int | None = Field(default=None, ge=1, le=64)
    # Threads of each model (torch intra-op, ONNX Runtime intra-op). None: the local cores shared by every
    # batch the local workers run at once. Set it for a remote cluster, whose workers have their own cores.
    model_threads: int | None = Field(default=None, ge=1, le=256)
    decode: Literal["auto", "cpu", "gpu"] = "auto"  # auto: nvJPEG when the face detector runs on CUDA
    # The committed layout of a version's faces (pipeline/compact.py): batches' part files are rewritten
    # at commit into files of `shard_rows` rows, so a version's file count follows its size, not its
    # batch count. A row group is what readers fetch at random: the trainer's shuffle unit, and one
    # read per face a browse page shows. 256 rows, a build batch's size, keeps both where per-batch
    # files had them; larger groups compress a little better but make every browse page read more.
    # Figures: docs/benchmarks.md.
    shard_rows: int = Field(default=50_000, ge=1, le=10_000_000)
    row_group_rows: int = Field(default=256, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _row_groups_fit(self) -> Execution:
        if self.row_group_rows > self.shard_rows:
            raise ValueError(f"row_group_rows ({self.row_group_rows}) must not exceed shard_rows "
                             f"({self.shard_rows}): a row group lives inside one file")
        return self


class Schedule(_Strict):
    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) not in (5, 6):
            raise ValueError(f"not a cron expression with 5 fields: {value!r}")
        return value


class Catalog(_Strict):
    dataset: str = Field(pattern=f"^{DATASET_NAME.pattern}$")  # a folder under output_root
    output_root: str  # local path or fsspec URL; versions live in <output_root>/<dataset>/vNNNN
    sources: tuple[SourceSpec, ...] = Field(min_length=1)
    detectors: DetectorChain
    rules: Rules = Rules()
    limits: Limits = Limits()
    execution: Execution = Execution()
    schedule: Schedule | None = None
    # Defaults of the trainer's config for `train` and `retrain`, kept as a dict: the pipeline knows
    # nothing of the trainer; the commands check it against TrainConfig when they read the catalog.
    training: dict = Field(default_factory=dict)
    path: str | None = None  # where this catalog was read from (set by load_catalog)

    @model_validator(mode="after")
    def _unique_sources(self) -> Catalog:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources: names must be unique, repeated: {dupes}")
        return self

    def source(self, name: str) -> FolderSource | UrlListSource | TarSource:
        return next(s for s in self.sources if s.name == name)

    def content_hash(self) -> str:
        """sha256 of the catalog's meaning (not its file text or location)."""
        data = self.model_dump(mode="json", exclude={"path"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def rules_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.rules.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def store_of(catalog: Catalog) -> Store:
    """The catalog's dataset store under its output root."""
    return Store(catalog.output_root, catalog.dataset)


def store_for_ref(catalog: Catalog, ref: str | None) -> tuple[Store, int | None]:
    """'NAME@vN', 'NAME' or None (the catalog's dataset) -> its store under the catalog's output root
    and the version asked for (None: the latest)."""
    name, version = parse_ref(ref) if ref else (None, None)
    return Store(catalog.output_root, name or catalog.dataset), version


_KINDS = {"folder", "urls", "tar"}
_PATH_FIELDS = {"path", "output_root", "weights", "bfm", "param_stats", "root", "hub_dir"}


def _loc(parts: tuple) -> str:
    out = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _KINDS and i > 0 and isinstance(parts[i - 1], int):
            continue  # pydantic's discriminator tag, not a field
        elif part.startswith("function-") or part.startswith("tagged-union"):
            continue
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _expand(node, where: str, base_dir: Path):
    """Expand ${VARS} in every string and resolve relative local paths against the catalog's folder."""
    if isinstance(node, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k), base_dir) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{where}[{i}]", base_dir) for i, v in enumerate(node)]
    if isinstance(node, str):
        try:
            value = expand_vars(node)
        except KeyError as err:
            raise CatalogError(f"{where}: environment variable ${{{err.args[0]}}} is not set") from None
        if "\x00" in value:  # no filesystem takes it; found by fuzzing (it crashed path resolution)
            raise CatalogError(f"{where}: contains a NUL character")
        key = where.rsplit(".", 1)[-1]
        if key in _PATH_FIELDS and "://" not in value:
            p = Path(value).expanduser()
            value = str(p if p.is_absolute() else (base_dir / p).resolve())
        return value
    return node


def _validate_detector_options(catalog: Catalog) -> None:
    specs = [("detectors.face", catalog.detectors.face)] + [
        (f"detectors.landmarkers[{i}]", s) for i, s in enumerate(catalog.detectors.landmarkers)
    ]
    for where, spec in specs:
        try:
            validate_options(spec)
        except ValidationError as err:
            first = err.errors()[0]
            raise CatalogError(f"{where}.options.{_loc(tuple(first['loc']))}: {first['msg']}") from None


def parse_catalog(data: dict, *, name: str = "catalog", base_dir: Path | None = None) -> Catalog:
    """Validate a catalog given as a dict; `name` prefixes every error message."""
    if not isinstance(data, dict):
        raise CatalogError(f"{name}: expected a mapping at the top level, got {type(data).__name__}")
    base_dir = base_dir or Path.cwd()
    try:
        expanded = _expand(data, "", base_dir)
    except CatalogError as err:
        raise CatalogError(f"{name}: {err}") from None
    try:
        catalog = Catalog.model_validate(expanded)
    except ValidationError as err:
        lines = []
        for e in err.errors()[:5]:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r:.80})"
            lines.append(f"{name}: {_loc(tuple(e['loc']))}: {e['msg']}{shown}")
        raise CatalogError("\n".join(lines)) from None
    try:
        _validate_detector_options(catalog)
    except CatalogError as err:
        raise CatalogError(f"{name}: {err}") from None
    return catalog


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate catalog.yaml (safe YAML loader); relative paths resolve against its folder."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise CatalogError(f"{path}: catalog file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CatalogError(f"{path.name}: not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise CatalogError(f"{path.name}: not UTF-8 text") from None
    catalog = parse_catalog(data, name=path.name, base_dir=path.parent)
    return catalog.model_copy(update={"path": str(path)})
