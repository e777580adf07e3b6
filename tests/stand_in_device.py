"""A stand-in accelerator for machines without one: the ``privateuseone:0`` device, its data on the CPU.

A tensor on it is an :class:`OnStandIn`, a wrapper that says ``privateuseone:0`` and keeps its values in a
CPU tensor; every operation runs on those values and returns a tensor on the stand-in again, except a copy
to the CPU. As on a real accelerator, an operation that mixes a stand-in tensor with a CPU tensor of more
than one element fails, and ``float(t)``, ``.cpu()`` and ``.to(...)`` cross between the two. It is what
PyTorch's out-of-tree accelerators plug into (the PrivateUse1 device type), driven from Python.

``use_stand_in()`` readies the device for the ``with`` block. The device module, hooks and guard torch
keeps for the rest of the process (torch registers them once); they give no other device any behaviour.
``as_accelerator=True`` also makes it the process's accelerator (what autograd needs to run backward on
it); that cannot be undone, so only a process of its own should ask for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._pytree import tree_map

DEVICE_TYPE = "privateuseone"
STAND_IN = torch.device(DEVICE_TYPE, 0)


def available() -> bool:
    """Whether this torch can drive a device from Python and no real one holds the PrivateUse1 slot."""
    from torch.utils import backend_registration

    return (
        hasattr(backend_registration, "_setup_privateuseone_for_python_backend")
        and torch._C._get_privateuse1_backend_name() == DEVICE_TYPE
    )


class OnStandIn(torch.Tensor):
    """A tensor on the stand-in device; ``cpu_values`` holds its values."""

    cpu_values: torch.Tensor

    @staticmethod
    def __new__(cls, cpu_values: torch.Tensor) -> OnStandIn:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            cpu_values.shape,
            strides=cpu_values.stride(),
            storage_offset=cpu_values.storage_offset(),
            dtype=cpu_values.dtype,
            device=STAND_IN,
            requires_grad=cpu_values.requires_grad,
        )

    def __init__(self, cpu_values: torch.Tensor) -> None:
        self.cpu_values = cpu_values

    def __repr__(self) -> str:  # type: ignore[override]
        return f"OnStandIn({self.cpu_values!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(
        cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default:  # host <-> device copies included
            target, source = args[0], args[1]
            _values(target).copy_(_values(source))
            return target

        def unwrap(x: Any) -> Any:
            if isinstance(x, OnStandIn):
                return x.cpu_values
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                raise RuntimeError(f"{func}: a {x.device} tensor mixed with a {STAND_IN} tensor")
            if isinstance(x, torch.device) and x.type == DEVICE_TYPE:
                return torch.device("cpu")
            return x

        to_host = func is torch.ops.aten._to_copy.default and torch.device(
            kwargs.get("device") or STAND_IN
        ) == torch.device("cpu")
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if to_host:
            return out
        return tree_map(lambda x: OnStandIn(x) if isinstance(x, torch.Tensor) else x, out)


def _values(x: torch.Tensor) -> torch.Tensor:
    return x.cpu_values if isinstance(x, OnStandIn) else x


def _empty_strided(size: list[int], stride: list[int], **kwargs: Any) -> OnStandIn:
    return OnStandIn(torch.empty_strided(size, stride, dtype=kwargs.get("dtype")))


def _empty(size: list[int], **kwargs: Any) -> OnStandIn:
    memory_format = kwargs.get("memory_format") or torch.contiguous_format
    return OnStandIn(torch.empty(size, dtype=kwargs.get("dtype"), memory_format=memory_format))


_registered = False


@contextmanager
def use_stand_in(as_accelerator: bool = False) -> Iterator[torch.device]:
    """The stand-in device, usable for the ``with`` block: tensors move to it with ``.to``, are created on
    it with ``device=``, and compute there."""
    global _registered
    if not _registered:
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        # Naming the backend, even by its own name, is what makes it the process's accelerator.
        _setup_privateuseone_for_python_backend(DEVICE_TYPE if as_accelerator else None)
        _registered = True
    # Only the factories of a CPU tensor's copy to the device (and of ``device=`` arguments) reach the
    # device's own kernels; everything else dispatches on the wrapper, in __torch_dispatch__.
    library = torch.library.Library("aten", "IMPL")
    library.impl("empty_strided", _empty_strided, "PrivateUse1")
    library.impl("empty.memory_format", _empty, "PrivateUse1")
    try:
        yield STAND_IN
    finally:
        library._destroy()
