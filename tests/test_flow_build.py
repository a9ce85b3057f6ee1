"""The build-dataset Prefect flow runs its batches on a dask LocalCluster and commits one version."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pipeline.catalog import load_catalog, store_of
from pipeline.store.faces import read_faces
from pipeline.store.layout import list_versions
from tests.conftest import write_catalog


def test_build_flow_on_dask_then_noop(small_catalog, prefect_harness):
    from flows.build import run_build

    first = run_build(str(small_catalog))
    assert first["created"] and first["version"] == 1 and first["processed"] == 11
    second = run_build(str(small_catalog))
    assert not second["created"] and second["version"] == 1 and second["processed"] == 0
    store = store_of(load_catalog(small_catalog))
    faces = read_faces(store, 1, columns=["face_id"]).to_pandas()
    assert faces.face_id.is_unique and len(faces) >= 12


def test_cli_names_every_bad_catalog_field(tmp_path, capsys):
    from flows.cli import main

    bad = tmp_path / "c.yaml"
    bad.write_text("dataset: x\noutput_root: out\nsources: []\ndetectors: {}\n")
    assert main(["build", "--catalog", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "c.yaml: sources: Tuple should have at least 1 item" in err
    assert "c.yaml: detectors.face: Field required" in err
    assert "Traceback" not in err


def test_dask_cuda_without_the_package_is_a_clear_error(tmp_path, capsys):
    """dask-cuda is not installed on the CPU path: asking for it fails before anything starts."""
    import importlib.util

    from flows.cli import main

    if importlib.util.find_spec("dask_cuda") is not None:
        pytest.skip("dask-cuda is installed here: asking for it is not an error")
    path = write_catalog(tmp_path / "c.yaml", [{"name": "s", "kind": "folder", "path": str(tmp_path)}],
                         extra={"execution": {"dask_cuda": True}})
    assert main(["build", "--catalog", str(path)]) == 2
    assert "execution.dask_cuda needs the dask-cuda package" in capsys.readouterr().err


def test_the_flow_stops_on_a_missing_model_file(tmp_path, prefect_harness, capsys):
    """A misspelled weight path fails the flow before any batch (exit 2, the file named, nothing built)."""
    import shutil

    import yaml

    from flows.cli import main
    from tests.conftest import AFLW_DEV, DATA

    scenes = tmp_path / "scenes"
    scenes.mkdir()
    shutil.copy(DATA / "aflw2000-dev" / f"{AFLW_DEV[0]}.jpg", scenes)
    path = write_catalog(tmp_path / "c.yaml", [{"name": "s", "kind": "folder", "path": str(scenes)}],
                         output_root=str(tmp_path / "out"))
    data = yaml.safe_load(path.read_text())
    data["detectors"]["face"]["weights"] = data["detectors"]["face"]["weights"].replace("det_500m", "det_500mm")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["build", "--catalog", str(path)]) == 2
    assert "det_500mm.onnx" in capsys.readouterr().err
    store = store_of(load_catalog(path))
    assert list_versions(store) == [] and not (tmp_path / "out" / "faces" / "_staging").exists()


def test_the_readme_build_in_prefect_ephemeral_mode(small_catalog):
    """`facecurate build` as a new user runs it: no Prefect server configured, so the command starts a
    temporary one itself (`flows.server`, while it loads the models), the batches run on a dask
    LocalCluster of threads that share those models, and the server stops with the command (a server
    left running keeps the output pipe open: the command never returns; seen with `stop` left out)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = str(ROOT)  # the tests' own Prefect home (conftest), so its database is made once
    done = subprocess.run([sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))",
                           "build", "--catalog", str(small_catalog)], cwd=small_catalog.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "built faces@v1: processed 11 images" in done.stdout
    store = store_of(load_catalog(small_catalog))
    faces = read_faces(store, 1, columns=["face_id"]).to_pandas()
    assert faces.face_id.is_unique and len(faces) >= 12
    assert "faces@v1" in (Path(store.dir) / "reports" / "faces-v0001.html").read_text()  # the build's report


_ATTEMPTS: dict[str, int] = {}  # batch key -> times run; module level, so the dask task pickles by reference
_ATTEMPTS_LOCK = threading.Lock()


def _run_flaky_batch(batch) -> str:
    """A batch whose key starts with 'flaky' fails its first try, 'broken' every try."""
    with _ATTEMPTS_LOCK:
        _ATTEMPTS[batch.key] = tries = _ATTEMPTS.get(batch.key, 0) + 1
    if batch.key.startswith("flaky") and tries == 1 or batch.key.startswith("broken"):
        raise RuntimeError(f"batch {batch.key} failed on try {tries}")
    return batch.key


def test_each_batch_runs_once_on_the_flows_dask_cluster_and_a_failure_is_retried_once(prefect_harness):
    """The flow's executor (`flows.build._on_dask`) on a real local cluster: every batch's result comes back
    exactly once, a batch that fails once is run again, and one that fails twice fails the flow with its
    own error."""
    from prefect import flow

    from flows.build import _on_dask
    from flows.runtime import dask_task_runner
    from pipeline.plan import Batch
    from pipeline.sources import SourceItem

    batches = [Batch(key, [SourceItem("s", f"/x/{key}.jpg", 10, "t")]) for key in ("a", "flaky1", "b", "flaky2")]

    @flow(task_runner=dask_task_runner(None, workers=1, processes=False))
    def mapped(batches: list) -> list:
        return _on_dask("d")(_run_flaky_batch, batches)

    _ATTEMPTS.clear()
    assert sorted(mapped(batches)) == ["a", "b", "flaky1", "flaky2"]
    assert _ATTEMPTS == {"a": 1, "flaky1": 2, "b": 1, "flaky2": 2}
    with pytest.raises(RuntimeError, match="batch broken failed on try 2"):
        mapped([Batch("broken", batches[0].items)])


def test_a_one_worker_local_cluster_of_threads_runs_without_multi_worker_housekeeping():
    """The README's layout (one worker, threads of this process) slows the loop's tick and monitors and
    turns off stealing and the memory manager; a cluster of several worker processes keeps dask's own."""
    import dask

    from flows.runtime import dask_task_runner

    keys = ["distributed.admin.tick.interval", "distributed.worker.memory.monitor-interval",
            "distributed.admin.system-monitor.interval", "distributed.scheduler.work-stealing",
            "distributed.scheduler.active-memory-manager.start"]
    try:
        dask.config.refresh()
        defaults = [dask.config.get(k) for k in keys]
        quiet = ["1s", "1s", "5s", False, False]
        assert all(d != q for d, q in zip(defaults, quiet))  # else the test below could not tell them apart
        dask_task_runner(None, workers=2, processes=True)
        assert [dask.config.get(k) for k in keys] == defaults
        dask_task_runner(None, workers=1, processes=False)
        assert [dask.config.get(k) for k in keys] == quiet
    finally:
        dask.config.refresh()  # back to dask's defaults for the tests after this one
