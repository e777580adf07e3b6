"""EVL: a frozen CLIP ViT, a light transformer decoder with temporal modules, and a linear head.

Lin et al., "Frozen CLIP Models are Efficient Video Learners" (ECCV 2022). Decoder layer i reads backbone
block ``blocks[i]`` (by default the last M blocks, shallow to deep):

    Y_i = X + TemporalConv(X) + TemporalPosEmbed + TemporalCrossAttention(q, k)
    query = query + Attn(norm1(query), norm3(Y_i)); query = query + MLP(norm2(query))
    logits = Linear(Dropout(LayerNorm(query)))

Only the decoder and the head train; the backbone runs without autograd and is never in the trainable state.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from evl.config import DecoderConfig, ModelConfig, VisionConfig
from evl.devices import PRECISIONS, autocast, resolve_formulation, resolve_precision
from evl.models.clip_vit import BlockFeatures, CLIPVisionTransformer
from evl.models.layers import LayerNorm, QuickGELU, load_exact_subset, weights_fingerprint
from evl.models.ops.precision import in_float32

# ----------------------------------------------------------------------------------------- temporal modules


class TemporalConv(nn.Module):
    """Depthwise 1-D convolution over time (kernel 3, one filter per channel, with bias).

    [B, T, L, C] -> [B, T, L, C], run independently for every token position (CLS included).
    """

    def __init__(self, width: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(width))
        # NOTE(ref): the official code keeps nn.Conv1d's default initialisation (not zero); so do we.
        reference = nn.Conv1d(width, width, kernel_size, groups=width)
        with torch.no_grad():
            self.weight.copy_(reference.weight)
            self.bias.copy_(reference.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, length, c = x.shape
        y = x.permute(0, 2, 3, 1).reshape(b * length, c, t)  # time last, one sequence per token
        y = F.conv1d(y, self.weight, self.bias, padding=self.weight.shape[-1] // 2, groups=c)
        return y.view(b, length, c, t).permute(0, 3, 1, 2)


class TemporalPosEmbed(nn.Module):
    """A learned [T, C] table added to every token of frame t (zero-initialised as the official code)."""

    def __init__(self, num_frames: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(num_frames, width))

    def forward(self) -> torch.Tensor:
        """-> [1, T, 1, C], ready to broadcast onto frame features [B, T, L, C]."""
        return self.embed[None, :, None, :]


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


def temporal_residual(
    x: torch.Tensor, conv: TemporalConv | None, pos_embed: TemporalPosEmbed | None, batched: bool = False
) -> torch.Tensor:
    """x + conv(x) + pos_embed() for x [B, T, L, C] (either module may be None), always a new tensor
    (float32: see :func:`in_float32`). ``batched``: the formulation for GPUs (same numbers)."""
    if conv is None and pos_embed is None:
        return x.float() if x.dtype != torch.float32 else x.clone()
    weight, bias = (None, None) if conv is None else (conv.weight, conv.bias)
    return _TemporalResidual.apply(x, weight, bias, None if pos_embed is None else pos_embed.embed, batched)


def relative_position_index(grid_h: int, grid_w: int) -> torch.Tensor:
    """[h*w, h*w] long: row of the (2h-1)(2w-1) offset table for query patch q and key patch k.

    idx(q, k) = (qr - kr + h - 1) * (2w - 1) + (qc - kc + w - 1): query-minus-key offsets, row-major.
    """
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + grid_h - 1
    d_col = cols[:, None] - cols[None, :] + grid_w - 1
    return d_row * (2 * grid_w - 1) + d_col


# A group of queries multiplies its maps with one window of the offset table; below this many rows per
# matmul (maps x queries per group), CPU matmuls run far from their peak rate.
MIN_GROUP_ROWS = 24


def relative_query_groups(grid_h: int, grid_w: int, num_maps: int) -> tuple[int, int]:
    """Query patches (rows, columns) per group for :class:`RelativeAggregation`, given N maps per call.

    A group of sy x sx queries reads an (h+sy-1) x (w+sx-1) window of the offset table, against h x w keys:
    wider groups waste multiply-adds on offsets that only some of their queries have (the whole 14x14 grid:
    3.7x), narrower ones make matmuls of N*sy*sx rows. One grid row and the fewest columns (a divisor of
    the width) that give ``MIN_GROUP_ROWS`` rows: 1 x 2 for ViT-B/16 at batch 2 (N = 14), 7% waste.
    """
    for cols in range(1, grid_w + 1):
        if grid_w % cols == 0 and num_maps * cols >= MIN_GROUP_ROWS:
            return 1, cols
    return 1, grid_w


@functools.lru_cache(maxsize=64)
def _window_index(grid_h: int, grid_w: int, group_h: int, group_w: int) -> torch.Tensor:
    """[sy, sx, P] long: where key patch (yj, xj) falls in the table window of query (ry, rx) of a group.

    The window of the group whose first query is (gy*sy, gx*sx) starts at offset (gy*sy, gx*sx) of the
    [2h-1, 2w-1] table and is (h+sy-1) x (w+sx-1); query (ry, rx) of the group reads offset
    (ry - yj + h - 1, rx - xj + w - 1) of it.
    """
    ry = torch.arange(group_h).view(-1, 1, 1, 1)
    rx = torch.arange(group_w).view(1, -1, 1, 1)
    yj = torch.arange(grid_h).view(1, 1, -1, 1)
    xj = torch.arange(grid_w).view(1, 1, 1, -1)
    index = (ry - yj + grid_h - 1) * (grid_w + group_w - 1) + (rx - xj + grid_w - 1)
    return index.reshape(group_h, group_w, grid_h * grid_w)


class RelativeAggregation(NamedTuple):
    """out[..., q, :] = sum_k attn[..., q, k] * weight[index[q, k]], computed group by group of queries.

    The straightforward form gathers an [P, P, C] table per call (113 MiB for ViT-B/16) and is kept as
    :func:`aggregate_relative_gather`. Scattering each attention row into all (2h-1)(2w-1) offset bins
    and multiplying by the table costs P*(2h-1)(2w-1)*C multiply-adds per map, 3.7x the P*P*C needed.
    Here the queries are cut into groups of ``group_h`` x ``group_w`` patches: the offsets a group reads
    form one (h+sy-1) x (w+sx-1) window of the table, so scattering its rows into that window's bins and
    multiplying by the window wastes only (h+sy-1)(w+sx-1) / (h*w) - 1. Windows of groups in one column
    of groups are overlapping, equally spaced slices of a copy of the table's columns they span, hence one
    batched matmul per group column. Leading dimensions of ``attn`` and of the output are any ``lead``.
    """

    grid_h: int
    grid_w: int
    group_h: int
    group_w: int

    @classmethod
    def for_maps(cls, grid_h: int, grid_w: int, num_maps: int) -> RelativeAggregation:
        return cls(grid_h, grid_w, *relative_query_groups(grid_h, grid_w, num_maps))

    @property
    def window(self) -> tuple[int, int]:
        return self.grid_h + self.group_h - 1, self.grid_w + self.group_w - 1

    @property
    def num_groups(self) -> tuple[int, int]:
        if self.grid_h % self.group_h or self.grid_w % self.group_w:
            raise ValueError(
                f"query groups {self.group_h}x{self.group_w} do not tile the grid {self.grid_h}x{self.grid_w}"
            )
        return self.grid_h // self.group_h, self.grid_w // self.group_w

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """[*lead, P, D] (queries row-major) -> view [Gx, Gy, *lead, sy, sx, D]."""
        (gy, gx), k = self.num_groups, x.ndim - 2
        x = x.view(*x.shape[:-2], gy, self.group_h, gx, self.group_w, x.shape[-1])
        return x.permute(k + 2, k, *range(k), k + 1, k + 3, k + 4)

    @property
    def single_query_groups(self) -> bool:
        return self.group_h == self.group_w == 1

    def prepare(self, attn: torch.Tensor) -> torch.Tensor:
        """attn [*lead, P, P] -> the maps as :meth:`bins` reads them. With one query per group, its window of
        offsets is its keys in reverse order (offset = query - key), so the maps with every row reversed,
        contiguous, hold all bins already; otherwise attn itself."""
        if not self.single_query_groups:
            return attn
        # flip keeps its input's strides (transposed ones, for the decoder's direction-first maps); copying
        # into a contiguous tensor reorders them in the same pass.
        return torch.empty(attn.shape, dtype=attn.dtype, device=attn.device).copy_(attn.flip(-1))

    def bins(self, maps: torch.Tensor, column: int) -> torch.Tensor:
        """Column ``column`` of groups, from :meth:`prepare`'s maps [*lead, P, P] -> [Gy, M, window]
        (M = N*sy*sx rows): each attention row in its group's window of offsets (a view for one-query
        groups, else scattered)."""
        if self.single_query_groups:
            rows = maps.view(-1, self.grid_h, self.grid_w, maps.shape[-1])[:, :, column]  # [N, Gy, P]
            return rows.transpose(0, 1)
        attn_column = self.grouped(maps)[column]  # [Gy, *lead, sy, sx, P]
        index = _window_index(*self).to(attn_column.device).expand(attn_column.shape)
        bins = attn_column.new_zeros(*attn_column.shape[:-1], self.window[0] * self.window[1])
        bins.scatter_(-1, index, attn_column)
        return bins.view(bins.shape[0], -1, bins.shape[-1])

    def table(self, weight: torch.Tensor, column: int) -> torch.Tensor:
        """weight [R, C] -> [2h-1, w+sx-1, C], contiguous: the offset columns one column of groups reads."""
        table = weight.contiguous().view(2 * self.grid_h - 1, 2 * self.grid_w - 1, -1)
        if self.group_w == self.grid_w:
            return table  # one column of groups reads the whole table
        start = column * self.group_w
        return table[:, start : start + self.window[1]].contiguous()

    def windows(self, table: torch.Tensor) -> torch.Tensor:
        """One column's table [2h-1, w+sx-1, C] -> overlapping view [Gy, window, C], one per group."""
        row = table.stride(0)
        return table.as_strided(
            (self.num_groups[0], self.window[0] * self.window[1], table.shape[-1]),
            (self.group_h * row, table.stride(1), 1),
        )

    def add_to(self, out: torch.Tensor, maps: torch.Tensor, weight: torch.Tensor) -> None:
        """out [*lead, P, C] += the aggregation of the maps [*lead, P, P] (from :meth:`prepare`; in place, no
        autograd)."""
        grouped_out = self.grouped(out)
        for column in range(self.num_groups[1]):  # one column of groups at a time: small temporaries
            products = torch.bmm(self.bins(maps, column), self.windows(self.table(weight, column)))
            grouped_out[column].add_(products.view(grouped_out[column].shape))

    def weight_grad(self, maps: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """d out / d weight: [R, C], from the maps [*lead, P, P] (from :meth:`prepare`) and the output
        gradient [*lead, P, C]."""
        (gy, gx), (wh, ww), c = self.num_groups, self.window, grad.shape[-1]
        grouped_grad = self.grouped(grad)
        table = grad.new_empty(2 * self.grid_h - 1, ww, c)  # one column of groups' part, reused
        weight = grad.new_zeros(2 * self.grid_h - 1, 2 * self.grid_w - 1, c) if gx > 1 else table
        for column in range(gx):
            bins, rows = self.bins(maps, column), _rows(grouped_grad[column])
            table.zero_()
            for group in range(gy):
                start = group * self.group_h
                window = table[start : start + wh].view(wh * ww, c)  # overlaps the next group's
                window.addmm_(bins[group].mT, rows[group])
            if gx > 1:
                weight[:, column * self.group_w : column * self.group_w + ww] += table
        return weight.view(-1, c)

    def attn_grad(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """d out / d attn: [*lead, P, P], from the weight and the output gradient [*lead, P, C]."""
        p = self.grid_h * self.grid_w
        out = grad.new_empty(*grad.shape[:-1], p)
        grouped_out, grouped_grad = self.grouped(out), self.grouped(grad)
        for column in range(self.num_groups[1]):
            grad_bins = _rows(grouped_grad[column]) @ self.windows(self.table(weight, column)).mT
            target = grouped_out[column]  # [Gy, *lead, sy, sx, P]
            index = _window_index(*self).to(grad.device).expand(target.shape)
            target.copy_(grad_bins.view(*target.shape[:-1], -1).gather(-1, index))
        return out


def _rows(grouped: torch.Tensor) -> torch.Tensor:
    """One column of groups [Gy, *lead, sy, sx, D] -> contiguous [Gy, M, D]."""
    grouped = grouped.contiguous()
    return grouped.view(grouped.shape[0], -1, grouped.shape[-1])


class _AggregateRelative(torch.autograd.Function):
    @staticmethod
    @in_float32
    def forward(ctx, attn, weight, aggregation):
        maps = aggregation.prepare(attn)
        ctx.save_for_backward(maps, weight)
        ctx.aggregation = aggregation
        out = attn.new_zeros(*attn.shape[:-1], weight.shape[-1])
        aggregation.add_to(out, maps, weight)
        return out

    @staticmethod
    @in_float32
    def backward(ctx, grad):
        maps, weight = ctx.saved_tensors
        grad_attn = ctx.aggregation.attn_grad(weight, grad) if ctx.needs_input_grad[0] else None
        grad_weight = ctx.aggregation.weight_grad(maps, grad) if ctx.needs_input_grad[1] else None
        return grad_attn, grad_weight, None


def aggregate_relative(
    attn: torch.Tensor, weight: torch.Tensor, grid: tuple[int, int], groups: tuple[int, int] | None = None
) -> torch.Tensor:
    """out[..., q, c] = sum_k attn[..., q, k] * weight[offset(q, k), c] on an h x w patch grid.

    attn [*lead, P, P], weight [(2h-1)(2w-1), C] (rows as :func:`relative_position_index`) -> [*lead, P, C],
    through :class:`RelativeAggregation` (``groups``: queries per group, default
    :func:`relative_query_groups`); equal to :func:`aggregate_relative_gather` with gradients.
    """
    num_maps = attn[..., 0, 0].numel()
    aggregation = RelativeAggregation(*grid, *(groups or relative_query_groups(*grid, num_maps)))
    return _AggregateRelative.apply(attn, weight, aggregation)


def aggregate_relative_gather(attn: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The straightforward form of :func:`aggregate_relative` (the paper's formulation): attn [*lead, P, P],
    weight [R, C], index [P, P] (:func:`relative_position_index`) -> [*lead, P, C]."""
    return torch.einsum("...qk,qkc->...qc", attn, weight[index])


class FrameFeatures(NamedTuple):
    """What the decoder reads from one backbone block, once the frozen part is computed.

    ``out``: block output [B, T, L, C]. ``attn``: head-averaged cross-frame attention maps between adjacent
    frames over the patch tokens, [B, 2, T-1, P, P] (index 0: frame t+1 attending to frame t, i.e. each
    frame to its previous one; index 1: frame t attending to frame t+1), or None when T = 1. These maps depend
    only on the frozen backbone, so a feature cache stores them instead of the much larger q and k.
    """

    out: torch.Tensor
    attn: torch.Tensor | None


def cross_frame_attention(
    q: torch.Tensor, k: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Frozen q, k [B, T, L, H, Dh] (CLS first) -> head-averaged maps [B, 2, T-1, P, P] (None when T = 1),
    written into ``out`` when given.

    A = mean over heads of softmax(q_t k_s^T / sqrt(Dh)) over the patch tokens, for s = t-1 and s = t+1.
    One frame pair at a time: the [B, H, P, P] scores of a pair are a few MiB, of all pairs tens.
    """
    b, t, length, _, _ = q.shape
    if t < 2:
        return None
    if out is None:
        out = q.new_empty(b, 2, t - 1, length - 1, length - 1, dtype=torch.float32)
    for pair in range(t - 1):
        out[:, 0, pair] = _head_averaged_attention(q[:, pair + 1], k[:, pair])
        out[:, 1, pair] = _head_averaged_attention(q[:, pair], k[:, pair + 1])
    return out


def _head_averaged_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q, k [B, L, H, Dh] of two frames -> [B, P, P]: softmax(q k^T / sqrt(Dh)) over patches, head mean."""
    q = q[:, 1:].transpose(1, 2).float() * q.shape[-1] ** -0.5  # [B, H, P, Dh], CLS dropped
    k = k[:, 1:].transpose(1, 2).float()
    return (q @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)


def frame_features(block: BlockFeatures, with_attention: bool = True) -> FrameFeatures:
    """Backbone block features (out [B, T, L, C], q/k [B, T, L, H, Dh]) -> :class:`FrameFeatures`."""
    return FrameFeatures(block.out, cross_frame_attention(block.q, block.k) if with_attention else None)


def _receiving_patches(x: torch.Tensor, direction: int) -> torch.Tensor:
    """[B, T, L, C] -> view [B, T-1, P, C]: the patch tokens of the frames that receive ``direction``'s term
    (0: frames 1.., which attend to their previous frame; 1: frames ..T-2, to their next)."""
    return x[:, 1:, 1:] if direction == 0 else x[:, :-1, 1:]


class _AddCrossFrameTerms(torch.autograd.Function):
    """y += the cross-frame terms of :class:`TemporalCrossAttention`, in place: no [B, T, L, C] temporary
    in forward, and the gradient of y passes through untouched."""

    @staticmethod
    @in_float32
    def forward(ctx, y, attn, w_prev, w_next, aggregation):
        maps = aggregation.prepare(attn.transpose(0, 1))  # direction first: each direction's maps contiguous
        for direction, weight in enumerate((w_prev, w_next)):
            aggregation.add_to(_receiving_patches(y, direction), maps[direction], weight)
        ctx.mark_dirty(y)
        ctx.save_for_backward(maps, w_prev, w_next)
        ctx.aggregation = aggregation
        return y

    @staticmethod
    @in_float32
    def backward(ctx, grad):
        maps, *weights = ctx.saved_tensors
        aggregation: RelativeAggregation = ctx.aggregation
        grad_attn, grad_weights = [], []
        for direction, weight in enumerate(weights):
            received = _receiving_patches(grad, direction)
            if ctx.needs_input_grad[1]:
                grad_attn.append(aggregation.attn_grad(weight, received))
            needed = ctx.needs_input_grad[2 + direction]
            grad_weights.append(aggregation.weight_grad(maps[direction], received) if needed else None)
        return grad, torch.stack(grad_attn, dim=1) if grad_attn else None, *grad_weights, None


def _write_block(block: BlockFeatures, target: FrameFeatures, rows: slice, num_frames: int) -> None:
    """Backbone features of clips ``rows`` (out [N, L, C], q/k [N, L, H, Dh], N = clips x frames) into
    ``target``'s out and attention maps."""
    target.out[rows] = block.out.unflatten(0, (-1, num_frames))
    if target.attn is not None:
        q, k = (x.unflatten(0, (-1, num_frames)) for x in (block.q, block.k))
        cross_frame_attention(q, k, out=target.attn[rows])


class TemporalCrossAttention(nn.Module):
    """Attention maps between adjacent frames from the frozen CLIP q/k, projected to C channels.

    For frame t, A = mean over heads of softmax(q_t k_{t-1}^T / sqrt(Dh)) over the patch tokens (CLS dropped),
    and the output for query patch q is sum_k A[q, k] W_prev[offset(q, k)]; the same with frame t+1 and
    W_next. The CLS row receives nothing. Maps [B, 2, T-1, P, P] (see :func:`cross_frame_attention`)
    -> [B, T, L, C].
    """

    def __init__(self, width: int, grid_h: int, grid_w: int) -> None:
        super().__init__()
        num_offsets = (2 * grid_h - 1) * (2 * grid_w - 1)
        self.grid = (grid_h, grid_w)
        self.w_prev = nn.Parameter(torch.zeros(num_offsets, width))
        self.w_next = nn.Parameter(torch.zeros(num_offsets, width))
        self.register_buffer("index", relative_position_index(grid_h, grid_w), persistent=False)
        self.materialize = False  # True: the paper's gather formulation (used for FLOP counting)

    def forward(self, attn: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        """attn [B, 2, T-1, P, P] or None (one frame) -> [B, T, L, C] (zero at CLS)."""
        b = 1 if attn is None else attn.shape[0]
        out = self.w_prev.new_zeros(b, num_frames, self.grid[0] * self.grid[1] + 1, self.w_prev.shape[1])
        return self.add_to(out, attn)

    def add_to(self, y: torch.Tensor, attn: torch.Tensor | None, batched: bool = False) -> torch.Tensor:
        """y [B, T, L, C] + :meth:`forward`, computed in place in y (which is returned); y must be a tensor
        of the caller's own, not one that autograd or the caller still needs unchanged.

        ``batched`` (GPUs): the paper's gathered [P, P, C] table, one batched matmul per direction over every
        clip and frame pair; otherwise (CPUs) :class:`RelativeAggregation`, group by group of queries."""
        self._check_grid(attn)
        if attn is None:
            return y
        attn = attn.to(self.w_prev.dtype)
        if self.materialize:
            return y + self._gathered(attn, y.shape[1])
        if batched:
            _receiving_patches(y, 0).add_(aggregate_relative_gather(attn[:, 0], self.w_prev, self.index))
            _receiving_patches(y, 1).add_(aggregate_relative_gather(attn[:, 1], self.w_next, self.index))
            return y
        aggregation = RelativeAggregation.for_maps(*self.grid, attn[:, 0, :, 0, 0].numel())
        return _AddCrossFrameTerms.apply(y, attn, self.w_prev, self.w_next, aggregation)

    def _gathered(self, attn: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The paper's formulation, with the [P, P, C] table gathered: [B, T, L, C]."""
        b, _, _, p, _ = attn.shape
        out = self.w_prev.new_zeros(b, num_frames, p + 1, self.w_prev.shape[1])
        # NOTE(ref): frame t gets (0 + previous-frame term) + next-frame term, in that order.
        out[:, 1:, 1:] += aggregate_relative_gather(attn[:, 0], self.w_prev, self.index)
        out[:, :-1, 1:] += aggregate_relative_gather(attn[:, 1], self.w_next, self.index)
        return out

    def _check_grid(self, attn: torch.Tensor | None) -> None:
        num_patches = self.grid[0] * self.grid[1]
        if attn is not None and attn.shape[-1] != num_patches:
            raise ValueError(
                f"temporal cross-attention was built for a {self.grid[0]}x{self.grid[1]} patch grid "
                f"({num_patches + 1} tokens per frame) but got {attn.shape[-1] + 1} tokens per frame; "
                "feed frames at the backbone's image size"
            )


# --------------------------------------------------------------------------------------------- decoder


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


class DecoderAttention(nn.Module):
    """Multi-head cross-attention with separate q/k/v/out projections (the official decoder's layout)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.folded: bool | None = None  # None: fold whenever cheaper; False: always project (FLOP counting)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        folded: bool | None = None,
        memory_norm: nn.LayerNorm | None = None,
    ) -> torch.Tensor:
        """x [B, Lq, C] attends to memory_norm(memory) (memory [B, Lm, C]; no norm: the memory) -> [B, Lq, C].

        ``folded`` (default: whenever it is cheaper, i.e. Lq * heads < C) takes :meth:`forward_folded`;
        otherwise the memory is projected to keys and values and attended with fused SDPA.
        """
        b, lq, c = x.shape
        folded = self.folded if folded is None else folded
        if folded is None:
            folded = lq * self.heads < c
        if folded:
            return self.forward_folded(x, memory, memory_norm)
        if memory_norm is not None:
            memory = memory_norm(memory)
        lm = memory.shape[1]
        d = c // self.heads
        q = self.q_proj(x).view(b, lq, self.heads, d).transpose(1, 2)
        k = self.k_proj(memory).view(b, lm, self.heads, d).transpose(1, 2)
        v = self.v_proj(memory).view(b, lm, self.heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, Lq, d]
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, c))

    def forward_folded(
        self, x: torch.Tensor, memory: torch.Tensor, memory_norm: nn.LayerNorm | None = None
    ) -> torch.Tensor:
        """The same attention with the key and value projections folded into the few queries.

        EVL's decoder has one query and a memory of T*L tokens, so projecting every memory token to keys
        and values (2 * T*L*C^2 multiply-adds, ~1.9 G per layer for B/16 8f) is most of its cost. Because
        q . (W_k m + b_k) = (W_k^T q) . m + const, and the constant cancels in the softmax, the scores need
        only W_k^T q per head; and since the attention weights sum to one, sum_j a_j (W_v m_j + b_v) =
        W_v (sum_j a_j m_j) + b_v. That is 2 * H*Lq*T*L*C multiply-adds: 64x fewer for B/16. Equal to the
        unfolded form within float rounding, gradients included (tested).
        """
        b, lq, c = x.shape
        h, d = self.heads, c // self.heads
        q = self.q_proj(x).view(b, lq, h, d) * d**-0.5
        w_k = self.k_proj.weight.view(h, d, c)
        w_v = self.v_proj.weight.view(h, d, c)
        keys_in_input_space = torch.einsum("bqhd,hdc->bhqc", q, w_k)  # [B, H, Lq, C]
        # q . b_k is the same for every key and cancels in the softmax; kept so that b_k stays in the graph
        # (zero gradient, as in the unfolded form, and weight decay treats it alike).
        key_bias = torch.einsum("bqhd,hd->bhq", q, self.k_proj.bias.view(h, d)).reshape(b, h * lq, 1)
        keys = keys_in_input_space.flatten(1, 2)
        context = attend_memory(keys, key_bias, memory, memory_norm)  # [B, H*Lq, C]
        context = context.view(b, h, lq, c)  # attention-weighted memory per head
        out = torch.einsum("bhqc,hdc->bqhd", context, w_v).reshape(b, lq, c) + self.v_proj.bias
        return self.out_proj(out)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = QuickGELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)
        for linear in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: query += Attn(norm1(query), norm3(memory)); query += MLP(norm2(query))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(width)
        self.norm2 = LayerNorm(width)
        self.norm3 = LayerNorm(width)
        self.attn = DecoderAttention(width, heads)
        self.mlp = Mlp(width, round(width * mlp_ratio), dropout)

    def attend(self, query: torch.Tensor, memory: torch.Tensor, lean: bool = False) -> torch.Tensor:
        """``lean``: normalise the memory inside the attention, which then keeps only the memory for
        backward, not its normalised copy too (less memory, slightly more time; same numbers)."""
        if lean:
            return query + self.attn(self.norm1(query), memory, memory_norm=self.norm3)
        return query + self.attn(self.norm1(query), self.norm3(memory))

    def feed_forward(self, query: torch.Tensor) -> torch.Tensor:
        return query + self.mlp(self.norm2(query))

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.attend(query, memory))


class EVLDecoder(nn.Module):
    """One learnable query gathering multi-layer frame features through M decoder layers.

    ``forward(features)`` takes one :class:`FrameFeatures` per decoder layer (block output [B, T, L, C] and
    cross-frame attention maps) and returns the final query [B, C].
    """

    def __init__(self, config: DecoderConfig, width: int, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.config = config
        m = config.num_layers
        # NOTE(ref): the official initialiser of the query is never called, so it starts at zero.
        self.query = nn.Parameter(torch.zeros(width))
        self.temporal_conv = (
            nn.ModuleList(TemporalConv(width) for _ in range(m)) if config.temporal_conv else None
        )
        self.temporal_pos_embed = (
            nn.ModuleList(TemporalPosEmbed(config.num_frames, width) for _ in range(m))
            if config.temporal_pos_embed
            else None
        )
        self.cross_attention = (
            nn.ModuleList(TemporalCrossAttention(width, *grid) for _ in range(m))
            if config.temporal_cross_attention
            else None
        )
        self.layers = nn.ModuleList(
            DecoderLayer(width, config.num_heads or heads, config.mlp_ratio, config.mlp_dropout)
            for _ in range(m)
        )
        # Execution choices, not part of the model (results are the same):
        # - checkpoint_memory: recompute each layer's memory in backward instead of storing it (and, in the
        #   CPU formulation, normalise it inside the attention, piece by piece). Worth it where memory is
        #   short; None: on for CPUs (host memory, training from videos), off on GPUs.
        # - formulation: "cpu" (loops sized to CPU caches), "batched" (an op count that does not grow with
        #   the batch, for GPUs) or "auto" (by the features' device; see evl.devices.resolve_formulation).
        self.checkpoint_memory: bool | None = None
        self.formulation = "auto"

    def memory(self, i: int, features: FrameFeatures, batched: bool = False) -> torch.Tensor:
        """The memory of decoder layer i: block output plus the temporal terms, [B, T, L, C], float32.

        Equal to :meth:`memory_reference`, computed with fewer passes over the [B, T, L, C] tensors.
        """
        x = features.out
        conv = None if self.temporal_conv is None else self.temporal_conv[i]
        pos_embed = None if self.temporal_pos_embed is None else self.temporal_pos_embed[i]
        # A new tensor: x may be the backbone's or the cache's.
        y = temporal_residual(x, conv, pos_embed, batched=batched)
        if self.cross_attention is not None:
            y = self.cross_attention[i].add_to(y, features.attn, batched=batched)
        return y

    def memory_reference(self, i: int, features: FrameFeatures) -> torch.Tensor:
        """:meth:`memory` as the plain sum of the temporal modules' own forwards."""
        x = features.out
        y = x
        if self.temporal_conv is not None:
            y = y + self.temporal_conv[i](x)
        if self.temporal_pos_embed is not None:
            y = y + self.temporal_pos_embed[i]()
        if self.cross_attention is not None:
            y = y + self.cross_attention[i](features.attn, x.shape[1])
        return y

    def attend(
        self, i: int, query: torch.Tensor, features: FrameFeatures, batched: bool = False, lean: bool = False
    ) -> torch.Tensor:
        """``lean``: normalise the memory inside the attention piece by piece (CPU formulation only)."""
        memory = self.memory(i, features, batched).flatten(1, 2)  # [B, T*L, C], frame-major
        return self.layers[i].attend(query, memory, lean=lean and not batched)

    def execution(self, device: torch.device) -> tuple[bool, bool]:
        """(batched formulation, memory recomputed in backward) for features on ``device``."""
        batched = resolve_formulation(self.formulation, device) == "batched"
        recompute = self.checkpoint_memory
        if recompute is None:
            recompute = device.type == "cpu"
        return batched, recompute

    def forward(self, features: list[FrameFeatures]) -> torch.Tensor:
        if len(features) != len(self.layers):
            raise ValueError(f"decoder has {len(self.layers)} layers but got {len(features)} feature maps")
        b = features[0].out.shape[0]
        batched, recompute = self.execution(features[0].out.device)
        query = self.query.expand(b, 1, -1)
        for i, layer in enumerate(self.layers):
            if recompute and torch.is_grad_enabled():
                # The memory ([B, T*L, C] per layer, and what building it saves for backward) is most of
                # the decoder's activation memory, and cheap to rebuild from the features in backward.
                query = checkpoint(self.attend, i, query, features[i], batched, True, use_reentrant=False)
            else:
                query = self.attend(i, query, features[i], batched)
            query = layer.feed_forward(query)
        return query[:, 0]


class ClassifierHead(nn.Module):
    """LayerNorm -> Dropout -> Linear, applied to the decoder query."""

    def __init__(self, width: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.norm = LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))


# ----------------------------------------------------------------------------------------------- model


def resolve_backbone_dtype(name: str, device: torch.device) -> torch.dtype:
    """The backbone's compute dtype; "auto" is float32 on CPUs (where half precision is emulated, many
    times slower) and the GPU's native half type on CUDA (:func:`evl.devices.resolve_precision`)."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown backbone dtype {name!r}; expected {', '.join(PRECISIONS)}")
    return resolve_precision(name, device)


class EVL(nn.Module):
    """Video classifier: videos [B, T, 3, H, W] (normalised) -> logits [B, num_classes]."""

    def __init__(self, config: ModelConfig, backbone: CLIPVisionTransformer | None = None) -> None:
        super().__init__()
        if backbone is not None and backbone.config != config.backbone:
            raise ValueError("the backbone module's config differs from config.backbone")
        self.config = config
        vision = config.backbone
        self.blocks = config.decoder.feeding_blocks(vision.layers)
        self.backbone = backbone if backbone is not None else CLIPVisionTransformer(vision)
        self.decoder = EVLDecoder(config.decoder, vision.width, vision.heads, (vision.grid_size,) * 2)
        self.head = ClassifierHead(vision.width, config.decoder.num_classes, config.decoder.head_dropout)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        # Clips per backbone pass without autograd; None: one on CPU, the whole batch on GPU.
        self.backbone_chunk: int | None = None
        self._fingerprint: str | None = None

    @property
    def frozen(self) -> bool:
        return self.config.freeze_backbone

    @property
    def vision_config(self) -> VisionConfig:
        """The image encoder's config: input size and normalisation for the data pipeline."""
        return self.config.backbone

    @property
    def num_classes(self) -> int:
        return self.config.decoder.num_classes

    def backbone_fingerprint(self) -> str:
        """sha256 of the frozen backbone's weights as loaded (see :func:`weights_fingerprint`), kept from
        before any cast to a GPU's compute dtype; a fine-tuned backbone's of its current weights."""
        if not self.frozen:
            return weights_fingerprint(self.backbone)
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.backbone)
        return self._fingerprint

    def train(self, mode: bool = True) -> EVL:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen backbone never leaves eval mode
        return self

    def to(self, *args, **kwargs) -> EVL:
        """``nn.Module.to``; a frozen backbone is then stored in its compute dtype on the new device
        (bfloat16 or float16 on GPUs: half the memory, and no cast of every weight at every forward). Its
        weights are never trained nor saved, so only a move back from a GPU sees the rounding."""
        super().to(*args, **kwargs)
        if self.frozen:
            device = self.backbone.conv1.weight.device
            dtype = resolve_backbone_dtype(self.config.backbone_dtype, device)
            if device.type == "cuda" and dtype != self.backbone.conv1.weight.dtype:
                self.backbone_fingerprint()  # of the weights as loaded, before the rounding
                self.backbone.to(dtype)
            elif device.type == "cpu" and self.backbone.conv1.weight.dtype != torch.float32:
                self.backbone.float()  # moved back from a GPU: CPUs compute in float32 (autocast below)
        return self

    # ----------------------------------------------------------------------------------------------- input
    def check_input(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"EVL expects videos [B, T, 3, H, W], got shape {tuple(video.shape)}")
        t = video.shape[1]
        if self.decoder.temporal_pos_embed is not None and t != self.config.decoder.num_frames:
            raise ValueError(
                f"this model was built for {self.config.decoder.num_frames} frames per clip, got {t} "
                "(the temporal position embedding has one row per frame)"
            )
        size = self.config.backbone.image_size
        if self.decoder.cross_attention is not None and tuple(video.shape[-2:]) != (size, size):
            raise ValueError(
                f"this model takes {size}x{size} frames, got {video.shape[-2]}x{video.shape[-1]}"
            )

    # -------------------------------------------------------------------------------------------- forwards
    def _backbone_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        return autocast(resolve_backbone_dtype(self.config.backbone_dtype, device), device)

    def extract_block_features(
        self, video: torch.Tensor, blocks: Sequence[int] | None = None
    ) -> list[BlockFeatures]:
        """Videos [B, T, 3, H, W] -> per block (default: the decoder's): out [B, T, L, C], q/k
        [B, T, L, H, Dh], in float32."""
        self.check_input(video)
        b, t = video.shape[:2]
        blocks = self.blocks if blocks is None else blocks
        with self._backbone_grad(), self._backbone_context(video.device):
            feats = self.backbone.forward_intermediates(video.flatten(0, 1), blocks)
        return [BlockFeatures(*(x.float().unflatten(0, (b, t)) for x in f)) for f in feats]

    def extract_features(
        self, video: torch.Tensor, blocks: Sequence[int] | None = None, with_attention: bool | None = None
    ) -> list[FrameFeatures]:
        """Videos [B, T, 3, H, W] -> what the decoder reads, one :class:`FrameFeatures` per block.

        With a frozen backbone this is a constant of the video: a feature cache stores exactly this (for
        any ``blocks``, with the attention maps even if this decoder has no cross-attention). Without
        autograd, the backbone runs ``backbone_chunk`` clips at a time, so its transient activations and
        the per-block q and k stay those of one chunk, whatever the batch size; each block's output and maps
        go straight into batch-sized tensors allocated up front, so nothing long-lived is allocated among
        the backbone's transients (which would leave the heap fragmented for the next step).
        """
        if with_attention is None:
            with_attention = self.decoder.cross_attention is not None
        self.check_input(video)
        blocks = self.blocks if blocks is None else tuple(blocks)
        if self._backbone_grad_enabled():
            return self._frame_features(video, blocks, with_attention)
        chunk = self.backbone_chunk
        if chunk is None:
            chunk = video.shape[0] if video.is_cuda else 1  # GPUs want big batches; CPUs small footprints
        features = self._empty_features(video, blocks, with_attention)
        with torch.no_grad():
            for start in range(0, video.shape[0], chunk):
                self._write_frame_features(video[start : start + chunk], blocks, features, start)
        return features

    def _empty_features(
        self, video: torch.Tensor, blocks: Sequence[int], with_attention: bool
    ) -> list[FrameFeatures]:
        """Uninitialised float32 features of ``video``: out [B, T, L, C], attn [B, 2, T-1, P, P]."""
        b, t, _, height, width = video.shape
        patch = self.config.backbone.patch_size
        p = (height // patch) * (width // patch)

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=torch.float32, device=video.device)

        with_attention = with_attention and t > 1
        return [
            FrameFeatures(
                empty(b, t, p + 1, self.config.backbone.width),
                empty(b, 2, t - 1, p, p) if with_attention else None,
            )
            for _ in blocks
        ]

    def _write_frame_features(
        self, video: torch.Tensor, blocks: Sequence[int], into: list[FrameFeatures], start: int
    ) -> None:
        """One backbone pass without autograd over clips start.. of ``into``; each block's q and k become
        attention maps (and are dropped) as soon as the block has run."""
        b, t = video.shape[:2]
        rows = slice(start, start + b)
        for index, block in self._backbone_steps(video.flatten(0, 1), blocks):
            for target in (f for f, wanted in zip(into, blocks, strict=True) if wanted == index):
                _write_block(block, target, rows, t)
            del block

    def _frame_features(
        self, video: torch.Tensor, blocks: Sequence[int], with_attention: bool
    ) -> list[FrameFeatures]:
        """One backbone pass with autograd (an open backbone): q and k of a block become attention maps as
        soon as the block has run."""
        b, t = video.shape[:2]
        found: dict[int, FrameFeatures] = {}
        with self._backbone_grad():
            for index, block in self._backbone_steps(video.flatten(0, 1), blocks):
                unflattened = BlockFeatures(*(x.float().unflatten(0, (b, t)) for x in block))
                del block
                found[index] = frame_features(unflattened, with_attention)
                del unflattened
        return [found[i] for i in blocks]

    def _backbone_steps(
        self, frames: torch.Tensor, blocks: Sequence[int]
    ) -> Iterator[tuple[int, BlockFeatures]]:
        """:meth:`CLIPVisionTransformer.iter_intermediates`, each step run in the backbone's dtype context
        (and what the caller does between steps, such as the float32 attention maps, outside it)."""
        steps = self.backbone.iter_intermediates(frames, blocks)
        while True:
            with self._backbone_context(frames.device):
                item = next(steps, None)
            if item is None:
                return
            yield item
            del item

    def _backbone_grad_enabled(self) -> bool:
        return not self.frozen and torch.is_grad_enabled()

    def _backbone_grad(self) -> contextlib.AbstractContextManager:
        return torch.enable_grad() if self._backbone_grad_enabled() else torch.no_grad()

    def forward_head(self, features: list[FrameFeatures]) -> torch.Tensor:
        """Decoder inputs (from :meth:`extract_features` or a feature cache) -> logits [B, num_classes]."""
        return self.head(self.decoder(features))

    def forward(self, x: torch.Tensor | list[FrameFeatures]) -> torch.Tensor:
        """Videos [B, T, 3, H, W], or decoder inputs from a feature cache -> logits [B, num_classes]."""
        if isinstance(x, list):
            return self.forward_head(x)
        return self.forward_head(self.extract_features(x))

    # ----------------------------------------------------------------------------------------------- state
    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Decoder and head (and the backbone only when it is fine-tuned): what a checkpoint stores."""
        state = self.state_dict()
        if self.frozen:
            state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return state

    def load_trainable_state_dict(
        self, state: Mapping[str, torch.Tensor], source: str = "checkpoint"
    ) -> None:
        """Strict load of :meth:`trainable_state_dict`, with one-line errors for mismatched keys or shapes."""
        load_exact_subset(
            self,
            self.trainable_state_dict(),
            state,
            source,
            shape_hint=" (different width, frame count or number of classes?)",
        )
