"""A dataset version -> COCO keypoints JSON (68 points per face), written streaming, shard by shard.

Every face is exported, kept or dropped: the curation travels as extra per-annotation fields
(`keep`, `weight`, `reject_reason`, `face_id`, `det_score`, the per-point `landmark_scores` and
every float column under `scores`), so a consumer can apply the rules or its own. A point's COCO
visibility comes from its landmark score: 2 (labelled, visible) at or above `visible_min`, else 1
(labelled, not visible). Images are the rows' own uri / width / height; the bbox is COCO's
[x, y, width, height] in image pixels. NaN (a feature not measured) is written as null: JSON has
no NaN.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store.files import open_for_arrow
from pipeline.store.layout import Store, resolve_version
from pipeline.store.manifest import Manifest

# The 68-point (iBUG / 300W) layout: named groups of consecutive points, 0-based.
GROUPS = (("jaw", 17, False), ("right_brow", 5, False), ("left_brow", 5, False), ("nose_bridge", 4, False),
          ("nose_lower", 5, False), ("right_eye", 6, True), ("left_eye", 6, True), ("mouth_outer", 12, True),
          ("mouth_inner", 8, True))
COLUMNS = ("face_id", "image_id", "source", "split", "uri", "width", "height", "bbox", "landmarks",
           "landmark_scores", "keep", "weight", "reject_reason")
DIGITS = 3  # 1/1000 px: the label's precision is far coarser


class ExportError(ValueError):
    """The version cannot be exported whole (a shard is unreadable)."""


def keypoint_names() -> list[str]:
    return [f"{name}_{i}" for name, n, _ in GROUPS for i in range(n)]


def skeleton() -> list[list[int]]:
    """COCO skeleton (1-based point indices): consecutive points of a group, closed for eyes and lips."""
    edges, start = [], 0
    for _, n, closed in GROUPS:
        edges += [[start + i + 1, start + i + 2] for i in range(n - 1)]
        if closed:
            edges.append([start + n, start + 1])
        start += n
    return edges


def _num(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, DIGITS + 3) if math.isfinite(value) else None


def _annotation(row: dict, ann_id: int, image_id: int, floats: list[str], visible_min: float) -> dict:
    left, top, right, bottom = (float(v) for v in row["bbox"])
    points, point_scores = row["landmarks"], row["landmark_scores"]
    keypoints = []
    for i, score in enumerate(point_scores):
        keypoints += [round(float(points[2 * i]), DIGITS), round(float(points[2 * i + 1]), DIGITS),
                      2 if score is not None and score >= visible_min else 1]
    w, h = right - left, bottom - top
    return {
        "id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
        "bbox": [round(left, DIGITS), round(top, DIGITS), round(w, DIGITS), round(h, DIGITS)],
        "area": round(w * h, DIGITS), "keypoints": keypoints, "num_keypoints": len(point_scores),
        "face_id": row["face_id"], "keep": bool(row["keep"]), "weight": _num(row["weight"]),
        "reject_reason": row["reject_reason"], "landmark_scores": [_num(s) for s in point_scores],
        "scores": {name: _num(row.get(name)) for name in floats},
    }


def default_path(store: Store, version: int) -> Path:
    return Path(store.dir) / "exports" / f"{store.dataset}-v{version:04d}.coco.json"


def export_coco(store: Store, version: int | None = None, out: str | Path | None = None,
                visible_min: float = 0.5) -> tuple[Path, dict]:
    """Write `store`'s version as COCO keypoints; returns (path, counts). The file appears whole
    (written beside it, then renamed) or not at all; an unreadable shard fails the export."""
    version = resolve_version(store, version)
    manifest = Manifest.read(store, version)
    path = Path(out) if out else default_path(store, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    images: dict[str, dict] = {}
    n_ann = n_kept = 0
    dump = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            header = {
                "info": {"description": f"{store.dataset}@v{version} (facecurate)", "version": str(version),
                         "date_created": manifest.created_at, "dataset": store.dataset,
                         "catalog_hash": manifest.catalog_hash},
                "licenses": [],
                "categories": [{"id": 1, "name": "face", "supercategory": "person",
                                "keypoints": keypoint_names(), "skeleton": skeleton()}],
            }
            f.write(dump(header)[:-1] + ',"annotations":[')
            for entry in manifest.shards:
                shard_path = f"{store.version_dir(version)}/{entry.file}"
                try:
                    with open_for_arrow(store.fs, shard_path) as shard:
                        pf = pq.ParquetFile(shard)
                        names = pf.schema_arrow.names
                        floats = [fl.name for fl in pf.schema_arrow if pa.types.is_floating(fl.type)]
                        columns = [c for c in COLUMNS if c in names] + [c for c in floats if c not in COLUMNS]
                        for batch in pf.iter_batches(batch_size=1024, columns=columns):
                            for row in batch.to_pylist():
                                image = images.get(row["image_id"])
                                if image is None:
                                    image = images[row["image_id"]] = {
                                        "id": len(images) + 1, "file_name": row["uri"], "width": row["width"],
                                        "height": row["height"], "facecurate_image_id": row["image_id"],
                                        "source": row["source"], "split": row["split"]}
                                n_ann += 1
                                n_kept += bool(row["keep"])
                                f.write(("," if n_ann > 1 else "")
                                        + dump(_annotation(row, n_ann, image["id"], floats, visible_min)))
                except (OSError, pa.ArrowException) as err:
                    raise ExportError(f"cannot export {store.dataset}@v{version}: shard {entry.file} "
                                      f"is unreadable ({type(err).__name__}: {err})") from None
            f.write('],"images":[' + ",".join(dump(image) for image in images.values()) + "]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path, {"images": len(images), "annotations": n_ann, "kept": n_kept}
