"""One batch of a build: read, hash, decode, label and score its items; write its part files.

Each step is a function that returns what it passes on plus the rows of the items it stopped (their
ledger and quarantine rows); `process_batch` runs them in order and writes the three part files and,
last, a done marker, so a killed build resumes from the batches it finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.catalog import Catalog, Rules, UrlListSource, store_of
from pipeline.crops import match_reference
from pipeline.decode import DecodeError
from pipeline.device_images import image_hw
from pipeline.gpu_decode import decode_batch, decode_device
from pipeline.labeling import LabelledFace, get_chain, label_images
from pipeline.memory import keep_freed_memory
from pipeline.plan import Batch
from pipeline.quality import apply_rules, face_features
from pipeline.sources import FetchError, SourceItem, TarReader, fetch_url, read_file
from pipeline.store.files import write_atomic, write_table
from pipeline.store.schema import (
    FACES_SCHEMA,
    FEATURE_COLUMNS,
    IMAGES_SCHEMA,
    QUARANTINE_SCHEMA,
    quarantine_retryable,
)
from pipeline.threads import use_model_threads
from pipeline.timings import stage
from pipeline.weights import ModelError

log = logging.getLogger(__name__)

RULE_INPUTS = ("det_score", *FEATURE_COLUMNS)  # the stored features the catalog's rules read


@dataclass
class BatchResult:
    key: str
    faces_file: str | None
    images_file: str
    quarantine_file: str
    counts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # stage -> seconds (`pipeline.timings`); {} in older markers


# ------------------------------------------------------------------------------------------- rows


def image_row(item: SourceItem, image_id: str | None, status: str, n_faces: int = 0,
              width: int | None = None, height: int | None = None) -> dict:
    """The crawl ledger's row (images.parquet) for one item: ok, duplicate or quarantined."""
    return {"image_id": image_id, "source": item.source, "uri": item.uri, "stat_key": item.stat_key,
            "status": status, "n_faces": n_faces, "width": width, "height": height, "version": 0}


@dataclass
class Stopped:
    """The items a step stopped: their ledger rows and, for quarantined ones, their quarantine rows."""

    images: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)

    def quarantined(self, item: SourceItem, stage: str, reason: str, detail: str, image_id: str | None = None):
        self.quarantine.append({"uri": item.uri, "source": item.source, "image_id": image_id, "stage": stage,
                                "reason": reason, "detail": detail[:500], "version": 0,
                                "retryable": quarantine_retryable(stage, reason)})
        self.images.append(image_row(item, image_id, "quarantined"))


def decide(features: pa.Table | pd.DataFrame, rules: Rules) -> dict[str, pa.Array]:
    """The catalog's rules over faces' features -> their keep, weight and reject_reason columns.

    One function for both paths: a batch's new faces (their features as computed) and a rebuild's
    stored faces (rules changed, or a round folded)."""
    if isinstance(features, pa.Table):
        features = features.select(list(RULE_INPUTS)).to_pandas()
    decided = apply_rules(features[list(RULE_INPUTS)], rules)
    return {"keep": pa.array(decided["keep"].to_numpy(), pa.bool_()),
            "weight": pa.array(decided["weight"].to_numpy(), pa.float32()),
            "reject_reason": pa.array(decided["reject_reason"].tolist(), pa.string())}


def with_decisions(faces: pa.Table, decisions: dict[str, pa.Array]) -> pa.Table:
    for name, values in decisions.items():
        faces = faces.set_column(faces.schema.get_field_index(name), name, values)
    return faces


# ------------------------------------------------------------------------------------------ steps


def _read_bytes(item: SourceItem, catalog: Catalog, tars: TarReader) -> bytes:
    source = catalog.source(item.source)
    if isinstance(source, UrlListSource):
        return fetch_url(item.uri, timeout_s=source.timeout_s, retries=source.retries,
                         backoff_s=source.backoff_s, max_bytes=source.max_bytes)
    if "#" in item.uri and source.kind == "tar":
        return tars.read(item, source.max_bytes)
    return read_file(item, source.max_bytes)


def read_items(items: list[SourceItem], catalog: Catalog,
               tars: TarReader) -> tuple[list[tuple[SourceItem, str, bytes]], Stopped]:
    """Read and hash each item: (item, image_id, bytes) for new images; fetch faults and repeats stop here."""
    read, stopped, seen_ids = [], Stopped(), set()
    for item in items:
        try:
            data = _read_bytes(item, catalog, tars)
        except FetchError as err:
            stopped.quarantined(item, "fetch", err.reason, err.detail)
            continue
        image_id = hashlib.sha256(data).hexdigest()
        if image_id in seen_ids:
            stopped.images.append(image_row(item, image_id, "duplicate"))
            continue
        seen_ids.add(image_id)
        read.append((item, image_id, data))
    return read, stopped


def decode_items(read: list[tuple[SourceItem, str, bytes]],
                 catalog: Catalog) -> tuple[list[tuple[SourceItem, str, object]], Stopped]:
    """One decode call for the batch (nvJPEG on the GPU path, the CPU decoder otherwise); bad files stop."""
    images = decode_batch([data for _, _, data in read], device=decode_device(catalog),
                          max_pixels=catalog.limits.max_pixels, min_side_px=catalog.limits.min_side_px)
    decoded, stopped = [], Stopped()
    for (item, image_id, _), image in zip(read, images):
        if isinstance(image, DecodeError):
            stopped.quarantined(item, "decode", image.reason, image.detail, image_id)
        else:
            decoded.append((item, image_id, image))
    return decoded, stopped


def label_items(chain, catalog: Catalog, decoded: list,
                timings: dict[str, float] | None = None) -> tuple[list, Stopped]:
    """Label all images in one batched call; if a model fails on the batch, retry image by image so
    one bad image is quarantined (stage 'detect', retried by the next build) instead of failing the
    whole batch. A model that fails on every image of a batch (two or more) is the model's fault, not
    the images': ModelError, and nothing of the batch is quarantined."""
    stopped = Stopped()
    if not decoded:
        return [], stopped
    pre = [catalog.source(item.source).pre_cropped for item, _, _ in decoded]
    try:
        faces = label_images(chain, [rgb for _, _, rgb in decoded], pre, timings=timings)
        return list(zip(decoded, faces)), stopped
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - isolate, then report per image below
        log.warning("batch labelling failed (%s); retrying image by image", err)
    out, failed = [], []
    for entry, is_pre in zip(decoded, pre):
        try:
            out.append((entry, label_images(chain, [entry[2]], [is_pre], timings=timings)[0]))
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
        stopped.quarantined(entry[0], "detect", "model error", f"{type(err).__name__}: {err}", entry[1])
    return out, stopped


def _sibling(item: SourceItem, suffix: str) -> SourceItem:
    base, sep, member = item.uri.partition("#")
    if sep:
        return SourceItem(item.source, f"{base}#{str(PurePosixPath(member).with_suffix(suffix))}", None, None)
    return SourceItem(item.source, str(PurePosixPath(base).with_suffix(suffix)) if "://" not in base
                      else base.rsplit(".", 1)[0] + suffix, None, None)


def _reference(item: SourceItem, catalog: Catalog, tars: TarReader, height: int):
    """The source's reference label for this image, or (None, reason) when it has none / a bad one."""
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


def face_rows(labelled: list, catalog: Catalog, tars: TarReader) -> tuple[list[dict], list[dict], int]:
    """Labelled images -> (one row per face with its features and reference label, the images' ledger
    rows, how many references were missing or bad)."""
    faces_out, images_out, reference_problems = [], [], 0
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
                reference_problems += 1
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
            faces_out.append(row)
        images_out.append(image_row(item, image_id, "ok", len(faces), width, height))
    return faces_out, images_out, reference_problems


def faces_table(rows: list[dict], rules: Rules) -> pa.Table:
    """The batch's face rows as a FACES_SCHEMA table, decided by the rules."""
    if not rows:
        return FACES_SCHEMA.empty_table()
    decisions = decide(pd.DataFrame([{c: r[c] for c in RULE_INPUTS} for r in rows]), rules)
    undecided = [{**r, "keep": False, "weight": 0.0, "reject_reason": None} for r in rows]
    return with_decisions(pa.Table.from_pylist(undecided, schema=FACES_SCHEMA), decisions)


# ------------------------------------------------------------------------------------------ batch


def process_batch(catalog: Catalog, plan_staging_key: str, batch: Batch, *,
                  model_threads: int | None = None) -> BatchResult:
    """Read, hash, decode, label and score one batch; write its three part files and a done marker.

    Idempotent: a batch whose marker exists returns the recorded result without work.
    `model_threads`: threads per model (`pipeline.threads`), set for this process before the models run.
    """
    store = store_of(catalog)
    fs = store.fs
    staging = store.staging_dir(plan_staging_key)
    marker = f"{staging}/{batch.key}.done.json"
    if fs.exists(marker):
        with fs.open(marker, "rb") as f:
            return BatchResult(**json.loads(f.read()))

    if model_threads:
        use_model_threads(model_threads)
    keep_freed_memory()
    tars = TarReader()
    timings: dict[str, float] = {}
    try:
        with stage(timings, "read"):
            read, stopped_reading = read_items(batch.items, catalog, tars)
        with stage(timings, "decode"):
            decoded, stopped_decoding = decode_items(read, catalog)
        labelled, stopped_labelling = label_items(get_chain(catalog.detectors), catalog, decoded, timings)
        with stage(timings, "features"):
            rows, ok_images, reference_problems = face_rows(labelled, catalog, tars)
    finally:
        tars.close()
    stopped = [stopped_reading, stopped_decoding, stopped_labelling]
    images_rows = [r for s in stopped for r in s.images] + ok_images
    quarantine_rows = [r for s in stopped for r in s.quarantine]

    counts = Counter({"read": len(batch.items)})
    counts.update(f"quarantined:{r['stage']}" for r in quarantine_rows)
    counts.update(duplicate=sum(r["status"] == "duplicate" for r in images_rows), decoded=len(decoded),
                  faces=len(rows), no_face=sum(not faces for _, faces in labelled),
                  reference_problems=reference_problems)

    with stage(timings, "rules"):
        table = faces_table(rows, catalog.rules)
    faces_file = None
    with stage(timings, "write"):
        if table.num_rows:
            faces_file = f"faces-{batch.key}.parquet"
            write_table(fs, f"{staging}/{faces_file}", table)
        images_file, quarantine_file = f"images-{batch.key}.parquet", f"quarantine-{batch.key}.parquet"
        write_table(fs, f"{staging}/{images_file}", pa.Table.from_pylist(images_rows, schema=IMAGES_SCHEMA))
        write_table(fs, f"{staging}/{quarantine_file}",
                    pa.Table.from_pylist(quarantine_rows, schema=QUARANTINE_SCHEMA))
    result = BatchResult(batch.key, faces_file, images_file, quarantine_file, {k: v for k, v in counts.items() if v},
                         timings)
    write_atomic(fs, marker, json.dumps(result.__dict__).encode())  # last: the batch is done
    return result


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
    try:  # the chain's properties load their models on first access
        _ = chain.landmarkers
        if specs[0][0] == "face detector":
            _ = chain.face_detector
        _ = chain.verifier  # None when the chain has none
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - any load failure is reported with the model it came from
        named = ", ".join(f"{role} {getattr(s, 'name', role)!r} ({s.weights})" for role, s in specs)
        raise ModelError(f"{catalog.path}: detectors: a model could not be loaded: {type(err).__name__}: {err} "
                         f"[the chain: {named}]; fix the path or sha256 in the catalog (nothing was built)") from err
