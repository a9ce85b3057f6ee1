"""Faults end to end: HTTP sources that misbehave, a disk that fills, two builds at once, a training
run killed mid-epoch, paths that try to leave the output root, pickles where data should be."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.build import build
from pipeline.catalog import CatalogError, load_catalog, parse_catalog, store_of
from pipeline.store.faces import read_faces, read_side_table
from pipeline.store.layout import Store, list_versions, parse_ref
from tests.badfiles import face_jpeg
from tests.conftest import ROOT, WILD, copy_images, write_catalog
from tests.http_server import LocalServer

HTTP_FAULTS = {  # route -> the quarantine reason it must end in
    "/404": "HTTP 404", "/500": "fetch failed", "/loop": "redirect loop", "/huge": "too large",
    "/huge-chunked": "too large", "/truncated": "fetch failed", "/reset": "fetch failed",
    "/slow": None, "/html": "not an image",
}


def test_http_faults_in_a_build_end_in_quarantine_rows(tmp_path):
    with LocalServer(face_jpeg()) as server:
        urls = [f"{server.url}/ok/a.jpg", f"{server.url}/flaky", f"{server.url}/429"]
        urls += [server.url + route for route in HTTP_FAULTS]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        catalog = load_catalog(write_catalog(tmp_path / "c.yaml", [
            {"name": "web", "kind": "urls", "path": str(tmp_path / "urls.txt"), "timeout_s": 1.0, "retries": 2,
             "backoff_s": 0.05, "max_bytes": 2_000_000}], output_root=str(tmp_path / "out")))
        started = time.monotonic()
        version, _ = build(catalog)
        assert time.monotonic() - started < 90  # bounded retries and timeouts: no hang
    store = store_of(catalog)
    quarantine = read_side_table(store, version, "quarantine").to_pandas().set_index("uri")
    for route, reason in HTTP_FAULTS.items():
        row = quarantine.loc[server.url + route]
        assert row.reason == reason if reason else row.reason, (route, row.reason)
    # The three good URLs (one served after two 503s, one after a 429) serve the same bytes: one
    # image, one face; the other two are recorded as duplicates of it, not lost and not quarantined.
    faces = read_faces(store, version, columns=["uri"]).to_pandas()
    assert len(faces) == 1 and faces.uri[0] in urls[:3]
    images = read_side_table(store, version, "images").to_pandas().set_index("uri")
    assert sorted(images.loc[urls[:3]].status) == ["duplicate", "duplicate", "ok"]


class FullDisk(MemoryFileSystem):
    """An in-memory filesystem that fails writes with ENOSPC once `budget` bytes were written."""

    protocol = "fulldisk"
    store: dict = {}
    pseudo_dirs = [""]
    budget = float("inf")
    written = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode or "a" in mode:
            write = f.write

            def limited(data):
                FullDisk.written += len(data)
                if FullDisk.written > FullDisk.budget:
                    raise OSError(errno.ENOSPC, "No space left on device", path)
                return write(data)

            f.write = limited
        return f


def test_a_full_disk_keeps_the_previous_version_and_says_so(tmp_path):
    import fsspec

    fsspec.register_implementation("fulldisk", FullDisk, clobber=True)
    folder = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[500:504])
    catalog = load_catalog(write_catalog(tmp_path / "c.yaml", [
        {"name": "wild", "kind": "folder", "path": str(folder), "pre_cropped": True}],
        output_root="fulldisk://out", batch_images=2))
    store = store_of(catalog)
    assert build(catalog)[0] == 1
    v1 = read_faces(store, 1)
    copy_images(folder, "aflw-wild-crops", WILD[504:508])
    FullDisk.written, FullDisk.budget = 0, 60_000  # room for a part file or two, not for the version
    try:
        with pytest.raises(OSError) as err:
            build(catalog)
    finally:
        FullDisk.budget = float("inf")
    assert err.value.errno == errno.ENOSPC and "out/faces" in str(err.value)  # says what and where
    assert list_versions(store) == [1]
    assert read_faces(store, 1).equals(v1)  # the previous version is intact
    assert not store.fs.exists(f"{store.dir}/.lock")
    assert build(catalog)[0] == 2  # with room again, the build resumes
    assert len(read_faces(store, 2)) == 8


def test_two_builds_at_once_never_collide(tmp_path):
    from pipeline.store.lock import LockedError

    folder = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[520:532])
    path = write_catalog(tmp_path / "c.yaml", [{"name": "wild", "kind": "folder", "path": str(folder),
                                                "pre_cropped": True}], output_root=str(tmp_path / "out"),
                         batch_images=2)
    code = "import sys; from pipeline.build import build; from pipeline.catalog import load_catalog; " \
           "print(build(load_catalog(sys.argv[1]))[0])"
    first = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE)
    lock = tmp_path / "out" / "faces" / ".lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.exists()
    with pytest.raises(LockedError, match="locked .* by another process"):
        build(load_catalog(path))  # a second builder fails at once with a clear message...
    version, _ = build(load_catalog(path), lock_wait_s=120)  # ...or waits its turn
    assert first.wait(timeout=120) == 0 and first.stdout.read().strip() == b"1"
    assert version == 1  # it found nothing new: one version, never two for the same images
    assert list_versions(store_of(load_catalog(path))) == [1]


def test_training_killed_mid_epoch_resumes_on_the_same_curve(tmp_path):
    """SIGKILL a `facecurate train` after its step-4 checkpoint; `--resume` continues: the same steps,
    optimizer state and RNG, so loss log and weights match an uninterrupted run."""
    from trainer.checkpoint import load_checkpoint

    folder = copy_images(tmp_path / "wild", "aflw-wild-crops", WILD[540:564])
    path = write_catalog(tmp_path / "c.yaml", [{"name": "wild", "kind": "folder", "path": str(folder),
                                                "pre_cropped": True}], output_root=str(tmp_path / "out"))
    build(load_catalog(path))
    config = tmp_path / "train.yaml"
    config.write_text("checkpoint_every: 2\nlog_every: 1\nnum_workers: 0\ndevice: cpu\nseed: 7\n")
    common = ["-m", "flows.cli", "train", "--catalog", str(path), "--dataset", "faces@v1", "--config", str(config),
              "--max-steps", "9", "--batch-size", "4"]  # 24 faces: 6 batches an epoch, so it dies mid-epoch 1
    straight = subprocess.run([sys.executable, *common, "--checkpoint-dir", str(tmp_path / "a")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, *common, "--checkpoint-dir", str(tmp_path / "b")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = tmp_path / "b" / "step-0000008.pt.sha256"
    deadline = time.monotonic() + 300
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([sys.executable, *common, "--checkpoint-dir", str(tmp_path / "b"), "--resume"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def log(d):
        return [json.loads(line) for line in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]

    a, b = log("a"), log("b")
    assert [r["step"] for r in b] == list(range(1, 10))  # no step lost, none twice
    for ra, rb in zip(a, b):
        assert rb["epoch"] == ra["epoch"]
        assert rb["total"] == pytest.approx(ra["total"], rel=1e-4, abs=1e-6), (ra["step"], ra["total"], rb["total"])
    wa = load_checkpoint(tmp_path / "a" / "step-0000009.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "step-0000009.pt")["model"]
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=1e-4, msg=key)


def test_output_paths_cannot_escape_the_root(tmp_path):
    base = {"dataset": "faces", "output_root": str(tmp_path), "sources": [{"name": "s", "kind": "folder",
            "path": str(tmp_path)}], "detectors": {"face": {"name": "scrfd", "weights": "/x.onnx"},
                                                    "landmarkers": [{"name": "peppa68", "weights": "/y.onnx"}]}}
    for name in ("../evil", "a/b", ".hidden", "/abs"):
        with pytest.raises(CatalogError, match="dataset"):
            parse_catalog({**base, "dataset": name})
    for ref in ("../x@v1", "a/b"):
        with pytest.raises(ValueError, match="dataset names"):
            parse_ref(ref)
    with pytest.raises(ValueError, match="leave the output root"):
        Store(str(tmp_path), "..")


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/facecurate-pwned",))


def test_pickled_code_is_never_loaded(tmp_path):
    """Param stats are the one pickle we read: only numpy arrays may come out of it. Checkpoints and
    weights go through torch.load(weights_only=True), which refuses code as well."""
    from pipeline.bfm import _ArraysOnly
    from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    evil = pickle.dumps({"mean": _Boom(), "std": np.ones(62)})
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        _ArraysOnly(io.BytesIO(evil)).load()
    ok = pickle.dumps({"mean": np.zeros(62, np.float32), "std": np.ones(62, np.float32)})
    assert _ArraysOnly(io.BytesIO(ok)).load()["std"].shape == (62,)

    path = tmp_path / "step-0000001.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "step": 1})
    torch.save({"model": _Boom()}, path)  # replaced after its digest was recorded
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)
    (tmp_path / "step-0000001.pt.sha256").write_text(
        __import__("hashlib").sha256(path.read_bytes()).hexdigest() + "  step-0000001.pt\n")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_checkpoint(path)  # even with a matching digest: weights_only refuses the code
    assert not os.path.exists("/tmp/facecurate-pwned")
