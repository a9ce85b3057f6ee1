"""What every bench script shares: best-of-N timing, a device line, printing and JSON output."""

from __future__ import annotations

import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch


def timed(fn, repeats: int = 2) -> tuple[float, object]:
    """Best wall time of `repeats` calls (the first run often pays for lazy set-up) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def header() -> dict:
    gpu = f"cuda {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}"}


def emit(result: dict, json_path: str | None) -> None:
    for k, v in result.items():
        print(f"{k:>28}: {v:.2f}" if isinstance(v, float) else f"{k:>28}: {v}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
