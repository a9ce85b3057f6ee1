"""The dataset store: pinned Parquet schemas, atomic writes, manifests, immutable versions, a lock.

A version is `<root>/<dataset>/vNNNN/` with faces-*.parquet, images.parquet, quarantine.parquet and
manifest.json, written last; a version without a manifest does not exist. Any fsspec filesystem works.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2  # 2: candidates, verifier scores, fused labels, AFLW-21 references
MANIFEST = "manifest.json"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
_SCORES_FILE = re.compile(r"^v(\d{4,})-r(\d+)\.parquet$")


def _fixed(n: int) -> pa.DataType:
    return pa.list_(pa.float32(), n)


FEATURE_COLUMNS = (
    "face_px", "yaw_deg", "pitch_deg", "roll_deg", "abs_yaw_deg", "blur",
    "agreement_nme_pct", "flip_nme_pct", "out_of_frame_frac", "landmark_score", "verifier_nme_pct",
)

FACES_SCHEMA = pa.schema(
    [
        pa.field("face_id", pa.string(), nullable=False),  # image_id + ":" + face index
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the image bytes
        pa.field("face_index", pa.int16(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # train | eval (eval sources are never trained on)
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("bbox", _fixed(4), nullable=False),  # l, t, r, b in image pixels
        pa.field("det_score", pa.float32(), nullable=False),
        pa.field("detector", pa.string(), nullable=False),
        pa.field("landmarker", pa.string(), nullable=False),  # the primary landmarker
        pa.field("landmarks", _fixed(136), nullable=False),  # x0, y0, x1, y1, ... image pixels
        pa.field("landmark_scores", _fixed(68), nullable=False),
        pa.field("params_62", _fixed(62)),  # primary's 3DMM params in the crop's frame, if it has them
        # Every candidate label (the primary first, its mirrored-image pass, the other landmarkers), iBUG-68.
        pa.field("alt_landmarks", pa.list_(pa.struct([("name", pa.string()), ("points", _fixed(136))]))),
        pa.field("candidate_nme_pred", pa.list_(pa.float32())),  # the verifier's predicted NME of each candidate
        pa.field("fusion_weights", pa.list_(_fixed(5))),  # per candidate: mean weight in jaw, brows, nose, eyes, mouth
        pa.field("label_source", pa.string()),  # what `landmarks` is: "fused" or the candidate's name
        pa.field("crop", pa.binary(), nullable=False),  # JPEG of the 120x120 aligned crop the trainer reads
        pa.field("crop_affine", _fixed(6), nullable=False),  # image pixels -> crop pixels, 2x3 row-major
        pa.field("pose", _fixed(3), nullable=False),  # yaw, pitch, roll in degrees
        *[pa.field(name, pa.float32(), nullable=False) for name in FEATURE_COLUMNS],
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
        pa.field("reject_reason", pa.string()),
        pa.field("ref_landmarks", _fixed(136)),  # reference labels (AFLW2000-3D .mat layout), if any
        pa.field("ref_params", _fixed(62)),  # reference 3DMM params in the crop's frame
        pa.field("ref_pose", _fixed(3)),
        pa.field("ref_points21", _fixed(42)),  # AFLW's 21 reference points (x0, y0, ...; NaN: not annotated)
        # A trainer round replaced the label (pipeline/rounds.py apply_relabels): which round, and why.
        # Added after schema v2 was pinned, as nullable columns that read as null where a shard predates
        # them (`conform_faces`), not as a schema bump: the plan re-labels every image on a bump.
        pa.field("relabel_round", pa.int32()),
        pa.field("relabel_reason", pa.string()),
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),  # null when the bytes could not be read
        pa.field("source", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stat_key", pa.string(), nullable=False),  # uri|size|mtime: unchanged items are skipped
        pa.field("status", pa.string(), nullable=False),  # ok | quarantined | duplicate
        pa.field("n_faces", pa.int32(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("version", pa.int32(), nullable=False),  # the version that first saw it
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # fetch | decode | detect | label
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("version", pa.int32(), nullable=False),
        # the fault may pass (timeout, 5xx, connection, model error): the next build tries the image
        # again; null in versions written before this column existed (see `quarantine_retryable`)
        pa.field("retryable", pa.bool_()),
    ]
)

# Quarantine reasons that say nothing about the image itself: a transient fetch fault (the fetcher's
# retries ran out: timeouts, HTTP 429/5xx, connection errors, a truncated body; a local read error)
# or a model that failed. The next build lists such items as new, so they are tried again.
RETRYABLE_FETCH_REASONS = frozenset({"fetch failed", "timeout", "read error"})


def quarantine_retryable(stage: str, reason: str) -> bool:
    """Whether a quarantine row's fault is transient (try the image again) or the image's own."""
    return (stage == "fetch" and reason in RETRYABLE_FETCH_REASONS) or (stage == "detect" and reason == "model error")


def conform_quarantine(table: pa.Table) -> pa.Table:
    """A quarantine table in today's schema: tables of older versions get `retryable` from their reasons."""
    if "retryable" not in table.column_names:
        flags = [quarantine_retryable(s, r) for s, r in zip(table.column("stage").to_pylist(),
                                                            table.column("reason").to_pylist())]
        table = table.append_column("retryable", pa.array(flags, pa.bool_()))
    return table.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)


SCORES_SCHEMA = pa.schema(
    [
        pa.field("face_id", pa.string(), nullable=False),
        pa.field("round", pa.int32(), nullable=False),
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("cycle_error", pa.float32(), nullable=False),
        pa.field("critic_score", pa.float32(), nullable=False),
        pa.field("landmark_residual", pa.float32(), nullable=False),
        pa.field("new_weight", pa.float32(), nullable=False),
        # The round's relabelling (trainer/rescore.py), all nullable: older scores files lack them
        # (`conform_scores`), and a chain without a verifier leaves all but the student's points null.
        pa.field("student_landmarks", _fixed(136)),  # the student's points (pass 1), image pixels
        pa.field("student_nme_pred", pa.float32()),  # the verifier's predicted NME of the student's points
        pa.field("label_nme_pred", pa.float32()),  # ... of the face's current label (same crop, same pass)
        # ... of each candidate the round judged: the row's candidates (without earlier students), then the student
        pa.field("candidate_nme_pred", pa.list_(pa.float32())),
        pa.field("relabel_landmarks", _fixed(136)),  # the proposed new label, image pixels; null: no change
        pa.field("relabel_nme_pred", pa.float32()),
        pa.field("relabel_source", pa.string()),  # the new label's label_source, e.g. "fused+student:r1"
        pa.field("relabel_reason", pa.string()),  # e.g. "fused with student:r1: predicted NME 5.10% -> 4.60%"
        pa.field("relabel_fusion_weights", pa.list_(_fixed(5))),  # the new label's per-candidate region weights
    ]
)


def _conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """`table` in `schema`: nullable columns it lacks (written before they existed) read as null."""
    for f in schema:
        if f.name not in table.column_names:
            if not f.nullable:
                raise ValueError(f"{what}: column {f.name!r} is missing")
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


def conform_scores(table: pa.Table) -> pa.Table:
    """A scores table in today's SCORES_SCHEMA (older files lack the relabelling columns)."""
    return _conform(table, SCORES_SCHEMA, "scores table")


def conform_faces(table: pa.Table) -> pa.Table:
    """A faces table in today's FACES_SCHEMA (shards written before `relabel_round` lack it)."""
    return _conform(table, FACES_SCHEMA, "faces table")


# ------------------------------------------------------------------------------------------ paths


@dataclass(frozen=True)
class Store:
    """Where one dataset's versions live."""

    root: str  # output root (path or fsspec URL)
    dataset: str

    def __post_init__(self) -> None:
        if not DATASET_NAME.fullmatch(self.dataset):  # every path is built under <root>/<dataset>
            raise ValueError(f"dataset name {self.dataset!r} would leave the output root")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.root)[0]

    @property
    def dir(self) -> str:
        return fsspec.core.url_to_fs(self.root)[1].rstrip("/") + "/" + self.dataset

    def version_dir(self, version: int) -> str:
        return f"{self.dir}/v{version:04d}"

    def version_dirs(self) -> dict[int, str]:
        """Every version folder, committed or not (a crashed commit has no manifest), by version."""
        fs = self.fs
        if not fs.exists(self.dir):
            return {}
        found = {}
        for path in fs.ls(self.dir, detail=False):
            match = _VERSION_DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match:
                found[int(match.group(1))] = path.rstrip("/")
        return dict(sorted(found.items()))

    def staging_dir(self, key: str) -> str:
        return f"{self.dir}/_staging/{key}"

    def staging_dirs(self) -> dict[str, str]:
        """Every build's staging folder, by its key."""
        root = self.staging_dir("").rstrip("/")
        if not self.fs.exists(root):
            return {}
        return {p.rstrip("/").rsplit("/", 1)[-1]: p.rstrip("/") for p in self.fs.ls(root, detail=False)}

    # A trainer round's scores live beside the versions, not inside one (versions are immutable once
    # committed): <dataset>/scores/vNNNN-rNN.parquet. Its training state: <dataset>/rounds/vNNNN/.

    def scores_path(self, version: int, round_index: int) -> str:
        return f"{self.dir}/scores/v{version:04d}-r{round_index:02d}.parquet"

    def list_scores(self, version: int) -> list[str]:
        """The scores files trainer rounds wrote for `version`, by round."""
        folder = f"{self.dir}/scores"
        if not self.fs.exists(folder):
            return []
        found = []
        for path in self.fs.ls(folder, detail=False):
            match = _SCORES_FILE.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match and int(match.group(1)) == version:
                found.append((int(match.group(2)), path))
        return [path for _, path in sorted(found)]

    @staticmethod
    def scores_version(path: str) -> int | None:
        """The version a scores file was written for, from its name (`vNNNN-rNN.parquet`), if it says."""
        match = _SCORES_FILE.match(str(path).rstrip("/").rsplit("/", 1)[-1])
        return int(match.group(1)) if match else None

    def round_dir(self, version: int) -> str:
        """A trainer round's state on `version`: checkpoints, done.json, eval.json, its lock."""
        return f"{self.dir}/rounds/v{version:04d}"

    def round_versions(self) -> list[int]:
        """Versions with a round folder, ascending."""
        folder = f"{self.dir}/rounds"
        if not self.fs.exists(folder):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
        return sorted(int(m.group(1)) for m in map(_VERSION_DIR.match, names) if m)


DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'faces@v3' or 'faces@3' -> ('faces', 3); 'faces' -> ('faces', None) meaning the latest."""
    name, _, version = ref.partition("@")
    if name and not DATASET_NAME.fullmatch(name):  # a name is a folder under the root: no '/', no '..'
        raise ValueError(f"{ref!r}: dataset names are letters, digits, '_', '.', '-' (not starting with '.')")
    if not version:
        return name, None
    digits = version.lstrip("vV")
    if not digits.isdigit():
        raise ValueError(f"{ref!r}: expected NAME@vN, e.g. faces@v3")
    return name, int(digits)


def list_versions(store: Store) -> list[int]:
    """Committed versions (those with a manifest), ascending."""
    return [v for v, path in store.version_dirs().items() if store.fs.exists(f"{path}/{MANIFEST}")]


def latest_version(store: Store) -> int | None:
    versions = list_versions(store)
    return versions[-1] if versions else None


def resolve_version(store: Store, version: int | None) -> int:
    versions = list_versions(store)
    if not versions:
        raise FileNotFoundError(f"dataset {store.dataset!r} has no versions under {store.root}")
    if version is None:
        return versions[-1]
    if version not in versions:
        raise FileNotFoundError(f"{store.dataset}@v{version} does not exist (versions: {versions})")
    return version


# ---------------------------------------------------------------------------------------- writing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write to a temp name beside `path`, then rename: readers see the whole file or none."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=4096)
    return sink.getvalue()


def write_table(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> dict:
    """Write `table` atomically; returns its manifest entry (file name, rows, bytes, sha256)."""
    data = table_bytes(table)
    write_atomic(fs, path, data)
    return {"file": path.rsplit("/", 1)[-1], "rows": table.num_rows, "bytes": len(data), "sha256": sha256_bytes(data)}


def link_or_copy(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Immutable files are shared between versions by hard link where the filesystem allows."""
    if getattr(fs, "protocol", None) in ("file", ("file", "local"), "local") or fs.__class__.__name__ == "LocalFileSystem":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    fs.copy(src, dst)


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


# ---------------------------------------------------------------------------------------- reading


def read_manifest(store: Store, version: int) -> dict:
    with store.fs.open(f"{store.version_dir(version)}/{MANIFEST}", "rb") as f:
        return json.loads(f.read())


def read_faces(store: Store, version: int | None = None, columns: list[str] | None = None,
               filters=None) -> pa.Table:
    """All face rows of a version (the latest by default) as one Arrow table."""
    version = resolve_version(store, version)
    manifest = read_manifest(store, version)
    vdir = store.version_dir(version)
    tables = []
    for shard in manifest["shards"]:
        with store.fs.open(f"{vdir}/{shard['file']}", "rb") as f:
            tables.append(_read_shard(f, columns, filters))
    if not tables:
        schema = FACES_SCHEMA if columns is None else pa.schema([FACES_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    # Shards linked from a parent may predate a nullable column: the union, missing values null.
    return pa.concat_tables(tables, promote_options="default")


def _read_shard(f, columns: list[str] | None, filters) -> pa.Table:
    """One shard; asked-for FACES_SCHEMA columns the shard predates come back as nulls."""
    if columns is None:
        return pq.read_table(f, filters=filters)
    names = set(pq.ParquetFile(f).schema_arrow.names)
    f.seek(0)
    absent = [c for c in columns if c not in names and c in FACES_SCHEMA.names and FACES_SCHEMA.field(c).nullable]
    table = pq.read_table(f, columns=[c for c in columns if c not in absent], filters=filters)  # others: its error
    for c in absent:
        table = table.append_column(FACES_SCHEMA.field(c), pa.nulls(table.num_rows, FACES_SCHEMA.field(c).type))
    return table.select(columns)


def faces_schema(store: Store, version: int | None = None) -> pa.Schema:
    """The schema a version's face shards were written with (older versions lack newer columns)."""
    version = resolve_version(store, version)
    manifest = read_manifest(store, version)
    if not manifest["shards"]:
        return FACES_SCHEMA
    with store.fs.open(f"{store.version_dir(version)}/{manifest['shards'][0]['file']}", "rb") as f:
        return pq.read_schema(f)


def iter_face_batches(store: Store, version: int, columns: list[str] | None = None,
                      batch_size: int = 256) -> Iterable[pa.RecordBatch]:
    """Stream a version's faces shard by shard (the trainer and rescoring never load it whole)."""
    manifest = read_manifest(store, version)
    vdir = store.version_dir(version)
    for shard in manifest["shards"]:
        with store.fs.open(f"{vdir}/{shard['file']}", "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def read_side_table(store: Store, version: int, name: str) -> pa.Table:
    """images | quarantine | scores of a version."""
    return read_table_file(store.fs, f"{store.version_dir(version)}/{name}.parquet")


# ------------------------------------------------------------------------------------------- lock


class LockedError(RuntimeError):
    pass


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


class DatasetLock:
    """One writer per dataset: an exclusive lock file holding host and pid; stale locks are taken over."""

    def __init__(self, store: Store, wait_s: float = 0.0, name: str = ".lock", folder: str | None = None):
        # `folder` (a store path, e.g. a round's folder) gives other exclusive jobs on the dataset their
        # own lock: a training round per version.
        self.store = store
        self.path = f"{folder or store.dir}/{name}"
        self.wait_s = wait_s
        self._held = False

    def _owner(self) -> dict | None:
        try:
            with self.store.fs.open(self.path, "rb") as f:
                return json.loads(f.read() or b"{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _stale(self, owner: dict | None) -> bool:
        if not owner or owner.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(owner["pid"]), 0)
            return False
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False

    def _create_exclusive(self, data: bytes) -> None:
        if _is_local(self.store.fs):
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        # Object stores have no exclusive create: check-then-write is best effort there; run one
        # builder per dataset on such roots (a Prefect deployment's concurrency limit does that).
        if self.store.fs.exists(self.path):
            raise FileExistsError(self.path)
        write_atomic(self.store.fs, self.path, data)

    def acquire(self) -> DatasetLock:
        fs = self.store.fs
        fs.makedirs(self.store.dir, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}).encode()
        while True:
            try:
                self._create_exclusive(me)
                self._held = True
                return self
            except FileExistsError:
                owner = self._owner()
                if self._stale(owner):
                    self.store.fs.rm(self.path)
                    continue
                if time.monotonic() >= deadline:
                    raise LockedError(
                        f"dataset {self.store.dataset!r} is locked ({self.path}) by another process "
                        f"({owner}); wait for it, or remove {self.path} if that process is gone"
                    ) from None
                time.sleep(0.5)

    def release(self) -> None:
        if self._held:
            try:
                self.store.fs.rm(self.path)
            except FileNotFoundError:
                pass
            self._held = False

    def __enter__(self) -> DatasetLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_table_file(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    """One Parquet file (a shard, a side table, a trainer round's scores) as an Arrow table."""
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such table: {path}") from None
