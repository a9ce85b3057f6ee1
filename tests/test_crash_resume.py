"""Builds killed with SIGKILL at random points resume exactly once: after every rerun the final
version holds every face once, no version without a manifest is ever listed, no temp file, staging
folder or lock is left behind. 6 trials in the default run; the long run (20 trials):
    .venv/bin/python -m pytest -q -m slow tests/test_crash_resume.py
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.build import build
from pipeline.catalog import load_catalog, store_of
from pipeline.store.faces import read_faces
from pipeline.store.layout import Store, list_versions
from tests.conftest import ROOT, WILD, copy_images, write_catalog

BUILD = "import sys; from pipeline.build import build; from pipeline.catalog import load_catalog; build(load_catalog(sys.argv[1]))"
N_IMAGES, BATCH = 12, 2


def _markers(out: Path) -> list[Path]:
    return list(out.glob("faces/_staging/*/*.done.json"))


def _check_listing(store: Store, out: Path) -> None:
    """Every listed version is whole; every version folder without a manifest is unlisted."""
    listed = list_versions(store)
    for v in listed:
        assert (out / "faces" / f"v{v:04d}" / "manifest.json").is_file()
    for folder in (out / "faces").glob("v*"):
        if not (folder / "manifest.json").exists():
            assert int(folder.name[1:]) not in listed


def _start_and_kill(path: Path, out: Path, rng: random.Random) -> str:
    """Run a build in a child and SIGKILL it at a random point: after k finished batches plus a random
    delay (which may land in the commit), or (k = -1) while it is still loading models."""
    proc = subprocess.Popen([sys.executable, "-c", BUILD, str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    k = rng.randint(-1, N_IMAGES // BATCH)
    deadline = time.monotonic() + 120
    if k < 0:
        time.sleep(rng.uniform(0.2, 2.0))
    else:
        while len(_markers(out)) < k and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return f"k={k}{' (finished first)' if finished else ''}"


def _trial(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    folder = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[200:200 + N_IMAGES])
    path = write_catalog(tmp_path / "c.yaml", [{"name": "wild", "kind": "folder", "path": str(folder),
                                                "pre_cropped": True}], batch_images=BATCH)
    out = tmp_path / "out"
    store = store_of(load_catalog(path))
    kills = [_start_and_kill(path, out, rng)]
    _check_listing(store, out)
    if rng.random() < 0.5:  # sometimes the resumed build is killed too
        kills.append(_start_and_kill(path, out, rng))
        _check_listing(store, out)

    version, plan = build(load_catalog(path))
    _check_listing(store, out)
    assert list_versions(store) == [1], kills
    faces = read_faces(store, 1, columns=["face_id", "uri"]).to_pandas()
    assert faces.face_id.is_unique and faces.uri.is_unique, kills
    assert sorted(Path(u).name for u in faces.uri) == sorted(WILD[200:200 + N_IMAGES]), kills
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not leftovers, (kills, leftovers)
    staging = out / "faces" / "_staging"
    assert not staging.exists() or not any(staging.iterdir()), kills
    assert not (out / "faces" / ".lock").exists()


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_at_a_random_point_then_rerun_gives_each_face_once(tmp_path, seed):
    _trial(tmp_path, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 120))
def test_sigkill_soak_20_trials(tmp_path, seed):
    _trial(tmp_path, seed)
