"""Data-parallel training with the standard launcher: ``torchrun --nproc_per_node N -m evl train ...``.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; without them everything here is
a no-op and training runs in one process. NCCL is used on GPUs, gloo on CPUs. Multi-node runs add the
usual rendezvous flags, e.g. on each of two nodes:

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --rdzv_id my-run -m evl train --config k400_b16_8f ...

Every collective here hands the backend tensors on :attr:`DistEnv.collective_device`: NCCL reads and writes
GPU memory only and rejects a CPU tensor, gloo works on the CPU.
"""

from __future__ import annotations

import gc
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "gloo"
    # The device the backend's collectives take their tensors on: this process's GPU for NCCL, the CPU for
    # gloo. With NCCL it is also the device the model and its gradients live on.
    collective_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.collective_device.type != "cpu" and self.collective_device.index is None:
            # NCCL's barrier and DDP need to be told which GPU: "cuda" alone means whichever is current.
            raise ValueError(f"collective_device {self.collective_device} needs an index, e.g. cuda:0")

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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        # Before the group exists: NCCL's object collectives allocate on the *current* CUDA device, which
        # is GPU 0 in every process until it is set (they would all crowd onto it).
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    backend = str(dist.get_backend())
    collective = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, backend, collective)


def device_for(env: DistEnv, requested: torch.device) -> torch.device:
    """Each process drives its own GPU (by LOCAL_RANK); CPU processes share the CPU."""
    if env.enabled and requested.type == "cuda":
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return requested


def rank_seed(seed: int, env: DistEnv) -> int:
    """The seed of this process's own random stream, for the randomness drawn inside the model (dropout).

    Rank 0 keeps ``seed`` itself, so a one-process run draws exactly what it always drew; every other rank
    gets a seed derived from ``(seed, rank)``, so that the ranks draw different dropout masks (identical
    masks on every rank would make N processes no better than one at regularising). What is *not* seeded
    from it: the order of the data and each clip's sampling and augmentation, which come from ``seed`` and
    the stream position in every process (see ``evl.video.dataset``), so the ranks still read disjoint
    shares of one stream, the same stream a one-process run reads.
    """
    if env.rank == 0:
        return seed
    # Drawn from a seed sequence rather than ``seed + rank``, so that rank 1 of a run does not replay
    # rank 0 of the run seeded ``seed + 1``. Below 2**63: any value torch.manual_seed and numpy accept.
    state = np.random.SeedSequence([seed % 2**64, env.rank]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def mean_over_processes(env: DistEnv, value: torch.Tensor) -> float:
    """A one-element ``value`` (the step's loss) averaged over processes, in float64, on any device.

    A non-finite value anywhere makes the result non-finite everywhere, so every process takes the same
    decision to stop or to skip the update.
    """
    if not env.enabled:
        return float(value)
    # A copy on the backend's device: the caller's tensor may live anywhere (a CPU sum of the
    # micro-batches' losses, say), and NCCL refuses a CPU tensor.
    total = value.detach().to(env.collective_device, torch.float64, copy=True)
    dist.all_reduce(total)
    return float(total) / env.world_size


def all_gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` in one process).

    torch pickles the object into a tensor on the group's device; with NCCL that is the *current* CUDA
    device, which :func:`init_distributed` set to this process's GPU.
    """
    if not env.enabled:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(env: DistEnv) -> None:
    """Wait for every process.

    NCCL implements the barrier as an all-reduce of one element on a GPU; without ``device_ids`` it guesses
    the GPU from the rank (and warns), which is another process's GPU on a multi-node or partly used
    machine. gloo needs no device.
    """
    if not env.enabled:
        return
    if env.collective_device.type == "cpu":
        dist.barrier()
    else:
        dist.barrier(device_ids=[env.collective_device.index])


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """``model`` under :class:`DistributedDataParallel` (gradients averaged over processes in backward);
    ``model`` itself in one process. Its parameters must already be on ``env.collective_device``.

    Buffers are not re-broadcast from rank 0 before every forward: the models' buffers (index tables, class
    prompts) are set before training, identically on every rank, and never change during training (no
    batch norm, frozen parts in eval mode), so the broadcast would only cost one collective per step.
    """
    if not env.enabled:
        return model
    devices = {p.device for p in model.parameters() if p.requires_grad}
    if devices != {env.collective_device}:
        # DDP's gradient all-reduce runs on the parameters' device: anywhere else, the backend refuses it.
        raise ValueError(
            f"the trained parameters are on {', '.join(sorted(map(str, devices))) or 'no device'}; "
            f"the {env.backend} collectives of this process take tensors on {env.collective_device}"
        )
    device_ids = [env.collective_device.index] if env.collective_device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **_NO_FORWARD_BUFFER_SYNC)


# Newer torch names "no buffer broadcast before each forward" ``forward_sync_buffers=False`` and warns on
# the older ``broadcast_buffers=False`` (which also skipped the sync at construction).
_NO_FORWARD_BUFFER_SYNC: dict[str, bool] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def shutdown(env: DistEnv) -> None:
    """Leave the process group, once every process is done with it.

    The group's backend threads are stopped here, while the interpreter is whole: whatever still refers to
    the group through a reference cycle (a DDP reducer, a finished work object) is collected first, since
    being torn down later, at interpreter exit, is where a backend's worker thread can abort the process.
    """
    if env.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
