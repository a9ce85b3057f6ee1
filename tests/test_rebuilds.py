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

from pipeline import batch as batch_module
from pipeline.build import build
from pipeline.catalog import load_catalog, store_of
from pipeline.sources import list_items
from pipeline.store.faces import read_faces, read_side_table
from pipeline.store.layout import list_versions
from pipeline.store.manifest import Manifest
from pipeline.store.schema import FEATURE_COLUMNS, QUARANTINE_SCHEMA, SCORES_SCHEMA, conform_quarantine
from pipeline.weights import ModelError
from tests.badfiles import face_jpeg
from tests.conftest import DATA, MODELS, WILD, copy_images, write_catalog
from tests.http_server import LocalServer


def _faces(catalog, version):
    return read_faces(store_of(catalog), version, columns=[
        "face_id", "uri", "keep", "weight", "reject_reason", "det_score", *FEATURE_COLUMNS]).to_pandas()


def _edit(path: Path, fn) -> None:
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_rules_only_rebuild_keeps_the_folded_round_weights(tmp_path):
    """v2 folds a round (weights x 0.5, one face x 0.05 -> dropped); v3 only changes a weight rule:
    its weights are the new rules' weights x the round's, not the rules' alone."""
    wild = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[:6])
    path = write_catalog(tmp_path / "c.yaml", [{"name": "wild", "kind": "folder", "path": str(wild),
                                               "pre_cropped": True}], output_root=str(tmp_path / "out"))
    catalog = load_catalog(path)
    assert build(catalog)[0] == 1
    v1 = _faces(catalog, 1)
    new_weight = np.full(len(v1), 0.5, np.float32)
    new_weight[0] = 0.05
    scores = pa.Table.from_pylist([  # the round's columns only: the relabelling ones read as null
        {"face_id": f, "round": 1, "model_sha256": "x" * 64, "cycle_error": 1.0, "critic_score": 0.5,
         "landmark_residual": 1.0, "new_weight": float(w)} for f, w in zip(v1.face_id, new_weight)],
        schema=SCORES_SCHEMA)
    assert build(catalog, scores=scores, scores_for_version=1)[0] == 2
    _edit(path, lambda d: d["rules"].update(min_weight=0.9))  # a weight rule changes, no image does
    changed = load_catalog(path)
    version, plan = build(changed)
    assert version == 3 and plan.rules_changed and plan.new_items == 0
    v3 = _faces(changed, 3).set_index("face_id").loc[v1.face_id]
    # Derived from v1 alone: no drop rule changed, so v1's decisions stand; v1's weights are the rules'
    # (clipped to [0.05, 1]), the new rules clip them to [0.9, 1] instead; then the round's x 0.5.
    kept = v1.keep.to_numpy()
    assert kept[1:].any() and (v1.weight.to_numpy()[kept] < 0.9).any()  # the changed clip shows
    np.testing.assert_array_equal(v3.keep.to_numpy()[1:], kept[1:])
    expected = np.maximum(v1.weight.to_numpy(), 0.9) * new_weight
    np.testing.assert_allclose(v3.weight.to_numpy()[1:][kept[1:]], expected[1:][kept[1:]], rtol=1e-5)
    assert not v3.keep.iloc[0] and v3.weight.iloc[0] == 0 and v3.reject_reason.iloc[0].startswith("rescore")
    assert Manifest.read(store_of(changed), 3).round_weights_from == 2


def test_transient_fetch_faults_are_tried_again_and_permanent_ones_not(tmp_path):
    """/flaky answers 503 twice, then serves: the first build (2 attempts) quarantines it as
    retryable, the next fetches it; /404 stays quarantined and is not fetched again; /500 is tried
    by every build, and a build that only retried it in vain makes no version."""
    with LocalServer(face_jpeg()) as server:
        urls = [f"{server.url}/flaky", f"{server.url}/404", f"{server.url}/500"]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        catalog = load_catalog(write_catalog(tmp_path / "c.yaml", [
            {"name": "web", "kind": "urls", "path": str(tmp_path / "urls.txt"), "timeout_s": 2.0, "retries": 1,
             "backoff_s": 0.01, "pre_cropped": True}], output_root=str(tmp_path / "out")))
        assert build(catalog)[0] == 1
        store = store_of(catalog)
        q1 = read_side_table(store, 1, "quarantine").to_pandas().set_index("uri")
        assert q1.loc[urls[0]].reason == "fetch failed" and q1.loc[urls[0]].retryable
        assert q1.loc[urls[1]].reason == "HTTP 404" and not q1.loc[urls[1]].retryable
        version, plan = build(catalog)
        assert version == 2 and plan.new_items == 2 and plan.retry_uris == {urls[0], urls[2]}
        from tests.http_server import Routes

        assert Routes.hits["/404"] == 1  # a permanent fault is not fetched again
        version, plan = build(catalog)
        assert version == 2 and plan.retry_uris == {urls[2]} and Routes.hits["/500"] == 6
        assert list_versions(store) == [1, 2]
    q2 = read_side_table(store, 2, "quarantine").to_pandas()
    assert sorted(q2.uri) == urls[1:]  # the retried images' old rows are gone: one row each
    assert q2.set_index("uri").loc[urls[2]].version == 2
    images = read_side_table(store, 2, "images").to_pandas().set_index("uri")
    assert images.index.is_unique and images.loc[urls[0]].status == "ok"  # in the ledger once
    faces = read_faces(store, 2, columns=["uri"]).to_pandas()
    assert faces.uri.tolist() == [urls[0]]
    assert Manifest.read(store, 2).counts.images_quarantined == 2


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
    assert list_versions(store) == []
    assert not (Path(store.dir) / "_staging").exists() or not any((Path(store.dir) / "_staging").iterdir())
    from flows.cli import main

    assert main(["build", "--catalog", str(path), "--in-process"]) == 2
    assert "det_500mm.onnx" in capsys.readouterr().err
    assert list_versions(store) == []


def test_a_missing_verifier_file_stops_the_build_before_any_batch(tmp_path):
    path = _scene_catalog(tmp_path)
    _edit(path, lambda d: d["detectors"].update(verifier={"weights": str(tmp_path / "no-verifier.pt")}))
    catalog = load_catalog(path)
    with pytest.raises(ModelError, match="no-verifier.pt") as err:
        build(catalog)
    assert "a model could not be loaded" in str(err.value)  # the check before the first batch, not a batch
    assert list_versions(store_of(catalog)) == []


def test_a_model_failing_on_every_image_is_a_model_fault(tmp_path, monkeypatch):
    catalog = load_catalog(_scene_catalog(tmp_path))
    made = []  # every Stopped the labelling makes: where its quarantine rows would be

    class Recorded(batch_module.Stopped):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(batch_module, "Stopped", Recorded)

    class Broken:
        spec = catalog.detectors

        @property
        def face_detector(self):
            raise RuntimeError("weights of the wrong architecture")

    rgb = np.zeros((64, 64, 3), np.uint8)
    items = [shards_item for shards_item in list_items(catalog.sources[0])]
    decoded = [(item, f"id{i}", rgb) for i, item in enumerate(items)]
    with pytest.raises(ModelError, match="every one of 3"):
        batch_module.label_items(Broken(), catalog, decoded)
    assert len(made) == 1 and made[0].quarantine == [] and made[0].images == []  # none quarantined


def test_images_quarantined_for_a_model_error_are_tried_again(tmp_path, monkeypatch):
    """v1: the chain fails on one image (a 'model error' quarantine row); v2 labels it."""
    path = _scene_catalog(tmp_path)
    catalog = load_catalog(path)
    real = batch_module.label_images
    victim = np.asarray(batch_module.decode_batch(
        [sorted((DATA / "aflw2000-dev").glob("*.jpg"))[1].read_bytes()], device=torch.device("cpu"),
        max_pixels=catalog.limits.max_pixels, min_side_px=catalog.limits.min_side_px)[0])

    def flaky(chain, images, pre, **kwargs):
        if any(np.asarray(im).shape == victim.shape and np.array_equal(np.asarray(im), victim) for im in images):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(chain, images, pre, **kwargs)

    monkeypatch.setattr(batch_module, "label_images", flaky)
    assert build(catalog)[0] == 1
    store = store_of(catalog)
    q1 = read_side_table(store, 1, "quarantine").to_pandas()
    assert q1.reason.tolist() == ["model error"] and q1.retryable.all()
    monkeypatch.setattr(batch_module, "label_images", real)
    version, plan = build(catalog)
    assert version == 2 and plan.new_items == 1
    assert read_side_table(store, 2, "quarantine").num_rows == 0
    images = read_side_table(store, 2, "images").to_pandas()
    assert len(images) == 3 and (images.status == "ok").all()
    faces = read_faces(store, 2, columns=["uri"]).to_pandas()
    assert faces.uri.nunique() == 3


def test_a_changed_detector_chain_relabels_and_says_so(tmp_path, caplog):
    path = _scene_catalog(tmp_path, n=2)
    catalog = load_catalog(path)
    assert build(catalog)[0] == 1
    # The same weights from another folder are no change.
    moved = tmp_path / "models" / "det_500m.onnx"
    moved.parent.mkdir()
    shutil.copy(MODELS / "insightface-det" / "det_500m.onnx", moved)
    _edit(path, lambda d: d["detectors"]["face"].update(weights=str(moved)))
    version, plan = build(load_catalog(path))
    assert version == 1 and plan.nothing_to_do and not plan.relabel
    # Other weights: every image is labelled again, into a version of new labels only.
    _edit(path, lambda d: d["detectors"]["face"].update(weights=str(MODELS / "insightface-det" / "det_2.5g.onnx")))
    changed = load_catalog(path)
    with caplog.at_level(logging.WARNING, logger="pipeline.plan"):
        version, plan = build(changed)
    assert version == 2 and plan.relabel and plan.new_items == 2
    assert "scrfd weights: 5e4447f50245 -> 041f73f47371" in plan.chain_change
    assert "detector chain changed since v1" in caplog.text and plan.chain_change in caplog.text
    store = store_of(changed)
    manifest = Manifest.read(store, 2)
    assert manifest.relabelled == plan.chain_change
    assert manifest.detectors[0].weights_sha256.startswith("041f73f47371")
    images = read_side_table(store, 2, "images").to_pandas()
    assert len(images) == 2 and (images.version == 2).all()  # labelled by this version, none carried over
    faces = read_faces(store, 2, columns=["face_id"]).to_pandas()
    assert faces.face_id.is_unique and len(faces) >= 2
    assert build(changed)[1].nothing_to_do  # and then it is settled


def test_quarantine_tables_of_older_versions_are_judged_by_their_reasons():
    """Versions written before the `retryable` column: a 'model error' or a transient fetch fault is
    tried again, a 404 or a corrupt image is not."""
    old = pa.table({"uri": ["a", "b", "c", "d", "e"], "source": ["s"] * 5, "image_id": [None, None, None, "x", "y"],
                    "stage": ["fetch", "fetch", "fetch", "detect", "decode"],
                    "reason": ["fetch failed", "timeout", "HTTP 404", "model error", "not an image"],
                    "detail": [""] * 5, "version": pa.array([1] * 5, pa.int32())})
    table = conform_quarantine(old)
    assert table.schema == QUARANTINE_SCHEMA
    assert table.column("retryable").to_pylist() == [True, True, False, True, False]
