"""One measurement in a fresh process, so that its peak memory is its own and a crash is reported, not fatal.

The child is started with the spawn method, which pickles its entry point by name: :func:`_child` stays a
module-level function of this module.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
from typing import Any

import torch

from evl.bench.config import BenchConfig, resolve_device
from evl.bench.measures import MEASUREMENTS
from evl.runtime import tune_cpu_allocator


def _child(queue: mp.Queue, name: str, bench: BenchConfig, kwargs: dict[str, Any]) -> None:
    try:
        if bench.allocator:
            tune_cpu_allocator()
        if bench.threads:
            torch.set_num_threads(bench.threads)
        torch.manual_seed(0)
        result = MEASUREMENTS[name](bench, resolve_device(bench.device), **kwargs)
        queue.put(("ok", result))
    except Exception as err:  # reported in the JSON rather than lost with the child process
        queue.put(("error", f"{type(err).__name__}: {err}"))


def run_isolated(name: str, bench: BenchConfig, **kwargs: Any) -> dict[str, Any]:
    """One measurement in a fresh process: its peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, name, bench, kwargs))
    process.start()
    while True:  # a child killed by the system (out of memory) never reports: watch it as well
        try:
            status, result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive() and queue.empty():
                process.join()
                return {"error": f"measurement process ended without a result (exit code {process.exitcode})"}
    process.join()
    if status != "ok":
        return {"error": result}
    return result
