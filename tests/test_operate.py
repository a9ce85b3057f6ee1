"""facecurate operated for real: a local Prefect server (started here, on 127.0.0.1, stopped after),
the deployments served by `facecurate serve`, a build run through its deployment, the landed event
starting the retrain deployment by itself, and the report on disk. Asserts on the API's states."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import AFLW_DEV, ROOT, WILD, copy_images, write_catalog

PY = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: _healthy(url), 120, f"the Prefect server ({tmp_path / 'server.log'})")
        yield url
    finally:
        _stop(proc)
        log.close()


def test_serve_build_event_retrain_report(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    wild = copy_images(tmp_path / "src" / "wild", "aflw-wild-crops", WILD[400:404])
    dev = copy_images(tmp_path / "src" / "dev", "aflw2000-dev", AFLW_DEV[10:13], with_mat=True)
    out = tmp_path / "out"
    catalog = write_catalog(tmp_path / "catalog.yaml", [
        {"name": "wild", "kind": "folder", "path": str(wild), "pre_cropped": True},
        {"name": "dev", "kind": "folder", "path": str(dev), "labels": "mat", "split": "eval"}],
        output_root=str(out), extra={
            "schedule": {"cron": "0 3 * * *"},
            "training": {"max_steps": 2, "batch_size": 4, "num_workers": 0, "device": "cpu"}})
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "client-home"),
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_LOGGING_LEVEL": "INFO"}
    serve_log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([PY, "-m", "flows.cli", "serve", "--catalog", str(catalog)], cwd=ROOT, env=env,
                             stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            async_client = get_client(sync_client=True)
            with async_client as client:
                _wait(lambda: _deployment_ids(client), 90, f"the served deployments ({tmp_path / 'serve.log'})")
                assert _wait(lambda: [a for a in client.read_automations() if "landed" in a.name], 30,
                             "the landed trigger's automation")
                # New images land in the source folder, then the scheduled deployment runs (now, not at 03:00).
                copy_images(wild, "aflw-wild-crops", WILD[404:408])
                build_run = run_deployment("build-dataset/build-dataset", timeout=300)
                assert build_run.state.is_completed(), build_run.state
                manifest = json.loads((out / "faces" / "v0001" / "manifest.json").read_text())
                assert manifest["counts"]["images_seen"] == 11

                def retrain_done():
                    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])))
                    bad = [r for r in runs if r.state and r.state.is_final() and not r.state.is_completed()]
                    assert not bad, [(r.name, r.state) for r in bad]
                    return [r for r in runs if r.state and r.state.is_completed()]

                runs = _wait(retrain_done, 240, f"the triggered retrain run ({tmp_path / 'serve.log'})", every_s=2)
                assert len(runs) == 1
                assert runs[0].parameters["resource_id"] == "facecurate.dataset.faces@v1"
                assert runs[0].deployment_id is not None  # started by the trigger, not by us
                first_done = (out / "faces" / "rounds" / "v0001" / "done.json").read_text()
                # The same version again (a duplicate event, a manual rerun): completes, trains nothing.
                again = run_deployment("retrain/retrain", parameters={"dataset_ref": "faces@v1"}, timeout=120)
                assert again.state.is_completed(), again.state
                assert (out / "faces" / "rounds" / "v0001" / "done.json").read_text() == first_done
    finally:
        _stop(serve)
        serve_log.close()

    done = json.loads((out / "faces" / "rounds" / "v0001" / "done.json").read_text())
    assert done["steps"] == 2 and done["faces_scored"] == manifest["counts"]["faces"]
    checkpoints = sorted(p.name for p in (out / "faces" / "rounds" / "v0001" / "checkpoints").glob("step-*.pt"))
    assert checkpoints == ["step-0000002.pt"]
    assert (out / "faces" / "scores" / "v0001-r01.parquet").is_file()
    report = (out / "faces" / "reports" / "faces-v0001.html").read_text()
    assert "id='round-nme'" in report and "id='rounds-table'" in report  # the round's report, not the build's
    assert "worst scored (v0001-r01)" in report
    evaluation = json.loads((out / "faces" / "rounds" / "v0001" / "eval.json").read_text())
    assert evaluation["faces"] == 3


def _deployment_ids(client) -> bool:
    names = {d.name for d in client.read_deployments()}
    return {"build-dataset", "retrain", "report"} <= names
