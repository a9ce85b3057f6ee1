"""Where the README build's CPU goes: each thread's and the temporary server's CPU seconds, and the
networks' share of the batch threads'.

Runs the command's own entry point (`flows.cli.main`: the temporary Prefect server, the flow on a dask
LocalCluster) on the bundled catalog into an empty store. Every network call is timed in CPU seconds of
its own thread (`time.thread_time`): ONNX Runtime sessions (detector, teacher, Peppa, OpenSeeFace) and
the outermost torch module calls (the verifier). A sampler thread reads every thread's CPU seconds from
/proc four times a second, by their Python names, and the temporary server's process as a whole, so
threads that end before the command does still count. torch and onnxruntime are imported before the
clock starts (the timing wraps them); the command's other imports are on it.

What it answers: on a machine with `cores` cores the command could spend `cores x wall` CPU seconds.
Those split into the networks (the model-bound part), everything else the batch threads do (crops,
decoding, heatmaps, fusion, Parquet, Prefect's task engine), the main thread (imports, model loading,
the flow engine, commit, report), the server process, the other threads, and idle.

With `--in-process` the same build runs without Prefect or dask (`flows.inprocess`): the difference is
what the orchestration costs.

Linux only (/proc). Usage: .venv/bin/python bench/build_cpu.py [--in-process] [--photos N] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort
import torch
from build_speed import bench_catalog
from common import emit, header

TICKS = os.sysconf("SC_CLK_TCK")


class NetworkClock:
    """CPU seconds of every network call in the batch threads, by model, in the calling thread's own CPU
    time; calls in any other thread (a model check at start) are summed apart."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.elsewhere = 0.0
        self.lock = threading.Lock()
        self.depth = threading.local()

    def add(self, name: str, began: float) -> None:
        spent = time.thread_time() - began
        with self.lock:
            if _role(threading.current_thread().name) == "batch threads":
                self.seconds[name] += spent
            else:
                self.elsewhere += spent

    def install(self) -> None:
        run = ort.InferenceSession.run

        def timed_run(session, *args, **kwargs):
            began = time.thread_time()
            try:
                return run(session, *args, **kwargs)
            finally:
                self.add(f"onnxruntime {_input_shape(session)}", began)

        ort.InferenceSession.run = timed_run

        def pre(module, args):  # only the outermost module call of a thread counts
            depth = getattr(self.depth, "n", 0)
            self.depth.n = depth + 1
            if depth == 0:
                self.depth.began = time.thread_time()

        def post(module, args, out):
            self.depth.n -= 1
            if self.depth.n == 0:
                self.add(f"torch {type(module).__name__}", self.depth.began)

        torch.nn.modules.module.register_module_forward_pre_hook(pre)
        torch.nn.modules.module.register_module_forward_hook(post)


def _input_shape(session) -> str:
    """A session's name in the table: its input's shape says which network it is."""
    return "x".join(str(d) for d in session.get_inputs()[0].shape)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _thread_cpu(pid: int) -> dict[int, float]:
    cpu = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu[int(task.name)] = _cpu(task / "stat")
        except OSError:
            pass
    return cpu


class CpuSampler(threading.Thread):
    """The last CPU seconds seen of each thread of this process, by Python thread name, and of each
    child process (the temporary server), until `stop()`."""

    def __init__(self, period_s: float = 0.25) -> None:
        super().__init__(daemon=True, name="cpu-sampler")
        self.period_s, self.done = period_s, threading.Event()
        self.threads: dict[int, tuple[str, float]] = {}
        self.children: dict[int, float] = {}
        self.at_start = _thread_cpu(os.getpid())

    def sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for tid, cpu in _thread_cpu(os.getpid()).items():
            name = names.get(tid) or self.threads.get(tid, ("?", 0.0))[0]
            self.threads[tid] = (name, cpu - self.at_start.get(tid, 0.0))
        for child in _children(os.getpid()):
            try:
                self.children[child] = _cpu(Path(f"/proc/{child}/stat"))  # its ended threads too
            except OSError:
                pass

    def run(self) -> None:
        while not self.done.wait(self.period_s):
            self.sample()

    def stop(self) -> None:
        self.sample()
        self.done.set()
        self.join()


def _role(name: str) -> str:
    if name == "MainThread":
        return "main thread"
    if "Dask-Default-Threads" in name or name.startswith("ThreadPoolExecutor"):  # dask's or `--in-process`'s
        return "batch threads"
    if name == "cpu-sampler":
        return "this bench's sampler"
    return "other threads"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--in-process", action="store_true", help="the build without Prefect or dask")
    parser.add_argument("--photos", type=int, default=None, help="N synthetic 1920x1080 photos instead of the "
                        "bundled sources (bench/build_speed.py's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    networks = NetworkClock()
    networks.install()
    from flows.cli import main as cli

    catalog = bench_catalog(Path(tempfile.mkdtemp(prefix="facecurate-cpu-")), "cpu", None, args.photos)
    sampler = CpuSampler()
    sampler.start()
    began = time.perf_counter()
    cli(["build", "--catalog", str(catalog), *(["--in-process"] if args.in_process else [])])
    wall = time.perf_counter() - began
    sampler.stop()

    cores = len(os.sched_getaffinity(0))
    by_role: dict[str, float] = defaultdict(float)
    for name, cpu in sampler.threads.values():
        by_role[_role(name)] += cpu
    by_role["temporary server"] = sum(sampler.children.values())
    network_s = sum(networks.seconds.values())
    by_role["batch threads, networks"] = network_s
    by_role["batch threads, the rest"] = by_role.pop("batch threads") - network_s
    available = cores * wall
    result = {**header(), "build": "in process" if args.in_process else "flow", "photos": args.photos,
              "cores": cores, "command_s": wall, "available_cpu_s": available,
              **{f"cpu_s {role}": s for role, s in sorted(by_role.items())},
              "cpu_s idle": available - sum(by_role.values()),
              **{f"share {role}": s / available for role, s in sorted(by_role.items())},
              "share idle": (available - sum(by_role.values())) / available,
              **{f"network_cpu_s {name}": s for name, s in sorted(networks.seconds.items(), key=lambda kv: -kv[1])},
              "network_cpu_s outside the batch threads": networks.elsewhere}
    emit(result, args.json)


if __name__ == "__main__":
    main()
