"""Cross-frame attention's relative-offset aggregation: out[q] = sum_k attn[q, k] * weight[offset(q, k)].

The paper's formulation gathers a [P, P, C] table (:func:`aggregate_relative_gather`, the reference and the
GPU formulation); :class:`RelativeAggregation` computes the same group by group of queries without it (the
CPU formulation), and :func:`add_cross_frame_terms` adds both directions' terms into the decoder memory in
place.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from evl.models.ops.precision import in_float32


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


def receiving_patches(x: torch.Tensor, direction: int, num_patches: int) -> torch.Tensor:
    """[B, T, L, C] -> view [B, T-1, P, C]: the patch tokens (the last P of each frame) of the frames that
    receive ``direction``'s term (0: frames 1.., which attend to their previous frame; 1: frames ..T-2, to
    their next)."""
    frames = x[:, 1:] if direction == 0 else x[:, :-1]
    return frames[:, :, x.shape[2] - num_patches :]


class _AddCrossFrameTerms(torch.autograd.Function):
    """y += the cross-frame terms of :class:`TemporalCrossAttention`, in place: no [B, T, L, C] temporary
    in forward, and the gradient of y passes through untouched."""

    @staticmethod
    @in_float32
    def forward(ctx, y, attn, w_prev, w_next, aggregation):
        maps = aggregation.prepare(attn.transpose(0, 1))  # direction first: each direction's maps contiguous
        for direction, weight in enumerate((w_prev, w_next)):
            aggregation.add_to(receiving_patches(y, direction, attn.shape[-1]), maps[direction], weight)
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
            received = receiving_patches(grad, direction, maps.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_attn.append(aggregation.attn_grad(weight, received))
            needed = ctx.needs_input_grad[2 + direction]
            grad_weights.append(aggregation.weight_grad(maps[direction], received) if needed else None)
        return grad, torch.stack(grad_attn, dim=1) if grad_attn else None, *grad_weights, None


def add_cross_frame_terms(
    y: torch.Tensor,
    attn: torch.Tensor,
    w_prev: torch.Tensor,
    w_next: torch.Tensor,
    aggregation: RelativeAggregation,
) -> torch.Tensor:
    """y [B, T, L, C] += each frame's terms from its previous (w_prev) and next (w_next) frame, attn
    [B, 2, T-1, P, P]; in place, y returned."""
    return _AddCrossFrameTerms.apply(y, attn, w_prev, w_next, aggregation)


def add_cross_frame_terms_gathered(
    y: torch.Tensor, attn: torch.Tensor, w_prev: torch.Tensor, w_next: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """:func:`add_cross_frame_terms` with the gathered table: one batched matmul per direction over every
    clip and frame pair (the GPU formulation; plain autograd)."""
    num_patches = attn.shape[-1]
    receiving_patches(y, 0, num_patches).add_(aggregate_relative_gather(attn[:, 0], w_prev, index))
    receiving_patches(y, 1, num_patches).add_(aggregate_relative_gather(attn[:, 1], w_next, index))
    return y
