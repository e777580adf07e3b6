"""Learned position embeddings on a patch grid, resized to another grid: what every ViT family does when an
image has another size than the table was trained for, at load time or at run time."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def square_grid_side(rows: int, prefix: int = 0) -> int | None:
    """The side g of a square g x g patch grid whose table has ``rows`` rows after ``prefix`` non-patch rows
    (a class token's); None when they do not form a square."""
    side = math.isqrt(max(rows - prefix, 0))
    return side if side * side == rows - prefix else None


def resize_position_table(
    table: torch.Tensor,
    size: tuple[int, int],
    prefix: int = 0,
    mode: str = "bicubic",
    antialias: bool = False,
) -> torch.Tensor:
    """Position embeddings [prefix + g*g, C] of a square g x g patch grid -> [prefix + h*w, C] for ``size``
    = (h, w): the ``prefix`` rows (a class token's) kept, the grid interpolated in float32, row-major.

    The table itself is returned when the grid already has that size.
    """
    old = square_grid_side(table.shape[0], prefix)
    if old is None:
        raise ValueError(f"{table.shape[0] - prefix} position embeddings do not form a square grid")
    if (old, old) == tuple(size):
        return table
    grid = table[prefix:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, C, g, g]
    grid = F.interpolate(grid, size=tuple(size), mode=mode, align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(size[0] * size[1], -1).to(table.dtype)
    return torch.cat([table[:prefix], grid], dim=0) if prefix else grid
