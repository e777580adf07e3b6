"""Clock and memory readings of one measurement: wall time with the device's queued work included, medians
after a warm-up, and the peak memory of the measuring process."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocator, kernels, lazy inits
    return statistics.median(timed(fn, device) for _ in range(repeats))


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB (2^30 bytes) and GB (10^9 bytes): the process's maximum resident set on CPU,
    the tensors' peak on CUDA."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"peak_memory_gib": peak / 2**30, "peak_memory_gb": peak / 1e9}
