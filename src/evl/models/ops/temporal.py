"""The temporal convolution and position embedding added to frame features, as one autograd Function.

``add_temporal_terms(x, weight, bias, embed)`` equals ``x + conv1d_over_time(x) + embed`` (tested against
``TemporalConv`` and ``TemporalPosEmbed`` of :mod:`evl.models.evl`, gradients included).
"""

from __future__ import annotations

import torch

from evl.models.ops.precision import in_float32


def _tap_slices(num_frames: int, shift: int) -> tuple[slice, slice]:
    """Frames (receiving, read) of a tap that adds x[t + shift] to y[t], zero-padded at both ends."""
    return slice(max(0, -shift), num_frames - max(0, shift)), slice(
        max(0, shift), num_frames - max(0, -shift)
    )


class _TemporalResidual(torch.autograd.Function):
    """x + TemporalConv(x) + TemporalPosEmbed() in [B, T, L, C] order, each tap a multiply-add over frames.

    F.conv1d wants [B*L, C, T] (a transposed copy there and back, and a slow backward for this layout);
    here the centre tap and the residual are one multiply (x * (1 + w)) and bias plus embedding one [T, C]
    table, so forward is three passes over x and backward needs no transposes. ``batched``: the weight
    gradient as one product per tap over the whole batch (GPUs), instead of frame by frame (CPUs).
    """

    @staticmethod
    @in_float32
    def forward(ctx, x, weight, bias, embed, batched):
        t, c = x.shape[1], x.shape[-1]
        offset = x.new_zeros(t, 1, c)  # bias + embedding, per frame
        if bias is not None:
            offset += bias
        if embed is not None:
            offset += embed[:, None]
        if weight is None:
            y = x + offset
        else:
            taps, centre = weight[:, 0], weight.shape[-1] // 2  # [C, K]
            y = torch.addcmul(offset, x, taps[:, centre] + 1)
            for tap in range(taps.shape[1]):
                if tap != centre:
                    out, read = _tap_slices(t, tap - centre)
                    y[:, out].addcmul_(x[:, read], taps[:, tap])
        ctx.save_for_backward(x, weight)
        ctx.batched = batched
        return y

    @staticmethod
    @in_float32
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, needs_embed, _ = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = grad_embed = None
        num_taps = 0 if weight is None or not needs_weight else weight.shape[-1]
        if needs_bias or needs_embed or num_taps:
            sums = _tap_and_frame_sums_batched if ctx.batched else _tap_and_frame_sums
            per_tap, per_frame = sums(grad, x, num_taps)
            grad_weight = per_tap.T.unsqueeze(1) if num_taps else None  # [C, 1, K]
            grad_bias = per_frame.sum(0) if needs_bias else None
            grad_embed = per_frame if needs_embed else None
        if weight is None:
            return grad if needs_x else None, None, grad_bias, grad_embed, None
        t, (taps, centre) = x.shape[1], (weight[:, 0], weight.shape[-1] // 2)
        if needs_x:
            grad_x = grad * (taps[:, centre] + 1)
            for tap in range(taps.shape[1]):
                if tap != centre:
                    out, read = _tap_slices(t, tap - centre)
                    grad_x[:, read].addcmul_(grad[:, out], taps[:, tap])
        return grad_x, grad_weight, grad_bias, grad_embed, None


def _tap_and_frame_sums(
    grad: torch.Tensor, x: torch.Tensor, num_taps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad, x [B, T, L, C] -> (sum of grad[:, t] * x[:, t + tap - K//2] over clips, frames and tokens for
    each of the K taps, [K, C]; sum of grad over clips and tokens, [T, C]).

    Frame by frame into a [K, L, C] accumulator: each clip is read once while it is in cache, and no
    [B, T, L, C] product is written out and read back.
    """
    b, t, length, c = x.shape
    per_tap = grad.new_zeros(num_taps, length, c)
    per_frame = grad.new_zeros(t, c)
    for clip in range(b):
        per_frame += grad[clip].sum(dim=1)
        for frame in range(t):
            for tap in range(num_taps):
                source = frame + tap - num_taps // 2
                if 0 <= source < t:
                    per_tap[tap].addcmul_(grad[clip, frame], x[clip, source])
    return per_tap.sum(dim=1), per_frame


def _tap_and_frame_sums_batched(
    grad: torch.Tensor, x: torch.Tensor, num_taps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_tap_and_frame_sums` as a few ops over the whole batch: one product and sum per tap."""
    t = x.shape[1]
    per_tap = grad.new_empty(num_taps, x.shape[-1])
    for tap in range(num_taps):
        out, read = _tap_slices(t, tap - num_taps // 2)
        per_tap[tap] = (grad[:, out] * x[:, read]).sum(dim=(0, 1, 2))
    return per_tap, grad.sum(dim=(0, 2))


def add_temporal_terms(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    embed: torch.Tensor | None,
    batched: bool = False,
) -> torch.Tensor:
    """x [B, T, L, C] + depthwise temporal convolution (weight [C, 1, K], bias [C]) + embed [T, C], any of
    them None: a new float32 tensor. ``batched``: the weight gradient in a few ops over the whole batch."""
    if weight is None and embed is None and bias is None:
        return x.float() if x.dtype != torch.float32 else x.clone()
    return _TemporalResidual.apply(x, weight, bias, embed, batched)
