"""One function over many files, in worker processes, with a progress bar; results in input order.

Probing and re-encoding videos is CPU work in FFmpeg, one file at a time: processes, not threads, spread it
over the cores. Workers are started by fork on Linux (no re-import of ``__main__``, which fails for scripts
read from stdin) and by spawn elsewhere; the function they run must be defined at module level.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

from tqdm import tqdm

__all__ = ["default_workers", "map_in_processes"]

Item = TypeVar("Item")
Result = TypeVar("Result")


def default_workers() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def map_in_processes(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    workers: int,
    progress: bool = True,
    desc: str | None = None,
    unit: str = "video",
) -> list[Result]:
    """``[function(item) for item in items]``, run by ``workers`` processes (in this one for 1).

    Results come back in the order of ``items`` whatever order the workers finish in; the progress bar
    advances as each one finishes.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    items = list(items)
    if workers == 1 or len(items) <= 1:
        return [function(item) for item in tqdm(items, desc=desc, unit=unit, disable=not progress)]
    results: list = [None] * len(items)
    # The pool starts before the progress bar's monitor thread, so no thread is live when it forks.
    with _pool_context().Pool(min(workers, len(items))) as pool:
        finished = pool.imap_unordered(_IndexedCall(function), enumerate(items))
        for index, result in tqdm(finished, total=len(items), desc=desc, unit=unit, disable=not progress):
            results[index] = result
    return results


class _IndexedCall:
    """``(index, item) -> (index, function(item))``: a picklable wrapper that lets results be reordered."""

    def __init__(self, function: Callable) -> None:
        self.function = function

    def __call__(self, indexed: tuple[int, object]) -> tuple[int, object]:
        index, item = indexed
        return index, self.function(item)


def _pool_context() -> multiprocessing.context.BaseContext:
    # Fork is safe here: workers only run FFmpeg through PyAV and NumPy, never torch.
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
