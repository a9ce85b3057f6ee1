"""The build's allocator setting (`pipeline.memory`): freed batch memory is reused, not faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Two threads allocate and free arrays of 0.2-28 MB in a shuffled order, like two batches' crops and
# activations; the script prints the minor page faults it caused.
WORKLOAD = """
import resource, sys, threading
import numpy as np
if sys.argv[1] == "keep":
    from pipeline.memory import keep_freed_memory
    assert keep_freed_memory(), "glibc's mallopt refused a setting"
def batch(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        held = []
        for n in rng.integers(50_000, 7_000_000, 12):
            held.append(np.ones((int(n),), np.float32))
            if len(held) > 3:
                held.pop(int(rng.integers(0, len(held))))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
workers = [threading.Thread(target=batch, args=(k,)) for k in range(2)]
[w.start() for w in workers]
[w.join() for w in workers]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", WORKLOAD, mode], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """docs/benchmarks.md has this workload's faults with glibc's defaults and with the setting (about
    8x fewer). The bound, a third, leaves room for allocator versions: the setting must remove most
    faults. Seen failing with the thresholds left at glibc's 128 KiB."""
    default, kept = _faults("default"), _faults("keep")
    assert kept < default / 3, (default, kept)
