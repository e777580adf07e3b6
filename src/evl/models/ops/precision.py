"""The dtype a custom autograd Function computes in, whatever autocast says around it.

Autocast changes the dtype of the matmuls inside a Function's forward, but not inside its backward (which
runs outside the autocast region): a backward that multiplies the incoming half-precision gradient by a
float32 tensor it saved fails (``expected m1 and m2 to have the same dtype``). ``torch.amp.custom_fwd`` solves
this for one device type fixed at decoration; the kernels here run on any device, so :func:`in_float32`
declares the dtype for all of them: forward and backward run with autocast off, on float32 tensors.

The Functions decorated so are the CPU-tuned kernels: CPUs emulate half precision, so float32 is also their
fast type. Under autocast the rest of the model (projections, MLPs) still computes in half precision.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch


def _float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


def autocast_off(device: torch.device | None) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device``'s type (nothing to disable on other devices, e.g. meta)."""
    if device is None or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def in_float32(method: Callable) -> Callable:
    """Decorate a Function's ``forward`` or ``backward``: floating tensors in float32, autocast off."""

    @functools.wraps(method)
    def run(ctx: Any, *args: Any) -> Any:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        with autocast_off(device):
            return method(ctx, *(_float32(a) for a in args))

    return run
