"""Data-parallel training with the standard launcher: ``torchrun --nproc_per_node N -m evl train ...``.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; without them everything here is
a no-op and training runs in one process. NCCL is used on GPUs, gloo on CPUs. Multi-node runs add the
usual rendezvous flags, e.g. on each of two nodes:

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --rdzv_id my-run -m evl train --config k400_b16_8f ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group torchrun prepared (once per process); one process: a plain :class:`DistEnv`."""
    if launched_world_size() <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(env: DistEnv, requested: torch.device) -> torch.device:
    """Each process drives its own GPU (by LOCAL_RANK); CPU processes share the CPU."""
    if env.enabled and requested.type == "cuda":
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return requested


def all_gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` in one process)."""
    if not env.enabled:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
