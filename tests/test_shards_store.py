"""The store: writes are atomic, versions without a manifest do not exist, one writer at a time; a
manifest reads typed and writes back as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline.store.files import sha256_bytes, write_atomic, write_table
from pipeline.store.layout import MANIFEST, Store, latest_version, list_versions, parse_ref, resolve_version
from pipeline.store.lock import DatasetLock, LockedError
from pipeline.store.schema import SCORES_SCHEMA


def test_parse_ref():
    assert parse_ref("faces@v3") == ("faces", 3)
    assert parse_ref("faces@12") == ("faces", 12)
    assert parse_ref("faces") == ("faces", None)
    with pytest.raises(ValueError, match="NAME@vN"):
        parse_ref("faces@latest")


def test_version_without_manifest_is_not_listed(tmp_path):
    store = Store(str(tmp_path), "d")
    for v in (1, 2, 3):
        os.makedirs(store.version_dir(v))
    for v in (1, 3):
        (tmp_path / "d" / f"v{v:04d}" / "manifest.json").write_text("{}")
    (tmp_path / "d" / "v0004.tmp-x").mkdir()
    assert list_versions(store) == [1, 3]
    assert latest_version(store) == 3
    with pytest.raises(FileNotFoundError, match="d@v2 does not exist"):
        resolve_version(store, 2)


def test_write_table_round_trip_and_entry(tmp_path):
    store = Store(str(tmp_path), "d")
    table = pa.Table.from_pylist([{"face_id": "a:0", "round": 1, "model_sha256": "x", "cycle_error": 1.5,
                                   "critic_score": 0.2, "landmark_residual": 3.0, "new_weight": 0.5}],
                                 schema=SCORES_SCHEMA)
    entry = write_table(store.fs, f"{tmp_path}/x/scores.parquet", table)
    assert entry["rows"] == 1 and len(entry["sha256"]) == 64
    assert sha256_bytes((tmp_path / "x" / "scores.parquet").read_bytes()) == entry["sha256"]
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["scores.parquet"]  # no temp file left


def test_store_files_dictionary_encode_only_flat_columns(tmp_path):
    """Crop bytes and point lists are unique per face: no dictionary for them (building one only to drop
    it cost half a write); flat columns whose values repeat keep theirs; every value reads back."""
    import numpy as np
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    table = pa.table({"source": ["wild"] * 50 + ["dev"] * 50,
                      "crop": [rng.bytes(300) for _ in range(100)],
                      "landmarks": [rng.standard_normal(136).astype(np.float32).tolist() for _ in range(100)]})
    write_table(Store(str(tmp_path), "d").fs, f"{tmp_path}/t.parquet", table)
    chunks = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    encodings = {chunks.column(i).path_in_schema.split(".")[0]: chunks.column(i).encodings
                 for i in range(chunks.num_columns)}
    dictionary = ("PLAIN_DICTIONARY", "RLE_DICTIONARY")
    assert any(e in encodings["source"] for e in dictionary)
    assert not any(e in encodings["crop"] for e in dictionary)
    assert not any(e in encodings["landmarks"] for e in dictionary)
    assert pq.read_table(tmp_path / "t.parquet").equals(table)


def test_failed_write_leaves_no_file(tmp_path):
    class Boom(Exception):
        pass

    class FailingBytes(bytes):
        pass

    store = Store(str(tmp_path), "d")
    target = f"{tmp_path}/f.bin"
    write_atomic(store.fs, target, b"first")
    fs = store.fs
    original_mv = fs.mv

    def broken_mv(*a, **k):
        raise Boom()

    fs.mv = broken_mv
    try:
        with pytest.raises(Boom):
            write_atomic(fs, target, b"second")
    finally:
        fs.mv = original_mv
    assert (tmp_path / "f.bin").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_lock_excludes_a_second_writer_and_recovers_from_a_dead_one(tmp_path):
    store = Store(str(tmp_path), "d")
    with DatasetLock(store):
        with pytest.raises(LockedError, match="locked .* by another process"):
            DatasetLock(store).acquire()
    # A lock left by a process that died is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / "d" / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with DatasetLock(store):
        pass
    assert not (tmp_path / "d" / ".lock").exists()


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_store_owns_every_path_and_reads_back_what_it_names(tmp_path, kind):
    """Versions, staging, scores files and round folders: named by the store, found again by the store,
    on a local root and on an fsspec one (memory://) alike."""
    import uuid

    root = str(tmp_path) if kind == "local" else f"memory://store-{uuid.uuid4().hex[:8]}"
    store = Store(root, "d")
    fs = store.fs
    scores = SCORES_SCHEMA.empty_table()
    for version, round_index in [(2, 1), (2, 10), (2, 2), (3, 1), (12345, 7)]:
        path = store.scores_path(version, round_index)
        write_table(fs, path, scores)
        assert store.scores_version(path) == version
    write_table(fs, f"{store.dir}/scores/notes.parquet", scores)  # not a round's file: ignored
    assert [store.scores_version(p) for p in store.list_scores(2)] == [2, 2, 2]
    assert [p.rsplit("-r", 1)[-1] for p in store.list_scores(2)] == ["01.parquet", "02.parquet", "10.parquet"]
    assert store.list_scores(3) == [store.scores_path(3, 1)]
    assert store.list_scores(4) == []
    assert store.scores_version("somewhere/v0002/scores.parquet") is None
    assert store.scores_version("v0009-r03.parquet.bak") is None

    for version in (1, 3):
        write_atomic(fs, f"{store.round_dir(version)}/done.json", b"{}")
    assert store.round_versions() == [1, 3]
    with fs.open(f"{store.round_dir(3)}/done.json", "rb") as f:
        assert f.read() == b"{}"

    for version in (1, 2):
        write_atomic(fs, f"{store.version_dir(version)}/faces.parquet", b"x")
    write_atomic(fs, f"{store.version_dir(1)}/{MANIFEST}", b"{}")
    assert sorted(store.version_dirs()) == [1, 2]
    assert list_versions(store) == [1]
    write_atomic(fs, f"{store.staging_dir('p0001-abc')}/x.done.json", b"{}")
    assert list(store.staging_dirs()) == ["p0001-abc"]


# A manifest as pipeline/commit.py writes it (a version folding a round), and one from an older writer:
# keys in another order, parts missing, and keys this code does not know.
_ENTRY = {"file": "faces-v0002-00000.parquet", "rows": 12, "bytes": 34567, "sha256": "ab" * 32}
_MANIFEST = {
    "schema_version": 2, "dataset": "faces", "version": 2, "parent": 1, "created_at": "2025-01-02T03:04:05+00:00",
    "note": "", "catalog_path": "/x/catalog.yaml", "catalog_hash": "c" * 64, "rules_hash": "r" * 64,
    "detectors": [{"role": "face", "name": "scrfd", "weights": "/m/det_500m.onnx", "weights_sha256": "5e" * 32},
                  {"role": "primary", "name": "tddfa_mb05", "weights": "/m/mb05.pth", "weights_sha256": None},
                  {"role": "verifier", "name": "verifier", "weights": "/v.pt", "weights_sha256": "f9" * 32,
                   "fuse": True, "tau_pct": 2.5, "fusion": "regions-v1"}],
    "counts": {"images_seen": 11, "images_decoded": 11, "images_quarantined": 0, "images_duplicate": 0,
               "images_with_faces": 10, "images_without_faces": 1, "faces": 12, "faces_kept": 9, "faces_dropped": 3,
               "drop_reasons": {"verifier_nme_pct": 2, "face_px": 1}, "quarantine_reasons": {},
               "images_new": 0, "images_unchanged": 11, "faces_relabelled": 3},
    "shards": [_ENTRY],
    "tables": {"images": {**_ENTRY, "file": "images.parquet"}, "quarantine": {**_ENTRY, "file": "quarantine.parquet"},
               "scores": {**_ENTRY, "file": "scores.parquet"}},
    "timings": {"faces": 0, "seconds": {}},
    "round_folded": [1],
}
_OLDER = {"version": 1, "dataset": "faces", "parent": None, "schema_version": 1, "shards": [{**_ENTRY, "extra": 1}],
          "counts": {"faces": 12, "faces_kept": 9, "by_source": {"wild": 6}}, "tables": {}, "built_by": "v0.1"}


@pytest.mark.parametrize("data", [_MANIFEST, _OLDER], ids=["current", "older"])
def test_a_manifest_reads_and_writes_back_the_same_file(tmp_path, data):
    from pipeline.store.manifest import Manifest

    store = Store(str(tmp_path), "faces")
    text = json.dumps(data, indent=2).encode()
    write_atomic(store.fs, f"{store.version_dir(data['version'])}/{MANIFEST}", text)
    manifest = Manifest.read(store, data["version"])
    assert manifest.to_dict() == data and list(manifest.to_dict()) == list(data)  # the same keys, in order
    (tmp_path / "faces" / f"v{data['version']:04d}" / MANIFEST).unlink()
    manifest.write(store)
    assert (tmp_path / "faces" / f"v{data['version']:04d}" / MANIFEST).read_bytes() == text


def test_a_manifest_reads_typed():
    from pipeline.store.manifest import Manifest

    current, older = Manifest.from_dict(_MANIFEST), Manifest.from_dict(_OLDER)
    assert current.parent == 1 and current.round_folded == [1] and current.relabelled is None
    assert current.counts.faces_relabelled == 3 and current.counts.drop_reasons["face_px"] == 1
    assert current.shards[0].rows == 12 and current.tables["scores"].file == "scores.parquet"
    assert current.detectors[2].tau_pct == 2.5 and current.timings.seconds == {}
    assert current.detector_dicts() == _MANIFEST["detectors"]
    # Parts an older manifest lacks read as empty; they stay absent when it is written back.
    assert older.counts.images_new == 0 and older.detectors is None and older.detector_dicts() is None
    assert older.timings is None and older.note == "" and "images_new" not in older.to_dict()["counts"]


def test_a_manifest_made_in_code_writes_only_what_it_was_given():
    from pipeline.store.manifest import Counts, Manifest

    manifest = Manifest(version=3, parent=2, counts=Counts(faces=1, faces_kept=1), shards=[_ENTRY])
    manifest.relabelled = "scrfd weights: a -> b"
    assert manifest.to_dict() == {"version": 3, "parent": 2, "counts": {"faces": 1, "faces_kept": 1},
                                  "shards": [_ENTRY], "relabelled": "scrfd weights: a -> b"}


def test_local_store_files_reach_arrow_as_native_files(tmp_path):
    """Arrow reads a Python file object from its IO threads, which take the GIL; one still at it when
    the interpreter exits aborts the process (exit -6). Local store files reach Arrow as native files;
    other filesystems still go through fsspec and read the same."""
    import fsspec
    import pyarrow.parquet as pq

    from pipeline.store.files import open_for_arrow

    table = pa.table({"a": list(range(10))})
    write_table(Store(str(tmp_path), "d").fs, f"{tmp_path}/t.parquet", table)
    local = fsspec.filesystem("file")
    with open_for_arrow(local, f"{tmp_path}/t.parquet") as f:
        assert isinstance(f, pa.NativeFile) and not isinstance(f, pa.PythonFile)
        assert pq.read_table(f).equals(table)
    memory = fsspec.filesystem("memory")
    memory.pipe("/t.parquet", (tmp_path / "t.parquet").read_bytes())
    with open_for_arrow(memory, "memory://t.parquet") as f:
        assert pq.read_table(f).equals(table)
    with pytest.raises(FileNotFoundError):
        with open_for_arrow(local, f"{tmp_path}/missing.parquet"):
            pass


@pytest.mark.slow
def test_reading_a_store_file_then_exiting_never_aborts(tmp_path):
    """The abort itself: interpreters that read a Parquet file through an fsspec file object aborted at
    exit, often (docs/design-notes.md, note 26). Through `open_for_arrow`, 300 exits in a row are clean."""
    import subprocess
    import sys

    write_table(Store(str(tmp_path), "d").fs, f"{tmp_path}/t.parquet",
                pa.table({"a": list(range(100_000)), "b": [float(i) for i in range(100_000)]}))
    code = ("import fsspec, pyarrow.parquet as pq\nfrom pipeline.store.files import open_for_arrow\n"
            f"with open_for_arrow(fsspec.filesystem('file'), {str(tmp_path / 't.parquet')!r}) as f:\n"
            "    pq.read_table(f, columns=['a'])\n")
    codes = [subprocess.run([sys.executable, "-c", code], capture_output=True).returncode for _ in range(300)]
    assert codes.count(0) == 300, [c for c in codes if c]
