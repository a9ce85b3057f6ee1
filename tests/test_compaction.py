"""A version's faces are compacted at commit: files of `execution.shard_rows` rows cut into row groups
of `row_group_rows`, the same rows in the same order as the batches' parts; a parent's full files are
shared, not rewritten; a crash in the middle of compaction leaves the previous version and resumes."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import compact
from pipeline.build import build
from pipeline.catalog import CatalogError, load_catalog, parse_catalog, store_of
from pipeline.store.faces import read_faces
from pipeline.store.layout import Store, list_versions
from pipeline.store.manifest import Manifest
from pipeline.store.schema import conform_faces
from tests.conftest import ROOT, WILD, copy_images, write_catalog

N_FIRST, N_MORE, BATCH = 12, 4, 2
SMALL = {"shard_rows": 5, "row_group_rows": 2}


def _catalog(root: Path, folder: Path, layout: dict | None = None):
    extra = {"execution": {"batch_images": BATCH, **(layout or {})}}
    return load_catalog(write_catalog(root / "c.yaml", [
        {"name": "wild", "kind": "folder", "path": str(folder), "pre_cropped": True}],
        output_root=str(root / "out"), extra=extra))


def _rows(table: pa.Table) -> pa.Table:
    """A version's faces as compared across stores: the image's path differs (its folder) and so does
    the batches' order (their keys hash the paths); every other value must be the same."""
    uri = [Path(u).name for u in table.column("uri").to_pylist()]
    table = table.set_column(table.schema.get_field_index("uri"), "uri", pa.array(uri, pa.string()))
    return table.sort_by("face_id")


def _record_parts(monkeypatch) -> list[pa.Table]:
    """The tables commit hands the writer, in order: the faces as they were before compaction."""
    parts, add = [], compact.FacesWriter.add

    def recording(self, table):
        parts.append(table)
        add(self, table)

    monkeypatch.setattr(compact.FacesWriter, "add", recording)
    return parts


def _layout(store: Store, version: int) -> list[list[int]]:
    """Rows of each row group of each file, in manifest order."""
    vdir = Path(store.version_dir(version))
    out = []
    for entry in Manifest.read(store, version).shards:
        meta = pq.ParquetFile(vdir / entry.file).metadata
        assert meta.num_rows == entry.rows
        out.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same images built once with the default layout (one file): the rows compaction must keep.
    Returns (images folder, v1's faces, v2's faces after N_MORE more images)."""
    root = tmp_path_factory.mktemp("reference")
    folder = copy_images(root / "wild", "aflw-wild-crops", WILD[600:600 + N_FIRST])
    catalog = _catalog(root, folder)
    assert build(catalog)[0] == 1
    copy_images(folder, "aflw-wild-crops", WILD[600 + N_FIRST:600 + N_FIRST + N_MORE])
    assert build(catalog)[0] == 2
    store = store_of(catalog)
    assert [len(f) for f in _layout(store, 2)] == [1]  # 16 rows in one file, one row group
    return folder, _rows(read_faces(store, 1)), _rows(read_faces(store, 2))


def test_many_batches_commit_into_files_of_shard_rows_with_the_same_rows(tmp_path, reference, monkeypatch):
    folder, v1, v2 = reference
    first = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[600:600 + N_FIRST])
    catalog = _catalog(tmp_path, first, SMALL)
    store = store_of(catalog)
    parts = _record_parts(monkeypatch)
    assert build(catalog)[0] == 1
    assert len(parts) == N_FIRST // BATCH  # one part per batch
    assert _layout(store, 1) == [[2, 2, 1], [2, 2, 1], [2]]  # 12 faces in files of 5, row groups of 2
    compacted = read_faces(store, 1)
    # the batches' rows in their order (in FACES_SCHEMA: a part's keep and weight lose `not null` on the way)
    assert compacted.equals(conform_faces(pa.concat_tables(parts)))
    assert _rows(compacted).equals(v1)  # and the same rows as the default layout's single file
    assert not (tmp_path / "out" / "faces" / "_staging").exists() or not any(
        (tmp_path / "out" / "faces" / "_staging").iterdir())  # the batches' parts are gone

    copy_images(first, "aflw-wild-crops", WILD[600 + N_FIRST:600 + N_FIRST + N_MORE])
    assert build(catalog)[0] == 2
    assert _layout(store, 2) == [[2, 2, 1], [2, 2, 1], [2, 2, 1], [1]]  # 16 faces
    assert _rows(read_faces(store, 2)).equals(v2)
    m1, m2 = (Manifest.read(store, v).shards for v in (1, 2))
    # the parent's full files are shared as they are (hard links); its last, partial one is rewritten
    assert m2[:2] == m1[:2]
    for entry in m1[:2]:
        assert os.stat(Path(store.version_dir(1)) / entry.file).st_ino == \
            os.stat(Path(store.version_dir(2)) / entry.file).st_ino
    assert m2[2].file.startswith("faces-v0002-")


def test_a_crash_in_the_middle_of_compaction_keeps_the_parent_and_resumes(tmp_path, reference, monkeypatch):
    folder, v1, v2 = reference
    first = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[600:600 + N_FIRST])
    catalog = _catalog(tmp_path, first, SMALL)
    store = store_of(catalog)
    assert build(catalog)[0] == 1
    copy_images(first, "aflw-wild-crops", WILD[600 + N_FIRST:600 + N_FIRST + N_MORE])

    finish = compact.FacesWriter._finish_file
    calls = []

    def crash_on_second_file(self):
        calls.append(self._path)
        if len(calls) == 2:  # one compacted file is whole, the next is half written
            raise OSError("simulated crash while compacting")
        finish(self)

    monkeypatch.setattr(compact.FacesWriter, "_finish_file", crash_on_second_file)
    with pytest.raises(OSError, match="simulated crash"):
        build(catalog)
    monkeypatch.setattr(compact.FacesWriter, "_finish_file", finish)
    assert list_versions(store) == [1]
    assert _rows(read_faces(store, 1)).equals(v1)  # the parent is untouched
    staging = tmp_path / "out" / "faces" / "_staging"
    assert any(staging.glob("*/*.done.json"))  # the batches' parts are kept for the resume

    assert build(catalog)[0] == 2
    assert _rows(read_faces(store, 2)).equals(v2)
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name]
    assert not staging.exists() or not any(staging.iterdir())


def test_the_layout_fields_are_checked_and_named():
    bundled = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    base = {"dataset": "d", "output_root": "/tmp/x", "sources": [{"name": "s", "kind": "folder", "path": "/x"}],
            "detectors": bundled["detectors"]}
    assert parse_catalog(base).execution.shard_rows == 50_000
    with pytest.raises(CatalogError, match=r"execution\.shard_rows"):
        parse_catalog({**base, "execution": {"shard_rows": 0}})
    with pytest.raises(CatalogError, match=r"execution.*row_group_rows \(64\) must not exceed shard_rows \(10\)"):
        parse_catalog({**base, "execution": {"shard_rows": 10, "row_group_rows": 64}})
