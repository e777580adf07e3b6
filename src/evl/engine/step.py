"""One optimiser step of training, shared by ``evl train`` and ``evl bench``: forward under autocast,
cross-entropy, backward (loss scaled for float16) accumulated over micro-batches, then the update.

The training loop decides *whether* to apply an update (a non-finite loss is skipped or stops the run);
this unit decides *how* a step computes, so that the bench times exactly what training runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from evl.devices import DeviceOutOfMemory, autocast, needs_grad_scaler


class TrainStep:
    """Forward, loss and backward of micro-batches, and the optimiser update through a gradient scaler.

    ``model`` owns the trainable parameters (and its device); ``step_model`` is what the forward calls:
    the model itself (default), its DDP or ``torch.compile`` wrapper, or a bound method such as
    ``EVL.forward_head`` for cached features. With ``distributed``, ``step_model.no_sync()`` keeps DDP from
    exchanging gradients on every micro-batch but the last. ``batch_size`` (clips per optimiser step, all
    processes) only sizes the out-of-memory error.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        step_model: Callable[[Any], torch.Tensor] | None = None,
        compute_dtype: torch.dtype = torch.float32,
        label_smoothing: float = 0.0,
        batch_split: int = 1,
        distributed: bool = False,
        batch_size: int | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model = model
        self.step_model = model if step_model is None else step_model
        self.optimizer = optimizer
        self.compute_dtype = compute_dtype
        self.label_smoothing = label_smoothing
        self.batch_split = batch_split
        self.distributed = distributed
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        if scaler is None:
            # float16 gradients underflow: the loss is scaled up before backward and the gradients down
            # before the update (a step whose gradients overflowed is skipped and the scale lowered).
            # Disabled, the scaler passes everything through unchanged.
            scaler = torch.amp.GradScaler(self.device.type, enabled=needs_grad_scaler(compute_dtype))
        self.scaler = scaler

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, inputs: Any, labels: torch.Tensor, last: bool = True) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients add to those already there. Returns the
        detached loss divided by ``batch_split`` (its share of the step's mean loss), on the device."""
        # Gradients are exchanged once per step, after the last micro-batch.
        sync = self.step_model.no_sync() if self.distributed and not last else contextlib.nullcontext()
        try:
            with sync:
                with autocast(self.compute_dtype, self.device):
                    logits = self.step_model(inputs)
                loss = (
                    F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
                    / self.batch_split
                )
                self.scaler.scale(loss).backward()
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from torch 2.5 on: the same class
            micro_batch = len(labels)
            batch_size = self.batch_size or micro_batch * self.batch_split
            raise DeviceOutOfMemory(
                "training", batch_size, micro_batch, batch_split=self.batch_split
            ) from None
        return loss.detach()

    def run(self, micro_batches: Iterable[tuple[Any, torch.Tensor]]) -> torch.Tensor:
        """Gradients of one optimiser step from ``batch_split`` micro-batches of (inputs, labels); returns
        the step's mean loss as a tensor on the device (no copy to the host: the caller reads it once).

        ``micro_batches`` may be a generator: each micro-batch is released before the next is drawn.
        """
        self.zero_grad()
        loss_sum = torch.zeros((), device=self.device)
        count = 0
        for inputs, labels in micro_batches:
            loss_sum += self.backward(inputs, labels, last=count == self.batch_split - 1)
            count += 1
            del inputs, labels  # this micro-batch's memory is free before the next one
        if count != self.batch_split:
            raise ValueError(f"a step of {self.batch_split} micro-batches was given {count}")
        return loss_sum

    def apply(self) -> None:
        """The optimiser update from the accumulated gradients (skipped by the scaler if float16
        gradients overflowed, the scale then lowered)."""
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def skip(self) -> None:
        """Drop the accumulated gradients without an update (a non-finite loss)."""
        self.zero_grad()
