"""How many threads the build's models use: the cores a machine has, shared by the batches it runs at once.

On CPU a worker runs one batch per core by default, each batch's models on one thread. The chain's
networks are small (120x120 and 224x224 crops), and side by side on their own cores two batches keep
the cores busier than one batch whose every convolution is split across both; a batch's decoding,
cropping and Parquet writing then overlap the other's inference too. Figures: docs/benchmarks.md.

torch's intra-op pool is process-wide; ONNX Runtime sizes each session's pool when the session is
made, so the chain's models are loaded per thread count (`labeling.get_chain`). OpenCV's pool (crops,
colour conversion, JPEG encoding) is process-wide too, and gets the same count: two batches each
resizing with a pool of one thread per core crop slower than with one thread each.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import torch

from pipeline.catalog import Execution
from pipeline.settings import available_cores

_LOCK = threading.Lock()
_onnx_threads = 0  # 0: ONNX Runtime's own default, a thread per core


def batches_per_worker(threads_per_worker: int | None, workers: int) -> int:
    """Batches each of `workers` local workers (or the in-process pool) runs at once: `threads_per_worker`
    (the catalog's) when set, else 2 on a GPU (one batch's host work overlaps another's device work) and
    on CPU one per core of the worker's share of the machine."""
    if threads_per_worker:
        return threads_per_worker
    if torch.cuda.is_available():
        return 2
    return max(1, available_cores() // workers)


def model_threads(execution: Execution, *, workers: int | None = None) -> int:
    """Threads per model: the catalog's `model_threads`, else the local cores shared by every batch the
    local workers run at once. A remote cluster's workers have cores of their own: set it there."""
    if execution.model_threads:
        return execution.model_threads
    workers = workers or execution.dask_workers
    return max(1, available_cores() // (workers * batches_per_worker(execution.threads_per_worker, workers)))


def use_model_threads(n: int) -> None:
    """torch's and OpenCV's threads (process-wide) and ONNX Runtime's for the sessions made from now on."""
    global _onnx_threads
    with _LOCK:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        cv2.setNumThreads(n)
        _onnx_threads = n


@contextmanager
def using_model_threads(n: int) -> Iterator[None]:
    """`use_model_threads(n)` for the body, then this process's torch threads as they were (a `rounds`
    run trains on every core after its build)."""
    global _onnx_threads
    torch_before, cv2_before, onnx_before = torch.get_num_threads(), cv2.getNumThreads(), _onnx_threads
    use_model_threads(n)
    try:
        yield
    finally:
        with _LOCK:
            torch.set_num_threads(torch_before)
            cv2.setNumThreads(cv2_before)
            _onnx_threads = onnx_before


def onnx_threads() -> int:
    """The intra-op threads of the next ONNX Runtime session (0: its default)."""
    return _onnx_threads
