"""A build killed with SIGKILL part-way resumes: finished batches are reused, every face lands once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import shards
from pipeline.build import build, store_of
from pipeline.catalog import load_catalog
from tests.conftest import ROOT, WILD, copy_images, write_catalog

BUILD = "import sys; from pipeline.build import build; from pipeline.catalog import load_catalog; build(load_catalog(sys.argv[1]))"


def _markers(root: Path) -> list[Path]:
    return list(root.glob("faces/_staging/*/*.done.json"))


@pytest.mark.parametrize("kill_after_batches", [1, 3])
def test_sigkill_mid_build_then_rerun_gives_each_face_once(tmp_path, kill_after_batches):
    folder = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[200:216])
    path = write_catalog(tmp_path / "c.yaml", [{"name": "wild", "kind": "folder", "path": str(folder),
                                                "pre_cropped": True}], batch_images=2)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", BUILD, str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_markers(out)) < kill_after_batches and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"build finished before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(_markers(out))
    assert done_before >= kill_after_batches
    store = store_of(load_catalog(path))
    assert shards.list_versions(store) == []  # nothing half-committed is visible

    version, plan = build(load_catalog(path))
    assert version == 1 and plan.new_items == 16
    faces = shards.read_faces(store, 1, columns=["face_id", "uri"]).to_pandas()
    assert faces.face_id.is_unique and faces.uri.is_unique
    assert sorted(Path(u).name for u in faces.uri) == sorted(WILD[200:216])
    assert not list(out.rglob("*.tmp-*")) and not (out / "faces" / "_staging").exists() or \
        not any((out / "faces" / "_staging").iterdir())
    assert not (out / "faces" / ".lock").exists()
