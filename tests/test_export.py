"""`facecurate export --format coco`: the COCO keypoints file read back against the version's Parquet
files: ids, images, boxes (xywh), 68 points with visibility from the per-point scores, curation fields."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.export import ExportError, export_coco, keypoint_names, skeleton
from pipeline.store.layout import Store
from pipeline.store.manifest import Manifest
from tests.browse_fixture import faces_frame
from tests.conftest import write_catalog


@pytest.fixture(scope="module")
def version(browse_version):
    return browse_version


def test_coco_round_trip(version, tmp_path):
    store, v = version
    frame = faces_frame(store, v).set_index("face_id")
    path, counts = export_coco(store, v, tmp_path / "faces.coco.json")
    coco = json.loads(path.read_text())  # strict JSON: no NaN anywhere
    assert counts == {"images": frame.image_id.nunique(), "annotations": len(frame),
                      "kept": int(frame.keep.sum())}

    category = coco["categories"][0]
    assert len(category["keypoints"]) == 68 == len(set(keypoint_names()))
    assert all(1 <= a <= 68 and 1 <= b <= 68 for a, b in skeleton())
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == len(coco["images"]) == frame.image_id.nunique()
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"]) == len(frame)
    assert {a["face_id"] for a in coco["annotations"]} == set(frame.index)

    for ann in coco["annotations"]:
        row = frame.loc[ann["face_id"]]
        image = images[ann["image_id"]]  # every annotation points at its own image
        assert (image["file_name"], image["width"], image["height"], image["facecurate_image_id"]) == \
            (row.uri, row.width, row.height, row.image_id)
        left, top, right, bottom = row.bbox
        assert np.allclose(ann["bbox"], [left, top, right - left, bottom - top], atol=1e-3)
        kp = np.asarray(ann["keypoints"], dtype=np.float64).reshape(68, 3)
        assert np.allclose(kp[:, :2], np.asarray(row.landmarks).reshape(68, 2), atol=1e-3)
        assert (kp[:, 2] == np.where(np.asarray(row.landmark_scores) >= 0.5, 2, 1)).all()
        assert ann["num_keypoints"] == 68 and ann["category_id"] == category["id"]
        assert ann["keep"] == bool(row.keep) and math.isclose(ann["weight"], float(row.weight), rel_tol=1e-6)
        assert ann["reject_reason"] == (row.reject_reason if isinstance(row.reject_reason, str) else None)
        assert math.isclose(ann["scores"]["flip_nme_pct"], float(row.flip_nme_pct), rel_tol=1e-6)
    assert any(not a["keep"] for a in coco["annotations"]) and any(a["keep"] for a in coco["annotations"])


def test_visibility_follows_the_point_scores(version, tmp_path):
    store, v = version
    path, _ = export_coco(store, v, tmp_path / "strict.json", visible_min=1.5)  # no score reaches it
    coco = json.loads(path.read_text())
    assert {vis for a in coco["annotations"] for vis in a["keypoints"][2::3]} == {1}


def test_unreadable_shard_fails_the_export_whole(version, tmp_path):
    import shutil

    store, v = version
    root = tmp_path / "out"
    shutil.copytree(store.dir, root / store.dataset)
    copy = Store(str(root), store.dataset)
    last = Manifest.read(copy, v).shards[-1].file
    (root / store.dataset / f"v{v:04d}" / last).write_bytes(b"not parquet")
    out = tmp_path / "x.json"
    with pytest.raises(ExportError, match=last):
        export_coco(copy, v, out)
    assert not out.exists() and not list(tmp_path.glob("x.json*"))  # nothing half-written


def test_cli_export(version, tmp_path, capsys):
    from flows.cli import main

    store, v = version
    sources = [{"name": "x", "kind": "folder", "path": str(tmp_path)}]
    catalog = write_catalog(tmp_path / "catalog.yaml", sources, output_root=store.root)
    out = tmp_path / "cli.coco.json"
    argv = ["export", "--catalog", str(catalog), f"faces@v{v}", "--format", "coco", "--out", str(out)]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["annotations"]) == len(faces_frame(store, v))
