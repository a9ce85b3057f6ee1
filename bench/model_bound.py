"""The chain's model-bound rate: its networks' forward passes alone, on the build's own inputs.

The catalog's images are read, decoded and labelled batch by batch exactly as a build does it, while
every network call is recorded with its inputs: ONNX Runtime sessions (the detector, Peppa,
OpenSeeFace), the teacher's network (its pass and its mirrored pass), and the verifier's trunk and head.
The recorded calls are then replayed alone, timed, with as many batches side by side as a build on
this machine runs (`pipeline.threads`). Everything else a build does (decoding, cropping, fusion,
features, Parquet, the commit, the report) costs nothing in this rate: it is the ceiling.

Usage (alone): .venv/bin/python bench/model_bound.py [--catalog catalog.yaml] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import onnxruntime as ort
import torch
import yaml
from common import emit, header

import pipeline.verifier as verifier_module
from pipeline.batch import decode_items, label_items, read_items
from pipeline.catalog import load_catalog
from pipeline.labeling import get_chain
from pipeline.memory import keep_freed_memory
from pipeline.plan import plan_build
from pipeline.sources import TarReader
from pipeline.threads import batches_per_worker, model_threads, using_model_threads


class Recorder:
    """Network calls of the chain, each as (model name, function, args, kwargs)."""

    def __init__(self, chain) -> None:
        self.calls: list[tuple[str, object, tuple, dict]] = []
        self.session_names = {}
        models = [("detect", chain.face_detector), *((m.name, m) for m in chain.landmarkers)]
        for name, model in models:
            for holder in (model, getattr(model, "_run", None), getattr(model, "model", None)):
                if holder is not None and getattr(holder, "session", None) is not None:
                    self.session_names[id(holder.session)] = name
        self.nets = [(name, m.net) for name, m in models if isinstance(getattr(m, "net", None), torch.nn.Module)]

    @contextmanager
    def recording(self):
        run, trunk, head = ort.InferenceSession.run, verifier_module.trunk_maps, verifier_module.predict_points

        def session_run(session, *args, **kwargs):
            # The detector's sessions are insightface's own, one per input size, made on first use.
            self.calls.append((self.session_names.get(id(session), "detect"), run, (session, *args), kwargs))
            return run(session, *args, **kwargs)

        def wrap(name, fn):
            def recorded(*args, **kwargs):
                self.calls.append((name, fn, args, kwargs))
                return fn(*args, **kwargs)
            return recorded

        hooks = [net.register_forward_pre_hook(lambda m, args, name=name: self.calls.append((name, m, args, {})))
                 for name, net in self.nets]
        ort.InferenceSession.run = session_run
        verifier_module.trunk_maps = wrap("verifier", trunk)
        verifier_module.predict_points = wrap("verifier", head)
        try:
            yield
        finally:
            ort.InferenceSession.run, verifier_module.trunk_maps, verifier_module.predict_points = run, trunk, head
            for h in hooks:
                h.remove()


def replay(calls: list) -> dict[str, float]:
    """Each recorded call again, alone: seconds per model."""
    seconds: dict[str, float] = defaultdict(float)
    with torch.inference_mode():
        for name, fn, args, kwargs in calls:
            start = time.perf_counter()
            fn(*args, **kwargs)
            seconds[name] += time.perf_counter() - start
    return seconds


def model_bound_rate(catalog_path, repeats: int = 2) -> dict:
    """Each group of side-by-side batches is replayed `repeats` times and its fastest replay counts: the
    ceiling is the best the networks did, as a build's rate is the best of its repeats."""
    catalog = load_catalog(catalog_path)
    ex = catalog.execution
    side_by_side, threads = batches_per_worker(ex.threads_per_worker, ex.dask_workers), model_threads(ex)
    per_model: dict[str, float] = defaultdict(float)
    faces, wall = 0, 0.0
    keep_freed_memory()  # the allocator every batch of a build runs with (pipeline.batch.process_batch)
    with using_model_threads(threads), ThreadPoolExecutor(side_by_side) as pool:
        chain = get_chain(catalog.detectors)
        recorder = Recorder(chain)
        batches = plan_build(catalog).batches
        for start in range(0, len(batches), side_by_side):
            groups = []
            for batch in batches[start:start + side_by_side]:
                recorder.calls = []
                read, _ = read_items(batch.items, catalog, TarReader())
                decoded, _ = decode_items(read, catalog)
                with recorder.recording():
                    labelled, _ = label_items(chain, catalog, decoded)
                faces += sum(len(f) for _, f in labelled)
                groups.append(recorder.calls)
            best_wall, best_seconds = float("inf"), []
            for _ in range(repeats):
                began = time.perf_counter()
                seconds = list(pool.map(replay, groups))
                if time.perf_counter() - began < best_wall:
                    best_wall, best_seconds = time.perf_counter() - began, seconds
            wall += best_wall
            for per_batch in best_seconds:
                for name, s in per_batch.items():
                    per_model[name] += s
    return {"model_bound_layout": f"{side_by_side} batches side by side x {threads} threads each",
            "model_bound_repeats": repeats,
            "model_bound_faces": faces, "model_bound_seconds": wall, "model_bound_faces_per_s": faces / wall,
            **{f"model_seconds_{name}": s for name, s in per_model.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--catalog", default="catalog.yaml")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    # The catalog's sources, planned against an empty store: every image is new.
    data = yaml.safe_load(Path(args.catalog).read_text())
    folder = Path(args.catalog).resolve().parent
    data["sources"] = [{**s, "path": str(folder / s["path"]) if "${" not in s["path"] else s["path"]}
                       for s in data["sources"]]
    data["output_root"] = tempfile.mkdtemp(prefix="facecurate-model-bound-")
    catalog = Path(data["output_root"]) / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(data, sort_keys=False))
    emit({**header(), **model_bound_rate(catalog)}, args.json)


if __name__ == "__main__":
    main()
