"""Per-stage seconds of a build (`facecurate build --profile`, the manifest's `timings`).

Each batch fills its own dict of stage -> seconds; the commit sums the batches'. On the GPU path a
stage's time holds its device work only where the stage waits for it (most copy results back)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


@contextmanager
def stage(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the wall time of the `with` body to `timings[name]` (nothing when timings is None)."""
    if timings is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def summed(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Stage seconds summed over batches, stages in the order they first appear. With several workers
    the sum is worker time, more than the build's wall time."""
    out: dict[str, float] = {}
    for part in parts:
        for name, seconds in part.items():
            out[name] = out.get(name, 0.0) + seconds
    return out


def format_timings(seconds: dict[str, float], faces: int) -> str:
    """One line per stage: seconds and faces per second of that stage alone."""
    lines = [f"{'stage':<22}{'seconds':>10}{'faces/s':>10}"]
    for name, s in seconds.items():
        rate = f"{faces / s:10.1f}" if s > 0 and faces else f"{'-':>10}"
        lines.append(f"{name:<22}{s:10.2f}{rate}")
    lines.append(f"{'total':<22}{sum(seconds.values()):10.2f}")
    return "\n".join(lines)
