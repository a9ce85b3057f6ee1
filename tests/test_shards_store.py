"""The store: writes are atomic, versions without a manifest do not exist, one writer at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline import shards
from pipeline.shards import DatasetLock, LockedError, Store, parse_ref, write_atomic, write_table


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
    assert shards.list_versions(store) == [1, 3]
    assert shards.latest_version(store) == 3
    with pytest.raises(FileNotFoundError, match="d@v2 does not exist"):
        shards.resolve_version(store, 2)


def test_write_table_round_trip_and_entry(tmp_path):
    store = Store(str(tmp_path), "d")
    table = pa.Table.from_pylist([{"face_id": "a:0", "round": 1, "model_sha256": "x", "cycle_error": 1.5,
                                   "critic_score": 0.2, "landmark_residual": 3.0, "new_weight": 0.5}],
                                 schema=shards.SCORES_SCHEMA)
    entry = write_table(store.fs, f"{tmp_path}/x/scores.parquet", table)
    assert entry["rows"] == 1 and len(entry["sha256"]) == 64
    assert shards.sha256_bytes((tmp_path / "x" / "scores.parquet").read_bytes()) == entry["sha256"]
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["scores.parquet"]  # no temp file left


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
    scores = shards.SCORES_SCHEMA.empty_table()
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
    write_atomic(fs, f"{store.version_dir(1)}/{shards.MANIFEST}", b"{}")
    assert sorted(store.version_dirs()) == [1, 2]
    assert shards.list_versions(store) == [1]
    write_atomic(fs, f"{store.staging_dir('p0001-abc')}/x.done.json", b"{}")
    assert list(store.staging_dirs()) == ["p0001-abc"]
