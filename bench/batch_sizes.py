"""Crops per second of each chain network by batch size, in the build's CPU layout.

Two threads side by side, each with its own batches and one intra-op thread per model (as a build on a
2-core machine runs two batches: `pipeline.threads`), each thread pushing the same 128 random crops
through the network `--batches` sizes at a time; the best of 3 timed passes counts. The networks: the
teacher (3DDFA_V2 mb05, BatchNorm folded) in torch (channels-last) and as the ONNX graph the build
runs on CPU, OpenSeeFace and Peppa in ONNX Runtime, and the verifier's trunk in torch. Random inputs:
these convolutional networks cost the same whatever the pixels. The result is why each model's CPU
default batch is 8-16 (`pipeline.device.resolve_batch_size`). Two runs of the same command can differ
by several percent per batch size on a shared VM: a smaller gap between batch sizes needs the build
itself, alternating (`bench/build_cpu.py`), to decide (docs/benchmarks.md, tenth session).

Usage: .venv/bin/python bench/batch_sizes.py [--batches 4 8 16 32 64 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from common import emit, header

from pipeline.detect import onnx_session
from pipeline.detect.peppa import _dynamic_batch
from pipeline.mobilenet import fused_for_inference, load_teacher_mobilenet
from pipeline.settings import shared_root
from pipeline.threads import use_model_threads
from pipeline.verifier import trunk_maps

CROPS = 128  # per thread


def onnx_runner(model):
    """A session as the build makes one (`onnx_session.session`), under the thread count set in `main`."""
    session = onnx_session.session(model, torch.device("cpu"))
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def torch_runner(fn):
    def run(x):
        with torch.inference_mode():
            fn(torch.from_numpy(x))
    return run


def networks() -> dict:
    """name -> (input side, a factory of one thread's runner)."""
    models = shared_root() / "models"
    teacher = fused_for_inference(load_teacher_mobilenet(models / "3ddfa_v2/mb05_120x120.pth")).eval()
    graph = onnx_session.onnx_graph(teacher, torch.zeros(1, 3, 120, 120))
    return {
        "teacher_torch": (120, lambda: torch_runner(lambda x: teacher(x.contiguous(memory_format=torch.channels_last)))),
        "teacher_onnxruntime": (120, lambda: onnx_runner(graph)),
        "openseeface": (224, lambda: onnx_runner(str(models / "openseeface/lm_model0_opt.onnx"))),
        "peppa68": (160, lambda: onnx_runner(_dynamic_batch(models / "peppa/slim_160_latest.onnx"))),
        "verifier_trunk": (120, lambda: torch_runner(lambda x: trunk_maps(teacher, x))),
    }


def crops_per_second(make_runner, side: int, batch: int) -> float:
    runners = [make_runner(), make_runner()]
    x = np.random.default_rng(0).random((CROPS, 3, side, side), dtype=np.float32)

    def one_thread(run):
        for start in range(0, CROPS, batch):
            run(x[start:start + batch])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one_thread, runners))  # warm-up: lazy set-up, caches
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(one_thread, runners))
            best = min(best, time.perf_counter() - start)
    return 2 * CROPS / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    use_model_threads(1)  # torch's and ONNX Runtime's intra-op threads, as a build's batch sets them
    result = {**header(), "layout": "2 threads side by side x 1 intra-op thread each", "crops_per_thread": CROPS}
    for name, (side, make_runner) in networks().items():
        for batch in args.batches:
            result[f"{name}_batch{batch}_crops_per_s"] = round(crops_per_second(make_runner, side, batch), 1)
            print(f"{name} batch {batch}: {result[f'{name}_batch{batch}_crops_per_s']} crops/s", flush=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
