"""Data-loader settings that depend on the machine: how many worker processes, and whether to pin memory.

Decoding and augmenting video is CPU work that runs beside the model in worker processes. How many the
machine can feed depends on its usable cores and on how many processes of one node share them (torchrun
starts one per GPU); the rest of the loader's settings belong to its caller (batching, order, collation).
"""

from __future__ import annotations

import os
from typing import Any

import torch

# More workers than this rarely decode faster (a batch is ready before the model asks for it) and each one
# holds its own prefetched batches and decoder buffers in host memory.
MAX_WORKERS_PER_PROCESS = 8


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the platform has one (a job scheduler or
    ``taskset`` may grant fewer cores than the machine has), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def processes_per_node() -> int:
    """Processes sharing this node's CPUs: torchrun's LOCAL_WORLD_SIZE, 1 when not launched by it."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_num_workers(processes_per_node: int = 1) -> int:
    """Data-loader workers per process: the usable CPUs shared between the node's processes, less one core
    for the process itself (it collates, copies to the device and launches the model), at most
    :data:`MAX_WORKERS_PER_PROCESS`, never below 0 (0 loads in the main process)."""
    share = usable_cpus() // max(1, processes_per_node)
    return max(0, min(MAX_WORKERS_PER_PROCESS, share - 1))


def loader_options(device: torch.device, num_workers: int | None) -> dict[str, Any]:
    """The :class:`~torch.utils.data.DataLoader` keyword arguments that depend on the machine.

    ``num_workers`` None: :func:`default_num_workers` for this node's processes. Batches are pinned for a
    CUDA device, so that ``.to(device, non_blocking=True)`` copies them asynchronously by DMA.
    """
    if num_workers is None:
        num_workers = default_num_workers(processes_per_node())
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    # persistent_workers and prefetch_factor keep their defaults: every loader here is iterated once (a
    # training stream, one evaluation pass), so workers kept alive after it would only hold memory, and the
    # default of two batches ahead per worker already hides the decoding time behind the model's.
    return {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
