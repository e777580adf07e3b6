"""Process-level settings that make CPU training and inference faster.

glibc's malloc serves every block above its mmap threshold (dynamic, from 128 KiB) with a fresh ``mmap``
and gives it back with ``munmap`` when freed. A forward/backward pass allocates and frees many tensors of
a few MiB, so each step pays for page faults and zero-filling of memory it just returned: measured on a
2-core machine, the EVL decoder step of ViT-B/16 took 0.4-2.5 s with the defaults and 0.19 s once freed
blocks stay in the heap for reuse. :func:`tune_cpu_allocator` raises the mmap threshold to its maximum
(32 MiB), stops trimming the heap and keeps one heap for all threads. Peak memory stays about the same
(freed blocks are reused); memory freed after the peak is kept by the process instead of returned.

The ``evl`` command line calls it at start-up; a program using the library can call it itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems
_TRIM_THRESHOLD = 2**31

_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the heap for reuse (glibc only). Returns whether the settings took effect."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # musl and other libcs have no mallopt
        return False
    _tuned = all(
        libc.mallopt(option, value)
        for option, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            # One heap for all threads: per-thread heaps each keep their own freed blocks.
            (_M_ARENA_MAX, 1),
        )
    )
    return _tuned
