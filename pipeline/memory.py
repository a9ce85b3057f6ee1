"""glibc's allocator, told to keep what a batch frees for the next batch instead of returning it.

By default glibc serves large blocks (a batch's images, crops, activations) with their own mmap and
unmaps them on free, and trims the heap's free top, so the next batch page-faults the same memory in
again, zeroed by the kernel. A fixed mmap threshold of 32 MiB (glibc's ceiling for it) and a high trim
threshold keep those blocks in the heap for reuse. Figures (page faults, kernel time):
docs/benchmarks.md ('The bundled build against c679b14').
"""

from __future__ import annotations

import ctypes
import sys
import threading

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

_LOCK = threading.Lock()
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set this process's allocator as above, once; False where it is not glibc's (musl, macOS,
    Windows), which are left as they are."""
    global _applied
    with _LOCK:
        if _applied is None:
            _applied = _set_glibc_thresholds()
        return _applied


def _set_glibc_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it: musl's mallopt ignores these
    except (OSError, AttributeError):
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
