"""``evl explain``'s pictures: attention heat maps laid over the frames, and class similarity over time.

Built on :class:`matplotlib.figure.Figure` directly, as :mod:`evl.engine.plots`: no pyplot, no backend
switch, nothing kept alive between calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from evl.engine.explain import Explanation
from evl.engine.plots import save_png

MAX_COLUMNS = 16  # frames drawn per row; longer clips show this many, evenly spaced
MAX_LINES = 5  # classes drawn over time
HEAT_ALPHA = 0.75  # opacity of the most attended place
HEAT_COLORMAP = "jet"
CELL_INCHES = 1.6


def draw_explanation(explanation: Explanation, out_dir: Path, dpi: int = 100) -> list[Path]:
    """Every picture the explanation has: one per decoder layer and the cross-frame one (attention maps),
    or the class similarity over time (text methods)."""
    written = []
    attention = explanation.attention
    if attention is not None:
        for layer in range(attention.query.shape[1]):
            fig = layer_figure(explanation, layer)
            written.append(save_png(fig, out_dir / f"attention_layer{layer}.png", dpi))
        if explanation.patch is not None:
            written.append(save_png(cross_frame_figure(explanation), out_dir / "cross_frame.png", dpi))
    if explanation.frame_similarity is not None:
        written.append(save_png(similarity_figure(explanation), out_dir / "class_similarity.png", dpi))
    return written


def shown_frames(num_frames: int, limit: int = MAX_COLUMNS) -> list[int]:
    """The frames a row shows: all of them, or ``limit`` evenly spaced from first to last."""
    if num_frames <= limit:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (limit - 1)) for i in range(limit)})


def layer_figure(explanation: Explanation, layer: int) -> Figure:
    """Decoder layer ``layer``: the query's attention over each frame's patches (top row; each frame's
    share of the query's attention in its title), and the encoder's class token's attention in the same
    block (bottom row, where the encoder has a class token). One colour scale per row."""
    attention = explanation.attention
    assert attention is not None
    frames = explanation.frames.numpy()
    columns = shown_frames(len(frames))
    query = attention.query_patches()[0, layer]  # [T, rows, cols]
    frame_mass = attention.query[0, layer].sum(dim=-1)  # [T], sums to one with the class tokens' share
    rows = [("decoder query", query, [f"t={t}  {100 * float(frame_mass[t]):.0f}%" for t in columns])]
    if attention.class_token is not None:
        cls = attention.patches(attention.class_token[0, layer])  # [T, rows, cols]
        rows.append(("image encoder's\nclass token", cls, [f"t={t}" for t in columns]))
    fig = Figure(
        figsize=(CELL_INCHES * len(columns) + 1.2, CELL_INCHES * len(rows) + 0.7), layout="constrained"
    )
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (name, maps, titles) in enumerate(rows):
        # One scale for the row, its least to its most attended patch: frames compare by colour.
        low, high = float(maps[columns].min()), float(maps[columns].max())
        for c, t in enumerate(columns):
            ax = axes[r, c]
            _overlay(ax, frames[t], maps[t].numpy(), low, high)
            ax.set_title(titles[c], fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=9)
    prefix = float(attention.query[0, layer, :, : attention.prefix_tokens].sum())
    fig.suptitle(
        f"{Path(explanation.path).name}: decoder layer {layer} reading encoder block "
        f"{attention.blocks[layer]} (query on class tokens: {100 * prefix:.0f}%); "
        f"predicted {explanation.class_names[explanation.top(1)[0]]}",
        fontsize=10,
    )
    return fig


def cross_frame_figure(explanation: Explanation) -> Figure:
    """The chosen patch of frame t (marked, middle) and its cross-frame attention over the patches of frames
    t-1 (left) and t+1 (right), as the temporal module of that decoder layer reads it."""
    attention, choice = explanation.attention, explanation.patch
    assert attention is not None and choice is not None
    frames = explanation.frames.numpy()
    previous, following = attention.previous_and_next(
        choice.layer, choice.frame, choice.index(attention.grid)
    )
    fig = Figure(figsize=(3 * 2.6, 3.2), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [
        (choice.frame - 1, previous, f"frame {choice.frame - 1}: attention from the patch"),
        (choice.frame, None, f"frame {choice.frame}: the patch"),
        (choice.frame + 1, following, f"frame {choice.frame + 1}: attention from the patch"),
    ]
    for ax, (t, maps, title) in zip(axes, panels, strict=True):
        if not 0 <= t < len(frames):
            ax.set_axis_off()
            ax.set_title(f"no frame {t}", fontsize=8)
            continue
        if maps is None:
            ax.imshow(frames[t])
            _hide_ticks(ax)
        else:
            _overlay(ax, frames[t], maps[0].numpy(), float(maps[0].min()), float(maps[0].max()))
        _mark_patch(ax, choice.row, choice.col, attention.grid, frames.shape[1:3])
        ax.set_title(title, fontsize=8)
    fig.suptitle(
        f"{Path(explanation.path).name}: cross-frame attention of patch ({choice.row}, {choice.col}) in "
        f"decoder layer {choice.layer} (encoder block {attention.blocks[choice.layer]})",
        fontsize=10,
    )
    return fig


def similarity_figure(explanation: Explanation) -> Figure:
    """Each of the top classes' cosine similarity with each frame, over the frames."""
    similarity = explanation.frame_similarity
    assert similarity is not None
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    t = np.arange(similarity.shape[0])
    for rank, label in enumerate(explanation.top(MAX_LINES)):
        probability = float(explanation.probabilities[label])
        ax.plot(
            t,
            similarity[:, label].numpy(),
            marker="o",
            markersize=3,
            linewidth=2.0 if rank == 0 else 1.2,
            label=f"{explanation.class_names[label]} ({100 * probability:.0f}%)",
        )
    ax.set(xlabel="frame", ylabel="cosine similarity with the class text")
    ax.set_xticks(t if len(t) <= 32 else t[:: max(1, len(t) // 16)])
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(f"{Path(explanation.path).name}: per-frame similarity ({explanation.method})", fontsize=10)
    return fig


def _overlay(ax: Axes, frame: np.ndarray, heat: np.ndarray, low: float, high: float) -> None:
    """``frame`` uint8 [S, S, 3] under ``heat`` [rows, cols] stretched over it (bilinear): colour and opacity
    grow from ``low`` (transparent) to ``high``, so the frame stays visible where little attention goes."""
    height, width = frame.shape[:2]
    grid = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]
    smooth = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    level = np.clip((smooth - low) / max(high - low, 1e-12), 0.0, 1.0)
    rgba = colormaps[HEAT_COLORMAP](level)
    rgba[..., 3] = HEAT_ALPHA * level
    ax.imshow(frame)
    ax.imshow(rgba)
    _hide_ticks(ax)


def _mark_patch(ax: Axes, row: int, col: int, grid: tuple[int, int], size: tuple[int, int]) -> None:
    patch_h, patch_w = size[0] / grid[0], size[1] / grid[1]
    ax.add_patch(
        Rectangle(
            (col * patch_w, row * patch_h), patch_w, patch_h, fill=False, edgecolor="white", linewidth=2
        )
    )
    ax.set_xlim(0, size[1])
    ax.set_ylim(size[0], 0)


def _hide_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
