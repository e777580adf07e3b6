"""One optimiser step of training, shared by ``evl train`` and ``evl bench``: optional Mixup / CutMix of
each micro-batch, forward under autocast, cross-entropy (soft-target when mixed), backward (loss scaled for
float16) accumulated over micro-batches, then the update.

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
from evl.video.mixing import BatchMixing, MixDraw, mix_targets, soft_target_cross_entropy


class TrainStep:
    """Forward, loss and backward of micro-batches, and the optimiser update through a gradient scaler.

    ``model`` owns the trainable parameters (and its device); ``step_model`` is what the forward calls:
    the model itself (default), its DDP or ``torch.compile`` wrapper, or a bound method such as
    ``EVL.forward_head`` for cached features. With ``distributed``, ``step_model.no_sync()`` keeps DDP from
    exchanging gradients on every micro-batch but the last. ``batch_size`` (clips per optimiser step, all
    processes) only sizes the out-of-memory error.

    ``mixing`` (Mixup / CutMix, see :mod:`evl.video.mixing`) mixes each micro-batch after collation, keyed by
    the stream position of its first clip, which the micro-batch then carries as a third element. Without
    it the loss is ``F.cross_entropy`` with ``label_smoothing``, as it always was.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        step_model: Callable[[Any], torch.Tensor] | None = None,
        compute_dtype: torch.dtype = torch.float32,
        label_smoothing: float = 0.0,
        mixing: BatchMixing | None = None,
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
        self.mixing = mixing
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

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, mix: MixDraw | None = None) -> torch.Tensor:
        """Mean cross-entropy of float32 ``logits`` [B, K]: against ``labels`` [B] smoothed by
        ``label_smoothing``; or, for a mixed micro-batch, against its mixed smoothed targets."""
        if mix is None:
            return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        # NOTE(ref): X-CLIP / ViFi-CLIP: SoftTargetCrossEntropy on smoothed, mixed one-hot targets. (Being
        # linear in the targets, it equals lam * CE(labels) + (1 - lam) * CE(reversed labels), both smoothed.)
        targets = mix_targets(labels, logits.shape[-1], mix.lam, self.label_smoothing)
        return soft_target_cross_entropy(logits, targets)

    def backward(
        self, inputs: Any, labels: torch.Tensor, last: bool = True, position: int | None = None
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients add to those already there. Returns the
        detached loss divided by ``batch_split`` (its share of the step's mean loss), on the device.
        ``position``: the stream position of the micro-batch's first clip, which keys its mixing."""
        mix = None
        if self.mixing is not None:
            if position is None:
                raise ValueError("mixing a micro-batch needs the stream position of its first clip")
            inputs, mix = self.mixing(inputs, position)
        # Gradients are exchanged once per step, after the last micro-batch.
        sync = self.step_model.no_sync() if self.distributed and not last else contextlib.nullcontext()
        try:
            with sync:
                with autocast(self.compute_dtype, self.device):
                    logits = self.step_model(inputs)
                loss = self.loss(logits.float(), labels, mix) / self.batch_split
                self.scaler.scale(loss).backward()
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from torch 2.5 on: the same class
            micro_batch = len(labels)
            batch_size = self.batch_size or micro_batch * self.batch_split
            raise DeviceOutOfMemory(
                "training", batch_size, micro_batch, batch_split=self.batch_split
            ) from None
        return loss.detach()

    def run(self, micro_batches: Iterable[tuple]) -> torch.Tensor:
        """Gradients of one optimiser step from ``batch_split`` micro-batches of (inputs, labels) or, for
        mixing, (inputs, labels, first stream position); returns the step's mean loss as a tensor on the
        device (no copy to the host: the caller reads it once).

        ``micro_batches`` may be a generator: each micro-batch is released before the next is drawn.
        """
        self.zero_grad()
        loss_sum = torch.zeros((), device=self.device)
        count = 0
        for micro_batch in micro_batches:
            inputs, labels, *position = micro_batch
            del micro_batch
            last = count == self.batch_split - 1
            loss_sum += self.backward(inputs, labels, last=last, position=position[0] if position else None)
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
