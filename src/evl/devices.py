"""Where a run computes and in which precision: the one place that decides per device.

CPUs emulate half precision (many times slower than float32), so they compute in float32. GPUs of compute
capability 8.0 and up (A100, H100, RTX 30xx/40xx) compute bfloat16 natively; older ones (V100, T4) emulate
it, and their fast type is float16, which needs a gradient scaler in training.
"""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Environment variable naming the default device of every command (e.g. ``cpu`` on a machine with a GPU).
DEVICE_ENV = "EVL_DEVICE"


class DeviceOutOfMemory(RuntimeError):
    """The accelerator ran out of memory. ``stage`` is "training" or "evaluation"; ``batch_size`` the clips
    per step (training: the global batch), ``micro_batch`` the clips per forward pass and ``batch_split``
    the micro-batches per step (training)."""

    def __init__(
        self, stage: str, batch_size: int, micro_batch: int, detail: str = "", batch_split: int = 1
    ) -> None:
        self.stage, self.batch_size, self.micro_batch = stage, batch_size, micro_batch
        self.batch_split = batch_split
        super().__init__(
            f"out of device memory in {stage} at batch size {batch_size} "
            f"({micro_batch} clips per forward pass){': ' + detail if detail else ''}"
        )


def pick_device(name: str | None = None) -> torch.device:
    """``name``, else $EVL_DEVICE, else the first CUDA GPU when there is one, else the CPU."""
    name = name or os.environ.get(DEVICE_ENV)
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_precision(name: str, field: str = "precision") -> str:
    if name not in PRECISIONS:
        raise ValueError(f"{field} must be one of {', '.join(PRECISIONS)}; got {name!r}")
    return name


def native_half_dtype(device: torch.device) -> torch.dtype:
    """The half-precision type ``device`` computes fastest: bfloat16 from compute capability 8.0, else
    float16 (CUDA); the meta device (op counting) counts as a modern GPU."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.bfloat16


def resolve_precision(name: str, device: torch.device, field: str = "precision") -> torch.dtype:
    """A precision name -> the compute dtype on ``device``. "auto": float32 on CPUs (where half precision is
    emulated, many times slower), the GPU's native half type otherwise (:func:`native_half_dtype`).
    ``field`` names the setting in the error for an unknown name."""
    check_precision(name, field)
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return native_half_dtype(device)


def autocast(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (nothing for float32, nor on devices autocast does not know)."""
    if dtype == torch.float32 or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def needs_grad_scaler(dtype: torch.dtype) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 has float32's exponent range."""
    return dtype == torch.float16


def configure_device(device: torch.device, tf32: bool = True) -> None:
    """Process-wide settings for ``device``: on CUDA, TensorFloat-32 for float32 matmuls and convolutions
    (10-bit mantissa products, float32 accumulation: 8x the float32 rate on A100/H100) unless ``tf32`` is
    false."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


# How the EVL decoder's kernels are formulated: "cpu" loops over clips, frames, query groups and memory
# pieces in cache-sized steps (fast on a few CPU cores, where a loop iteration costs little next to the math);
# "batched" issues a number of ops that does not grow with the batch (on a GPU every op is a kernel launch
# of several microseconds, and each one should cover the whole batch); "reference" is the straightforward
# formulation both are tested against: the modules' own forwards in plain ops, with no custom autograd
# Function, nothing written in place and no Python loop over the batch, which is what a traced graph holds.
FORMULATIONS = ("auto", "cpu", "batched", "reference")


def tracing() -> bool:
    """Whether a tracer is recording the ops (``torch.jit.trace``, ``torch.export``): its graph is replayed
    for other inputs, so it must not depend on buffer reuse or on sizes read in Python."""
    exporting = getattr(torch.compiler, "is_exporting", None)  # not in every torch the package supports
    return torch.jit.is_tracing() or (exporting is not None and exporting())


def resolve_formulation(name: str, device: torch.device) -> str:
    """ "auto" -> "cpu" on CPUs, "batched" on every other device (CUDA, and meta for op counting), and
    "reference" while a tracer records (:func:`tracing`)."""
    if name not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {', '.join(FORMULATIONS)}; got {name!r}")
    if name != "auto":
        return name
    if tracing():
        return "reference"
    return "cpu" if device.type == "cpu" else "batched"
