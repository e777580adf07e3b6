"""The decoder's attention of a few queries over a long memory, with memory-saving backwards.

``attend_memory(keys, bias, memory, norm)`` = softmax(keys @ m^T + bias) @ m with m = norm(memory): equal to
the plain expression (tested with gradients), computing in float32 under autocast.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from evl.models.ops.precision import in_float32


class _AttendMemory(torch.autograd.Function):
    """softmax(keys @ memory^T + bias) @ memory, with the memory gradient as one matmul.

    Autograd would form the memory's gradient from the scores and from the weighted sum separately
    (two [B, Lm, C] products and their sum); both are rank-Q updates of the same tensor, so one product
    of the stacked factors ([B, 2Q, Lm]^T @ [B, 2Q, C]) gives it in one pass.
    """

    @staticmethod
    @in_float32
    def forward(ctx, keys, bias, memory):
        attn = (keys @ memory.mT + bias).softmax(dim=-1)  # [B, Q, Lm]
        ctx.save_for_backward(keys, attn, memory)
        return attn @ memory

    @staticmethod
    @in_float32
    def backward(ctx, grad):
        keys, attn, memory = ctx.saved_tensors
        grad_scores, _ = _softmax_backward(attn, grad @ memory.mT)
        grad_keys = grad_scores @ memory if ctx.needs_input_grad[0] else None
        grad_bias = grad_scores.sum(dim=-1, keepdim=True) if ctx.needs_input_grad[1] else None
        grad_memory = None
        if ctx.needs_input_grad[2]:
            grad_memory = torch.cat([grad_scores, attn], dim=1).mT @ torch.cat([keys, grad], dim=1)
        return grad_keys, grad_bias, grad_memory


def _softmax_backward(attn: torch.Tensor, grad_attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax output ``attn`` and its gradient -> (the scores' gradient, the row sums of attn * grad_attn
    that it subtracts, which :class:`_AttendNormalizedMemory` reuses for the keys' gradient)."""
    row_sum = (grad_attn * attn).sum(dim=-1, keepdim=True)
    return attn * (grad_attn - row_sum), row_sum


# Pieces of the memory that _AttendNormalizedMemory's backward renormalises at a time.
MEMORY_PIECES = 4


class _AttendNormalizedMemory(torch.autograd.Function):
    """:class:`_AttendMemory` of m = LayerNorm(memory), keeping only the memory for backward.

    Autograd would keep the normalised memory too, and in backward hold its gradient and the memory's
    ([B, Lm, C] each) at once. Here backward renormalises the memory piece by piece and runs each piece's
    LayerNorm backward as soon as its gradient is formed: one [B, Lm, C] tensor (the memory's gradient)
    instead of three, for a little more time (lean decoders: see EVLDecoder.checkpoint_memory).
    """

    @staticmethod
    @in_float32
    def forward(ctx, keys, bias, memory, weight, norm_bias, eps):
        normed, mean, rstd = torch.native_layer_norm(memory, (memory.shape[-1],), weight, norm_bias, eps)
        attn = (keys @ normed.mT + bias).softmax(dim=-1)  # [B, Q, Lm]
        out = attn @ normed
        ctx.save_for_backward(keys, attn, memory, weight, norm_bias, mean, rstd, out)
        ctx.eps = eps
        return out

    @staticmethod
    @in_float32
    def backward(ctx, grad):
        keys, attn, memory, weight, norm_bias, mean, rstd, out = ctx.saved_tensors
        need_keys, need_bias, need_memory, need_weight, need_norm_bias, _ = ctx.needs_input_grad
        pieces = _MemoryPieces(memory, weight, norm_bias, ctx.eps)
        # One pass renormalising the memory: the attention's gradient and, as
        # grad_scores @ m = (attn * grad_attn) @ m - row_sum * (attn @ m), the keys' gradient.
        grad_attn = torch.empty_like(attn)
        grad_keys = torch.zeros_like(keys) if need_keys else None
        for i, span in pieces:
            normed = pieces.normalized(i, span)
            grad_attn[i, :, span] = grad[i] @ normed.T
            if need_keys:
                grad_keys[i].addmm_(attn[i, :, span] * grad_attn[i, :, span], normed)
        grad_scores, row_sum = _softmax_backward(attn, grad_attn)
        del grad_attn
        if need_keys:
            grad_keys.sub_(row_sum * out)
        grad_memory = torch.empty_like(memory) if need_memory else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_norm_bias = torch.zeros_like(norm_bias) if need_norm_bias else None
        factors, values = torch.cat([grad_scores, attn], dim=1), torch.cat([keys, grad], dim=1)
        mask = [need_memory, need_weight, need_norm_bias]
        for i, span in pieces:
            if not any(mask):
                break
            grad_normed = factors[i, :, span].T @ values[i]  # [piece, C]
            stats = mean[i, span], rstd[i, span]
            piece_grads = torch.ops.aten.native_layer_norm_backward(
                grad_normed, memory[i, span], (memory.shape[-1],), *stats, weight, norm_bias, mask
            )
            for total, piece_grad in zip((grad_weight, grad_norm_bias), piece_grads[1:], strict=True):
                if total is not None:
                    total += piece_grad
            if need_memory:
                grad_memory[i, span] = piece_grads[0]
        grad_bias = grad_scores.sum(dim=-1, keepdim=True) if need_bias else None
        return grad_keys, grad_bias, grad_memory, grad_weight, grad_norm_bias, None


class _MemoryPieces:
    """Contiguous pieces (i, rows) of a memory [B, Lm, C], each within one batch row, renormalised on
    demand with the memory's own LayerNorm."""

    def __init__(self, memory: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
        self.memory, self.weight, self.bias, self.eps = memory, weight, bias, eps
        b, length, _ = memory.shape
        step = -(-length // max(1, MEMORY_PIECES // b))
        self.spans = [slice(start, min(start + step, length)) for start in range(0, length, step)]

    def __iter__(self) -> Iterator[tuple[int, slice]]:
        return ((i, span) for i in range(self.memory.shape[0]) for span in self.spans)

    def normalized(self, i: int, span: slice) -> torch.Tensor:
        x = self.memory[i, span]
        return torch.native_layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)[0]


def attend_memory(
    keys: torch.Tensor, bias: torch.Tensor, memory: torch.Tensor, norm: nn.LayerNorm | None = None
) -> torch.Tensor:
    """keys [B, Q, C], bias [B, Q, 1], memory [B, Lm, C] -> softmax(keys @ m^T + bias) @ m [B, Q, C], where
    m = norm(memory) or the memory itself. With a norm (float32 memory only), backward holds less."""
    if norm is None:
        return _AttendMemory.apply(keys, bias, memory)
    if memory.dtype != torch.float32:  # the LayerNorm computes in float32, as evl.models.layers.LayerNorm
        return _AttendMemory.apply(keys, bias, norm(memory))
    return _AttendNormalizedMemory.apply(keys, bias, memory, norm.weight, norm.bias, norm.eps)
