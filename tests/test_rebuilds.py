"""Rebuilds that must not lose or hide anything: round weights across rule changes, transient
quarantines tried again, model faults that stop the build, and a changed detector chain."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from pipeline import build as build_module
from pipeline import shards
from pipeline.build import build, store_of
from pipeline.catalog import load_catalog
from pipeline.quality import apply_rules
from pipeline.shards import FEATURE_COLUMNS, SCORES_SCHEMA
from pipeline.weights import ModelError
from tests.badfiles import face_jpeg
from tests.conftest import DATA, MODELS, WILD, copy_images, write_catalog
from tests.http_server import LocalServer


def _faces(catalog, version):
    return shards.read_faces(store_of(catalog), version, columns=[
        "face_id", "uri", "keep", "weight", "reject_reason", "det_score", *FEATURE_COLUMNS]).to_pandas()


def _edit(path: Path, fn) -> None:
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _scene_catalog(tmp_path: Path, n: int = 3) -> Path:
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for p in sorted((DATA / "aflw2000-dev").glob("*.jpg"))[:n]:
        shutil.copy(p, scenes / p.name)
    return write_catalog(tmp_path / "c.yaml", [{"name": "scenes", "kind": "folder", "path": str(scenes)}],
                         output_root=str(tmp_path / "out"))


def test_a_missing_model_file_stops_the_build_and_writes_nothing(tmp_path, capsys):
    path = _scene_catalog(tmp_path)
    _edit(path, lambda d: d["detectors"]["face"].update(weights=str(MODELS / "insightface-det" / "det_500mm.onnx")))
    catalog = load_catalog(path)
    with pytest.raises(ModelError, match="det_500mm.onnx"):
        build(catalog)
    store = store_of(catalog)
    assert shards.list_versions(store) == []
    assert not (Path(store.dir) / "_staging").exists() or not any((Path(store.dir) / "_staging").iterdir())
    from flows.cli import main

    assert main(["build", "--catalog", str(path), "--in-process"]) == 2
    assert "det_500mm.onnx" in capsys.readouterr().err
    assert shards.list_versions(store) == []


def test_a_model_failing_on_every_image_is_a_model_fault(tmp_path):
    catalog = load_catalog(_scene_catalog(tmp_path))

    class Broken:
        spec = catalog.detectors

        @property
        def face_detector(self):
            raise RuntimeError("weights of the wrong architecture")

    rgb = np.zeros((64, 64, 3), np.uint8)
    items = [shards_item for shards_item in build_module.list_items(catalog.sources[0])]
    decoded = [(item, f"id{i}", rgb) for i, item in enumerate(items)]
    quarantined = []
    with pytest.raises(ModelError, match="every one of 3"):
        build_module._label_isolating_failures(Broken(), catalog, decoded, lambda *a, **k: quarantined.append(a))
    assert quarantined == []
