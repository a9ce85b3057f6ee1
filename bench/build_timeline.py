"""Where the README's build spends its wall time: the phases of one `facecurate build`, timed in-process.

Runs the command's own entry point (`flows.cli.main`: the temporary Prefect server, the flow on a dask
LocalCluster) on the bundled catalog into an empty store, with timestamps around its phases: the
server's start, the flow's start, each batch's completion as the flow sees it (its progress update),
the commit, the report. The clock is the command's own (it starts right before the server, which starts before the catalog
is read).

The batch phase (flow start -> last batch done) is what grows with the data; the rest is a fixed cost
per build. The chain's model-bound rate (`bench/model_bound.py`) is measured after the build, in the same
process on the same images (or read from `--model-bound JSON`, a `bench/build_speed.py` output), and
both the batch phase's and the whole build's faces/s are given as shares of it.

The functions are wrapped as their modules are first imported (an import hook), so the command
imports and loads everything itself, after its clock starts, as a cold run does.

Usage: .venv/bin/python bench/build_timeline.py [--model-bound JSON] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import importlib.abc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EVENTS: list[tuple[float, str]] = []


def _wrap(target, attr: str, name: str) -> None:
    """Record `name start` / `name end` around every call of target.attr."""
    fn = getattr(target, attr)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        EVENTS.append((time.perf_counter(), f"{name} start"))
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append((time.perf_counter(), f"{name} end"))

    setattr(target, attr, timed)


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Wraps a module's functions right after the module first runs, wherever it is imported from."""

    def __init__(self, wraps: dict[str, list[tuple[str | None, str, str]]]):
        self.wraps = wraps

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.wraps:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            for owner, attr, name in self.wraps[fullname]:
                _wrap(getattr(module, owner) if owner else module, attr, name)

        spec.loader.exec_module = exec_module
        return spec


def _first(name: str, after: float = 0.0) -> float:
    return min(t for t, n in EVENTS if n == name and t >= after)


def _last(name: str) -> float:
    return max(t for t, n in EVENTS if n == name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-bound", default=None, help="a bench/build_speed.py JSON of the same chain")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    sys.meta_path.insert(0, _WrapOnImport({
        "flows.catalog": [(None, "load_catalog", "catalog")],
        "flows.server": [(None, "temporary_server", "spawn"),  # the command's clock starts right before it
                         ("TemporaryServer", "wait_ready", "server")],
        "pipeline.build": [(None, "commit_version", "commit")],
        "flows.report": [(None, "publish_report", "report")],
        "prefect_dask.client": [("PrefectDaskClient", "submit", "submitted")],  # once per batch task submitted
        "flows.build": [(None, "update_progress_artifact", "batch"),  # once per batch done, as the flow sees it
                        (None, "run_build", "build"),  # the command stops its clock when this returns
                        ("build_dataset", "fn", "flow")],
    }))
    from flows.cli import main as cli

    work = Path(tempfile.mkdtemp(prefix="facecurate-timeline-"))
    catalog = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    catalog["output_root"] = str(work / "store")
    (work / "catalog.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    cli(["build", "--catalog", str(work / "catalog.yaml")])
    done = _last("build end")

    clock = _first("spawn start")  # the command's clock starts right before its server does
    flow = _first("flow start")
    last_batch = _last("batch end")
    from common import emit, header  # after the build: it imports torch, which the command must import itself

    from pipeline.store.faces import read_faces
    from pipeline.store.layout import Store

    faces = read_faces(Store(catalog["output_root"], catalog["dataset"]), None, columns=["face_id"]).num_rows
    result = {**header(), "faces": faces,
              "server_ready_s": _last("server end") - clock,
              "flow_start_s": flow - clock,
              "first_task_submitted_s": _first("submitted end") - clock,
              "tasks_submitted_s": _last("submitted end") - clock,  # the last batch's submission
              "first_batch_done_s": _first("batch end") - clock,
              "last_batch_done_s": last_batch - clock,
              "commit_s": _last("commit end") - _last("commit start"),
              "report_s": _last("report end") - _last("report start"),
              "command_s": done - clock,
              "batch_phase_s": last_batch - flow,
              "batch_phase_faces_per_s": faces / (last_batch - flow),
              "fixed_s": (done - clock) - (last_batch - flow)}
    if args.model_bound:
        bound = json.loads(Path(args.model_bound).read_text())["model_bound_faces_per_s"]
    else:
        from model_bound import model_bound_rate
        from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

        catalog["output_root"] = str(work / "store-model-bound")  # its plan must see every image as new
        (work / "catalog-model-bound.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
        # The command's server is gone: the library's log lines stay off the API (else Prefect's log
        # worker reports, at exit, that it could not send them)
        with temporary_settings(updates={PREFECT_LOGGING_TO_API_ENABLED: False}):
            bound = model_bound_rate(work / "catalog-model-bound.yaml")["model_bound_faces_per_s"]
    if bound:
        result["model_bound_faces_per_s"] = bound
        result["batch_phase_share_of_model_bound"] = result["batch_phase_faces_per_s"] / bound
        result["whole_build_share_of_model_bound"] = faces / (done - clock) / bound
    emit(result, args.json)


if __name__ == "__main__":
    main()
