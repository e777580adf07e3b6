"""A process group that records what its collectives receive: a distributed world in one process.

:class:`RecordingProcessGroup` is rank 0 of a world of ``world_size`` ranks; the other ranks are imagined
and hold the same tensors as this one (or what ``peer`` says they hold), so an all-reduce sum doubles a
tensor in a world of two and an all-gather repeats it. Every tensor a collective receives is recorded as a
:class:`Call` (collective, device, dtype), and, like NCCL with a CPU tensor, the group refuses any tensor
that is not on the one device it works on.

It is a Python subclass of ``torch.distributed.ProcessGroup``: torch routes ``dist.all_reduce``,
``dist.all_gather_object``, ``dist.barrier`` and ``DistributedDataParallel``'s collectives to its methods.
:func:`recording_world` makes it the default group, as ``init_process_group`` would with a real backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

BACKEND = "recording"


@dataclass(frozen=True)
class Call:
    collective: str
    device: torch.device
    dtype: torch.dtype | None  # None for a barrier (no tensor of the caller's: the device it names)


class WrongDeviceError(RuntimeError):
    pass


def _done(result: object) -> dist.Work:
    # Collectives here complete at once: the other ranks are imagined.
    future: Future = Future()
    future.set_result(result)
    return _create_work_from_future(future)


class RecordingProcessGroup(dist.ProcessGroup):
    """Rank 0 of ``world_size`` ranks that all hold the same tensors, working on ``device`` only.

    ``peer`` maps this rank's tensor to the one every other rank contributes (default: an equal one).
    Collectives it does not implement fail in torch's base class.
    """

    def __init__(
        self,
        device: torch.device,
        world_size: int = 2,
        peer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(0, world_size)
        self.device = torch.device(device)
        self.world_size = world_size
        self.peer = peer if peer is not None else torch.Tensor.clone
        self.calls: list[Call] = []

    def _receive(self, collective: str, tensors: Sequence[torch.Tensor]) -> None:
        for tensor in tensors:
            self.calls.append(Call(collective, tensor.device, tensor.dtype))
            if tensor.device != self.device:
                raise WrongDeviceError(
                    f"{collective} got a tensor on {tensor.device}; this backend takes {self.device} only"
                )

    def allreduce(self, tensors: list[torch.Tensor], opts: dist.AllreduceOptions) -> dist.Work:
        self._receive("allreduce", tensors)
        for tensor in tensors:
            others = self.peer(tensor)
            if opts.reduceOp == dist.ReduceOp.SUM:
                tensor.add_(others, alpha=self.world_size - 1)
            elif opts.reduceOp == dist.ReduceOp.AVG:
                tensor.add_(others, alpha=self.world_size - 1).div_(self.world_size)
            else:
                raise NotImplementedError(f"all-reduce {opts.reduceOp}")
        return _done(tensors)

    def allgather(
        self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: dist.AllgatherOptions
    ) -> dist.Work:
        self._receive("allgather", inputs)
        for outputs, tensor in zip(output_lists, inputs, strict=True):
            self._receive("allgather", outputs)
            for rank, output in enumerate(outputs):
                output.copy_(tensor if rank == 0 else self.peer(tensor))
        return _done(output_lists)

    def broadcast(self, tensors: list[torch.Tensor], opts: dist.BroadcastOptions) -> dist.Work:
        self._receive("broadcast", tensors)
        if opts.rootRank != 0:
            for tensor in tensors:
                tensor.copy_(self.peer(tensor))
        return _done(tensors)

    def barrier(self, opts: dist.BarrierOptions) -> dist.Work:
        # NCCL's barrier is an all-reduce on the GPU named by device_ids; without them it picks a GPU
        # itself. What torch puts in ``opts.device`` otherwise is the machine's accelerator or the CPU.
        ids = list(opts.device_ids)
        device = torch.device(self.device.type, ids[0]) if ids else opts.device
        self.calls.append(Call("barrier", device, None))
        if device != self.device:
            raise WrongDeviceError(f"barrier on {device}; this backend takes tensors on {self.device}")
        return _done(None)

    def getBackendName(self) -> str:  # the name torch's C++ side calls
        return BACKEND

    @property
    def _device_types(self) -> list[torch.device]:
        # torch's object collectives (all_gather_object...) put their tensors on the group's device, as
        # they put them on the current CUDA device with NCCL.
        return [torch.device(self.device.type)]

    def received(self, collective: str | None = None) -> list[Call]:
        return [c for c in self.calls if collective is None or c.collective == collective]


@contextmanager
def recording_world(
    device: torch.device,
    world_size: int = 2,
    peer: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[RecordingProcessGroup]:
    """A :class:`RecordingProcessGroup` as the default process group for the ``with`` block."""
    group = RecordingProcessGroup(device, world_size, peer)

    def create(store: dist.Store, rank: int, size: int, timeout: timedelta) -> RecordingProcessGroup:
        return group

    dist.Backend.register_backend(BACKEND, create, devices=[group.device.type])
    dist.init_process_group(BACKEND, rank=0, world_size=world_size, store=dist.HashStore())
    try:
        yield group
    finally:
        dist.destroy_process_group()
