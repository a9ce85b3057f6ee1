"""Build a dataset version: plan (what is new), process batches (resumable), commit (atomic).

Each step is a plain function; an executor (in-process `build`, or the Prefect flow on dask) maps
`process_batch` over the plan's batches. Finished batches leave a marker, so a killed build resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import shards
from pipeline.catalog import Catalog, UrlListSource
from pipeline.crops import match_reference
from pipeline.decode import DecodeError
from pipeline.device_images import image_hw
from pipeline.gpu_decode import decode_batch, decode_device
from pipeline.labeling import LabelledFace, get_chain, label_images
from pipeline.quality import apply_rules, face_features
from pipeline.shards import (FACES_SCHEMA, FEATURE_COLUMNS, IMAGES_SCHEMA, QUARANTINE_SCHEMA, Store,
                             link_or_copy, read_table_file, write_atomic, write_table)
from pipeline.sources import FetchError, SourceItem, TarReader, fetch_url, list_items, read_file
from pipeline.weights import ModelError

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- plan


@dataclass
class Batch:
    key: str  # content key of the batch: same items + same parent + same chain -> same key
    items: list[SourceItem]


@dataclass
class BuildPlan:
    dataset: str
    parent: int | None
    listed: int  # items the sources offer now
    unchanged: int  # items already in the parent's ledger (not read again)
    batches: list[Batch]
    rules_changed: bool
    staging_key: str
    # uris the parent quarantined for a transient fault (timeout, 5xx, model error) and listed again:
    # planned as new, and their old ledger and quarantine rows are replaced at commit
    retry_uris: frozenset[str] = frozenset()
    # the detector chain differs from the parent's: every listed item is labelled again and the new
    # version holds only the new labels (`chain_change` says what changed)
    relabel: bool = False
    chain_change: str = ""

    @property
    def new_items(self) -> int:
        return sum(len(b.items) for b in self.batches)

    @property
    def nothing_to_do(self) -> bool:
        return not self.batches and not self.rules_changed and not self.relabel and self.parent is not None


def store_of(catalog: Catalog) -> Store:
    return Store(catalog.output_root, catalog.dataset)


def store_for_ref(catalog: Catalog, ref: str | None) -> tuple[Store, int | None]:
    """'NAME@vN', 'NAME' or None (the catalog's dataset) -> its store under the catalog's output root
    and the version asked for (None: the latest)."""
    name, version = shards.parse_ref(ref) if ref else (None, None)
    return Store(catalog.output_root, name or catalog.dataset), version


def _chain_hash(catalog: Catalog) -> str:
    return hashlib.sha256(json.dumps(catalog.detectors.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def chain_identity(catalog: Catalog) -> list[dict]:
    """The manifest's `detectors`: role, name, weights path and the sha256 the weights are checked against."""
    from pipeline.weights import KNOWN_SHA256

    chain = get_chain(catalog.detectors)
    out = [dict(d, weights_sha256=(s.sha256 or KNOWN_SHA256.get(str(d["weights"]).rsplit("/", 1)[-1])))
           for d, s in zip(chain.identity(), [catalog.detectors.face, *catalog.detectors.landmarkers])]
    if catalog.detectors.verifier is not None:  # its weights decide the labels as much as a landmarker's
        from pipeline.verifier import SHIPPED_WEIGHTS
        from pipeline.weights import sha256_file

        spec = catalog.detectors.verifier
        path = spec.weights or SHIPPED_WEIGHTS
        out.append({"role": "verifier", "name": "verifier", "weights": str(path),
                    "weights_sha256": sha256_file(path) if Path(path).is_file() else None,
                    "fuse": spec.fuse, "tau_pct": spec.tau_pct})
    return out


def chain_change(old: list[dict] | None, new: list[dict]) -> str:
    """'' when two manifests' detector chains label alike (same models, same weight digests; a moved
    weights folder is no change), else what differs, e.g. 'tddfa_mb05 weights: f93ed7f1c4c0 -> 0a1b2c3d4e5f'."""
    if old is None:
        return ""

    def key(d):  # the digest identifies the weights; the path only where no digest is known
        return (d.get("role"), d.get("name"), d.get("weights_sha256") or d.get("weights"), d.get("fuse"),
                d.get("tau_pct"))

    if [key(d) for d in old] == [key(d) for d in new]:
        return ""
    changes = []
    for a, b in zip(old, new):
        if (a.get("role"), a.get("name")) != (b.get("role"), b.get("name")):
            changes.append(f"{a.get('role')} {a.get('name')} -> {b.get('name')}")
        elif key(a) != key(b):
            short = lambda d: str(d.get("weights_sha256") or d.get("weights"))[:12]  # noqa: E731
            changes.append(f"{b.get('name')} weights: {short(a)} -> {short(b)}")
    if len(old) != len(new):
        changes.append(f"landmarkers: {[d.get('name') for d in old[1:]]} -> {[d.get('name') for d in new[1:]]}")
    return "; ".join(changes)


def plan_build(catalog: Catalog) -> BuildPlan:
    """List every source; what the parent's ledger already holds is skipped without reading it.

    Items the parent quarantined for a transient fault are planned again. When the detector chain
    differs from the parent's (another model or other weights), every item is planned again.
    """
    store = store_of(catalog)
    parent = shards.latest_version(store)
    known: set[str] = set()
    retry: set[str] = set()
    rules_changed, change = False, ""
    if parent is not None:
        manifest = shards.read_manifest(store, parent)
        rules_changed = manifest.get("rules_hash") != catalog.rules_hash()
        change = chain_change(manifest.get("detectors"), chain_identity(catalog))
        if not change and manifest.get("schema_version") != shards.SCHEMA_VERSION:
            change = f"shard schema v{manifest.get('schema_version')} -> v{shards.SCHEMA_VERSION}"
        if change:
            log.warning("%s: detector chain changed since v%d (%s): re-labelling every listed image into the "
                        "next version, which holds only the new labels (v%d stays as it was)",
                        catalog.dataset, parent, change, parent)
        else:
            quarantine = shards.conform_quarantine(shards.read_side_table(store, parent, "quarantine"))
            retry = {u for u, r in zip(quarantine.column("uri").to_pylist(),
                                       quarantine.column("retryable").to_pylist()) if r}
            images = shards.read_side_table(store, parent, "images")
            known = {k for k, u, st in zip(images.column("stat_key").to_pylist(), images.column("uri").to_pylist(),
                                           images.column("status").to_pylist())
                     if not (st == "quarantined" and u in retry)}
    fresh: list[SourceItem] = []
    retried: set[str] = set()
    listed = 0
    for source in catalog.sources:
        for item in list_items(source):
            listed += 1
            if item.stat_key not in known:
                fresh.append(item)
                if item.uri in retry:
                    retried.add(item.uri)
    if retried:
        log.info("%s: trying %d images again that v%d quarantined for a transient fault",
                 catalog.dataset, len(retried), parent)
    size = catalog.execution.batch_images
    chain = _chain_hash(catalog)
    batches = []
    for start in range(0, len(fresh), size):
        items = fresh[start : start + size]
        digest = hashlib.sha256(f"{parent}|{chain}|{catalog.limits.model_dump_json()}".encode())
        for item in items:
            digest.update(item.stat_key.encode() + b"\n")
        batches.append(Batch(digest.hexdigest()[:20], items))
    return BuildPlan(catalog.dataset, parent, listed, listed - len(fresh), batches, rules_changed,
                     staging_key=f"p{parent or 0:04d}-{chain[:12]}", retry_uris=frozenset(retried),
                     relabel=bool(change), chain_change=change)


# ------------------------------------------------------------------------------------------- batch


@dataclass
class BatchResult:
    key: str
    faces_file: str | None
    images_file: str
    quarantine_file: str
    counts: dict = field(default_factory=dict)


def _read_bytes(item: SourceItem, catalog: Catalog, tars: TarReader) -> bytes:
    source = catalog.source(item.source)
    if isinstance(source, UrlListSource):
        return fetch_url(item.uri, timeout_s=source.timeout_s, retries=source.retries,
                         backoff_s=source.backoff_s, max_bytes=source.max_bytes)
    if "#" in item.uri and source.kind == "tar":
        return tars.read(item, source.max_bytes)
    return read_file(item, source.max_bytes)


def _sibling(item: SourceItem, suffix: str) -> SourceItem:
    base, sep, member = item.uri.partition("#")
    if sep:
        return SourceItem(item.source, f"{base}#{str(PurePosixPath(member).with_suffix(suffix))}", None, None)
    return SourceItem(item.source, str(PurePosixPath(base).with_suffix(suffix)) if "://" not in base
                      else base.rsplit(".", 1)[0] + suffix, None, None)


def _reference(item: SourceItem, catalog: Catalog, tars: TarReader, height: int):
    """The source's reference label for this image, or (None, reason) when it has none / a bad one."""
    import io

    from pipeline.references import BadReference, load_mat_reference

    try:
        data = _read_bytes(_sibling(item, ".mat"), catalog, tars)
    except FetchError as err:
        return None, f"reference missing: {err}"
    try:
        return load_mat_reference(io.BytesIO(data), image_height=height), None
    except BadReference as err:
        return None, str(err)


def _aflw21_reference(item: SourceItem, source) -> tuple[np.ndarray, float] | None:
    """The image's AFLW-21 reference points (by file stem) from the source's `labels_file`, if it has them."""
    from pipeline.references import load_aflw21

    stem = PurePosixPath(item.uri.rsplit("#", 1)[-1]).stem
    return load_aflw21(str(source.labels_file)).get(stem)


def _face_row(face: LabelledFace, *, image_id: str, item: SourceItem, split: str, width: int, height: int,
              detector: str, landmarker: str, ref=None) -> dict:
    p = face.primary
    features = face_features(
        bbox=face.box.bbox, det_score=face.box.score, pose_deg=p.pose_deg, points=p.points,
        point_scores=p.scores, alt_points=[a.points for _, a in face.alts], flip_points=face.flip_points,
        crop_rgb=face.crop_rgb, width=width, height=height,
    )
    row = {
        "face_id": f"{image_id}:{face.face_index}",
        "image_id": image_id,
        "face_index": face.face_index,
        "source": item.source,
        "split": split,
        "uri": item.uri,
        "width": width,
        "height": height,
        "bbox": face.box.bbox.astype(np.float32).tolist(),
        "det_score": float(face.box.score),
        "detector": detector,
        "landmarker": landmarker,
        "landmarks": face.label.astype(np.float32).reshape(-1).tolist(),
        "landmark_scores": p.scores.astype(np.float32).tolist(),
        "params_62": None if p.params_62 is None else p.params_62.astype(np.float32).tolist(),
        "alt_landmarks": [{"name": n, "points": pts.astype(np.float32).reshape(-1).tolist()}
                          for n, pts in face.candidates],
        "candidate_nme_pred": None if face.candidate_nme_pred is None else face.candidate_nme_pred.tolist(),
        "fusion_weights": None if face.fusion_weights is None else face.fusion_weights.tolist(),
        "label_source": face.label_source,
        "crop": face.crop_jpeg,
        "crop_affine": face.affine.tolist(),
        "pose": [features["yaw_deg"], features["pitch_deg"], features["roll_deg"]],
        **{name: features[name] for name in FEATURE_COLUMNS if name in features},
        "verifier_nme_pct": face.label_nme_pred,
        "ref_landmarks": None,
        "ref_params": None,
        "ref_pose": None,
        "ref_points21": None,
    }
    if ref is not None:
        from pipeline.references import params_image_to_crop

        row["ref_landmarks"] = ref.landmarks_68.astype(np.float32).reshape(-1).tolist()
        row["ref_params"] = params_image_to_crop(ref.params_62, face.roi, height).astype(np.float32).tolist()
        row["ref_pose"] = np.asarray(ref.yaw_pitch_roll_deg, dtype=np.float32).tolist()
    return row


def _faces_table(rows: list[dict], catalog: Catalog) -> pa.Table:
    if not rows:
        return FACES_SCHEMA.empty_table()
    decided = apply_rules(pd.DataFrame([{c: r[c] for c in ("det_score",) + FEATURE_COLUMNS} for r in rows]),
                          catalog.rules)
    for row, (_, d) in zip(rows, decided.iterrows()):
        row["keep"], row["weight"], row["reject_reason"] = bool(d.keep), float(d.weight), d.reject_reason
    return pa.Table.from_pylist(rows, schema=FACES_SCHEMA)


def process_batch(catalog: Catalog, plan_staging_key: str, batch: Batch) -> BatchResult:
    """Read, hash, decode, label and score one batch; write its three part files and a done marker.

    Idempotent: a batch whose marker exists returns the recorded result without work.
    """
    store = store_of(catalog)
    fs = store.fs
    staging = store.staging_dir(plan_staging_key)
    marker = f"{staging}/{batch.key}.done.json"
    if fs.exists(marker):
        with fs.open(marker, "rb") as f:
            return BatchResult(**json.loads(f.read()))

    chain = get_chain(catalog.detectors)
    tars = TarReader()
    images_rows, quarantine_rows, face_rows = [], [], []
    counts = Counter()

    def quarantine(item: SourceItem, stage: str, reason: str, detail: str, image_id: str | None = None):
        quarantine_rows.append({"uri": item.uri, "source": item.source, "image_id": image_id, "stage": stage,
                                "reason": reason, "detail": detail[:500], "version": 0,
                                "retryable": shards.quarantine_retryable(stage, reason)})
        images_rows.append({"image_id": image_id, "source": item.source, "uri": item.uri, "stat_key": item.stat_key,
                            "status": "quarantined", "n_faces": 0, "width": None, "height": None, "version": 0})
        counts[f"quarantined:{stage}"] += 1

    try:
        read: list[tuple[SourceItem, str, bytes]] = []
        seen_ids: set[str] = set()
        for item in batch.items:
            counts["read"] += 1
            try:
                data = _read_bytes(item, catalog, tars)
            except FetchError as err:
                quarantine(item, "fetch", err.reason, err.detail)
                continue
            image_id = hashlib.sha256(data).hexdigest()
            if image_id in seen_ids:
                images_rows.append({"image_id": image_id, "source": item.source, "uri": item.uri,
                                    "stat_key": item.stat_key, "status": "duplicate", "n_faces": 0,
                                    "width": None, "height": None, "version": 0})
                counts["duplicate"] += 1
                continue
            seen_ids.add(image_id)
            read.append((item, image_id, data))

        # One decode call for the batch: nvJPEG on the GPU path, the CPU decoder otherwise.
        decoded: list[tuple[SourceItem, str, object]] = []
        images = decode_batch([data for _, _, data in read], device=decode_device(catalog),
                              max_pixels=catalog.limits.max_pixels, min_side_px=catalog.limits.min_side_px)
        for (item, image_id, _), image in zip(read, images):
            if isinstance(image, DecodeError):
                quarantine(item, "decode", image.reason, image.detail, image_id)
                continue
            counts["decoded"] += 1
            decoded.append((item, image_id, image))

        labelled = _label_isolating_failures(chain, catalog, decoded, quarantine)
        face_name = catalog.detectors.face.name
        primary_name = catalog.detectors.landmarkers[0].name
        for (item, image_id, rgb), faces in labelled:
            source = catalog.source(item.source)
            height, width = image_hw(rgb)
            ref, ref_match = None, -1
            if source.labels == "mat":
                ref, problem = _reference(item, catalog, tars, height)
                if ref is None:
                    log.warning("%s: %s", item.uri, problem)
                    counts["reference_problems"] += 1
                elif faces:
                    matched = match_reference([f.box.bbox for f in faces], ref.landmarks_68)
                    ref_match = -1 if matched is None else matched
            ref21 = _aflw21_reference(item, source) if source.labels == "aflw21" else None
            for face in faces:
                row = _face_row(
                    face, image_id=image_id, item=item, split=source.split, width=width, height=height,
                    detector="full-crop" if source.pre_cropped else face_name, landmarker=primary_name,
                    ref=ref if face.face_index == ref_match else None)
                if ref21 is not None and face.face_index == 0:  # a pre-cropped image is one face
                    row["ref_points21"] = ref21[0].reshape(-1).tolist()
                    row["ref_pose"] = [ref21[1], float("nan"), float("nan")]
                face_rows.append(row)
            images_rows.append({"image_id": image_id, "source": item.source, "uri": item.uri,
                                "stat_key": item.stat_key, "status": "ok", "n_faces": len(faces),
                                "width": width, "height": height, "version": 0})
            counts["faces"] += len(faces)
            counts["no_face"] += int(not faces)
    finally:
        tars.close()

    faces_table = _faces_table(face_rows, catalog)
    faces_file = None
    if faces_table.num_rows:
        faces_file = f"faces-{batch.key}.parquet"
        write_table(fs, f"{staging}/{faces_file}", faces_table)
    images_file, quarantine_file = f"images-{batch.key}.parquet", f"quarantine-{batch.key}.parquet"
    write_table(fs, f"{staging}/{images_file}", pa.Table.from_pylist(images_rows, schema=IMAGES_SCHEMA))
    write_table(fs, f"{staging}/{quarantine_file}", pa.Table.from_pylist(quarantine_rows, schema=QUARANTINE_SCHEMA))
    result = BatchResult(batch.key, faces_file, images_file, quarantine_file, dict(counts))
    write_atomic(fs, marker, json.dumps(result.__dict__).encode())  # last: the batch is done
    return result


def _label_isolating_failures(chain, catalog, decoded, quarantine):
    """Label all images in one batched call; if a model fails on the batch, retry image by image so
    one bad image is quarantined (stage 'detect', retried by the next build) instead of failing the
    whole batch. A model that fails on every image of a batch (two or more) is the model's fault, not
    the images': ModelError, and nothing of the batch is quarantined."""
    if not decoded:
        return []
    pre = [catalog.source(item.source).pre_cropped for item, _, _ in decoded]
    try:
        faces = label_images(chain, [rgb for _, _, rgb in decoded], pre)
        return list(zip(decoded, faces))
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - isolate, then report per image below
        log.warning("batch labelling failed (%s); retrying image by image", err)
    out, failed = [], []
    for entry, is_pre in zip(decoded, pre):
        try:
            out.append((entry, label_images(chain, [entry[2]], [is_pre])[0]))
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001
            failed.append((entry, err))
    if len(failed) >= 2 and not out:
        entry, err = failed[0]
        raise ModelError(
            f"the detector chain failed on every one of {len(failed)} decoded images of a batch "
            f"(first: {entry[0].uri}: {type(err).__name__}: {err}); this is a model or configuration fault, "
            f"not the images': check `detectors` in {catalog.path}") from err
    for entry, err in failed:
        quarantine(entry[0], "detect", "model error", f"{type(err).__name__}: {err}", entry[1])
    return out


def check_models(catalog: Catalog) -> None:
    """Load every model of the chain the sources need (weights found, sha256 checked, loaded) before
    the first batch, so a misconfigured model stops the build instead of quarantining its images.
    Raises ModelError naming the detector and its file."""
    chain = get_chain(catalog.detectors)
    specs = [("landmarker", s) for s in catalog.detectors.landmarkers]
    if any(not getattr(s, "pre_cropped", False) for s in catalog.sources):
        specs.insert(0, ("face detector", catalog.detectors.face))
    if catalog.detectors.verifier is not None:
        specs.append(("verifier", catalog.detectors.verifier))
    try:
        chain.landmarkers
        if specs[0][0] == "face detector":
            chain.face_detector
        chain.verifier  # None when the chain has none
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - any load failure is reported with the model it came from
        named = ", ".join(f"{role} {getattr(s, 'name', role)!r} ({s.weights})" for role, s in specs)
        raise ModelError(f"{catalog.path}: detectors: a model could not be loaded: {type(err).__name__}: {err} "
                         f"[the chain: {named}]; fix the path or sha256 in the catalog (nothing was built)") from err


# ------------------------------------------------------------------------------------------ commit


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _with_version(table: pa.Table, version: int) -> pa.Table:
    col = table.schema.get_field_index("version")
    return table.set_column(col, "version", pa.array([version] * table.num_rows, pa.int32()))


def _reapply_rules(faces: pa.Table, catalog: Catalog) -> pa.Table:
    decided = apply_rules(faces.select(["det_score", *FEATURE_COLUMNS]).to_pandas(), catalog.rules)
    for name, values in (("keep", pa.array(decided["keep"].to_numpy(), pa.bool_())),
                         ("weight", pa.array(decided["weight"].to_numpy(), pa.float32())),
                         ("reject_reason", pa.array(decided["reject_reason"].tolist(), pa.string()))):
        faces = faces.set_column(faces.schema.get_field_index(name), name, values)
    return faces


def _round_in_effect(store: Store, version: int) -> tuple[int | None, pa.Table | None]:
    """The trainer round whose weights `version`'s faces carry: the scores table folded by it or by its
    nearest ancestor (versions that only add images or change rules keep the folded weights), or
    (None, None). A re-labelled version carries no round."""
    while version is not None:
        manifest = shards.read_manifest(store, version)
        if "scores" in manifest.get("tables", {}):
            return version, read_table_file(store.fs, f"{store.version_dir(version)}/scores.parquet")
        if manifest.get("relabelled"):
            return None, None
        version = manifest.get("parent")
    return None, None


def summarize_counts(images: pa.Table, quarantine: pa.Table, faces_keep: list[bool],
                     reasons: list[str | None]) -> dict:
    status = Counter(images.column("status").to_pylist())
    n_faces = images.column("n_faces").to_pylist()
    ok = [n for n, s in zip(n_faces, images.column("status").to_pylist()) if s == "ok"]
    return {
        "images_seen": images.num_rows,
        "images_decoded": status.get("ok", 0),
        "images_quarantined": status.get("quarantined", 0),
        "images_duplicate": status.get("duplicate", 0),
        "images_with_faces": sum(1 for n in ok if n > 0),
        "images_without_faces": sum(1 for n in ok if n == 0),
        "faces": len(faces_keep),
        "faces_kept": int(sum(faces_keep)),
        "faces_dropped": len(faces_keep) - int(sum(faces_keep)),
        "drop_reasons": dict(Counter(r.split(" ")[0] for r in reasons if r)),
        "quarantine_reasons": dict(Counter(quarantine.column("reason").to_pylist())),
    }


def commit_version(catalog: Catalog, plan: BuildPlan, results: Iterable[BatchResult],
                   *, scores: pa.Table | None = None, note: str = "") -> int:
    """Assemble a new immutable version from the parent and the batch parts; manifest written last.

    Caller holds the DatasetLock. Faces of images the parent (or an earlier batch) already has are
    dropped here, so each image's faces appear exactly once whatever order batches finished in.
    Items read again (a retried or changed file) replace the parent's quarantine rows for their uri.
    Returns the new version, or the parent when the build only retried quarantined items that all
    failed again (nothing new to hold).
    """
    store = store_of(catalog)
    fs = store.fs
    latest = shards.latest_version(store)
    if latest != plan.parent:
        raise RuntimeError(f"{catalog.dataset}: v{latest} landed after this build was planned on v{plan.parent}; rerun")
    staging = store.staging_dir(plan.staging_key)
    results = sorted(results, key=lambda r: r.key)
    batch_images = [read_table_file(fs, f"{staging}/{r.images_file}") for r in results]
    redone = {u for t in batch_images for u in t.column("uri").to_pylist()}  # items read by this build
    if (plan.parent is not None and not plan.relabel and not plan.rules_changed and scores is None
            and redone <= plan.retry_uris
            and all(st == "quarantined" for t in batch_images for st in t.column("status").to_pylist())):
        # Only retries, and every one failed again: a new version would hold nothing new.
        log.info("%s: %d quarantined items tried again, all still failing: v%d stays the latest",
                 catalog.dataset, len(redone), plan.parent)
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        return plan.parent
    version = (latest or 0) + 1
    vdir = store.version_dir(version)
    if fs.exists(vdir):  # a crashed commit: no manifest, so it never existed; start it over
        fs.rm(vdir, recursive=True)
    fs.makedirs(vdir, exist_ok=True)

    shard_entries: list[dict] = []
    images_parts, quarantine_parts = [], []
    keep_all: list[bool] = []
    reasons_all: list[str | None] = []
    seen_ids: set[str] = set()

    round_from = None
    if plan.parent is not None and not plan.relabel:  # a re-labelled version starts afresh
        pdir = store.version_dir(plan.parent)
        parent_manifest = shards.read_manifest(store, plan.parent)
        images = read_table_file(fs, f"{pdir}/images.parquet")
        quarantine = shards.conform_quarantine(read_table_file(fs, f"{pdir}/quarantine.parquet"))
        if redone:  # read again by this build (a retry, a fixed file): the batches' rows replace these
            retried = pa.array(sorted(redone), pa.string())
            images = images.filter(pa.compute.invert(pa.compute.and_(
                pa.compute.equal(images.column("status"), "quarantined"),
                pa.compute.is_in(images.column("uri"), value_set=retried))))
            quarantine = quarantine.filter(pa.compute.invert(
                pa.compute.is_in(quarantine.column("uri"), value_set=retried)))
        images_parts.append(images)
        quarantine_parts.append(quarantine)
        seen_ids.update(x for x in images.column("image_id").to_pylist() if x)
        rewrite = plan.rules_changed or scores is not None
        fold = scores
        if rewrite and scores is None:  # rules re-decided: the round folded earlier keeps its factor
            round_from, fold = _round_in_effect(store, plan.parent)
        for i, entry in enumerate(parent_manifest["shards"]):
            src = f"{pdir}/{entry['file']}"
            if rewrite:
                table = _reapply_rules(read_table_file(fs, src), catalog)
                if fold is not None:
                    from pipeline.rounds import fold_scores

                    table = fold_scores(table, fold)
                name = f"faces-v{version:04d}-{i:05d}.parquet"
                shard_entries.append(write_table(fs, f"{vdir}/{name}", table))
            else:
                link_or_copy(fs, src, f"{vdir}/{entry['file']}")
                table = read_table_file(fs, src).select(["keep", "reject_reason"])
                shard_entries.append(dict(entry))
            keep_all += table.column("keep").to_pylist()
            reasons_all += table.column("reject_reason").to_pylist()

    for result, images in zip(results, batch_images):
        fresh_ids = set()
        status = images.column("status").to_pylist()
        ids = images.column("image_id").to_pylist()
        for i, (image_id, st) in enumerate(zip(ids, status)):
            if st == "ok" and image_id in seen_ids:
                status[i] = "duplicate"  # seen in the parent or an earlier batch: its faces are there
            elif image_id:
                fresh_ids.add(image_id)
        images = images.set_column(images.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
        images_parts.append(_with_version(images, version))
        quarantine_parts.append(shards.conform_quarantine(
            _with_version(read_table_file(fs, f"{staging}/{result.quarantine_file}"), version)))
        if result.faces_file:
            faces = read_table_file(fs, f"{staging}/{result.faces_file}")
            dup = pa.array([i in seen_ids for i in faces.column("image_id").to_pylist()])
            if any(dup.to_pylist()):
                faces = faces.filter(pa.compute.invert(dup))
                shard_entries.append(write_table(fs, f"{vdir}/{result.faces_file}", faces))
            else:
                link_or_copy(fs, f"{staging}/{result.faces_file}", f"{vdir}/{result.faces_file}")
                with fs.open(f"{vdir}/{result.faces_file}", "rb") as f:
                    data = f.read()
                shard_entries.append({"file": result.faces_file, "rows": faces.num_rows, "bytes": len(data),
                                      "sha256": shards.sha256_bytes(data)})
            keep_all += faces.column("keep").to_pylist()
            reasons_all += faces.column("reject_reason").to_pylist()
        seen_ids |= fresh_ids

    images_all = pa.concat_tables(images_parts) if images_parts else IMAGES_SCHEMA.empty_table()
    quarantine_all = pa.concat_tables(quarantine_parts) if quarantine_parts else QUARANTINE_SCHEMA.empty_table()
    side = {"images": write_table(fs, f"{vdir}/images.parquet", images_all),
            "quarantine": write_table(fs, f"{vdir}/quarantine.parquet", quarantine_all)}
    if scores is not None:
        side["scores"] = write_table(fs, f"{vdir}/scores.parquet", scores)
    manifest = {
        "schema_version": shards.SCHEMA_VERSION,
        "dataset": catalog.dataset,
        "version": version,
        "parent": plan.parent,
        "created_at": _now(),
        "note": note,
        "catalog_path": catalog.path,
        "catalog_hash": catalog.content_hash(),
        "rules_hash": catalog.rules_hash(),
        "detectors": chain_identity(catalog),
        "counts": {**summarize_counts(images_all, quarantine_all, keep_all, reasons_all),
                   "images_new": plan.new_items, "images_unchanged": plan.unchanged},
        "shards": shard_entries,
        "tables": side,
    }
    if plan.relabel:
        manifest["relabelled"] = plan.chain_change  # the parent's faces are not carried over
    if round_from is not None:
        manifest["round_weights_from"] = round_from  # the version whose folded scores.parquet was re-applied
    write_atomic(fs, f"{vdir}/{shards.MANIFEST}", json.dumps(manifest, indent=2).encode())  # the commit point
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    return version


def clean_abandoned(catalog: Catalog) -> list[str]:
    """Remove version dirs without a manifest (crashed commits) and staging of other parents.
    Call under the DatasetLock, before planning."""
    store = store_of(catalog)
    fs = store.fs
    removed = []
    if not fs.exists(store.dir):
        return removed
    committed = set(shards.list_versions(store))
    for path in fs.ls(store.dir, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if shards._VERSION_DIR.match(name) and int(name[1:]) not in committed:
            fs.rm(path, recursive=True)
            removed.append(path)
    latest = max(committed) if committed else 0
    staging_root = f"{store.dir}/_staging"
    if fs.exists(staging_root):
        for path in fs.ls(staging_root, detail=False):
            if not path.rstrip("/").rsplit("/", 1)[-1].startswith(f"p{latest:04d}-"):
                fs.rm(path, recursive=True)
                removed.append(path)
    return removed


# -------------------------------------------------------------------------------------- in-process


def scores_version(path: str) -> int | None:
    """The version a scores file was written for, from its name (`vNNNN-rNN.parquet`), if it says."""
    import re

    match = re.search(r"v(\d{4,})-r\d+\.parquet$", str(path))
    return int(match.group(1)) if match else None


def check_scores_parent(plan: BuildPlan, scores: pa.Table | None, version: int | None = None) -> None:
    """A trainer round's scores must be for the version this build extends (else faces would mismatch)."""
    if scores is None:
        return
    if plan.parent is None:
        raise ValueError("scores need a parent version to fold into; build the dataset first")
    if plan.relabel:
        raise ValueError(f"the detector chain changed since v{plan.parent} ({plan.chain_change}), so this build "
                         "re-labels every image and the scores would not fit the new labels; build without "
                         "--scores first, then train and rescore the new version")
    if version is not None and version != plan.parent:
        raise ValueError(f"the scores are for v{version}, but this build extends v{plan.parent}; "
                         f"rescore v{plan.parent} first")


def build(catalog: Catalog, *, map_batches: Callable | None = None, progress: Callable | None = None,
          lock_wait_s: float = 0.0, scores: pa.Table | None = None,
          scores_for_version: int | None = None) -> tuple[int | None, BuildPlan]:
    """Run a whole build in this process (or with `map_batches(fn, batches) -> results`).

    With `scores` (a trainer round's scores table for the latest version) the new version folds them
    in, even when no image is new. Returns (the new version or the unchanged latest, the plan).
    """
    store = store_of(catalog)
    with shards.DatasetLock(store, wait_s=lock_wait_s):
        clean_abandoned(catalog)
        plan = plan_build(catalog)
        check_scores_parent(plan, scores, scores_for_version)
        if plan.nothing_to_do and scores is None:
            return plan.parent, plan
        if plan.batches:
            check_models(catalog)  # a model that cannot load stops here, before anything is written
        fn = lambda batch: process_batch(catalog, plan.staging_key, batch)  # noqa: E731
        if map_batches is None:
            results = []
            for batch in plan.batches:
                results.append(fn(batch))
                if progress:
                    progress(len(batch.items))
        else:
            results = list(map_batches(fn, plan.batches))
        return commit_version(catalog, plan, results, scores=scores), plan
