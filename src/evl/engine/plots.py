"""Training curves and confusion matrices as PNG files.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: no display,
no global backend switch, no figure kept alive between calls.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from evl.io import atomic_write_bytes

MAX_TICK_LABELS = 40  # beyond this many classes the labels overlap into a grey band
MAX_CELL_TEXT = 12  # print the value in each cell up to this many classes


def read_metrics(path: str | Path) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Read a long-format ``step,split,name,value`` CSV into ``{(split, name): (steps, values)}``.

    Steps are sorted and unique: a resumed run logs again the steps after its last checkpoint, and the
    later value (the one the run kept) wins.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"step", "split", "name", "value"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)} (need step,split,name,value)")
        series: dict[tuple[str, str], dict[int, float]] = {}
        for row in reader:
            series.setdefault((row["split"], row["name"]), {})[int(float(row["step"]))] = float(row["value"])
    return {
        key: (np.array(sorted(points), dtype=np.int64), np.array([points[s] for s in sorted(points)]))
        for key, points in series.items()
    }


def ema_smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard's smoothing); NaN/inf points are skipped."""
    out = np.full(len(values), np.nan)
    average, norm = 0.0, 0.0
    for i, value in enumerate(values):
        if math.isfinite(value):
            average = weight * average + (1.0 - weight) * value
            norm = weight * norm + (1.0 - weight)
        if norm > 0:
            out[i] = average / norm  # dividing by the weights' sum removes the pull towards 0 at the start
    return out


def save_png(fig: Figure, out_png: str | Path, dpi: int) -> Path:
    """``fig`` as a PNG file, written atomically (every picture of the engine goes out this way)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(out_png, buffer.getvalue())


def _empty_note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_training_curves(
    metrics_csv_path: str | Path,
    out_png: str | Path,
    loss_name: str = "loss",
    val_metric: str = "top1",
    smoothing: float = 0.9,
    dpi: int = 100,
) -> Path:
    """Two panels against step: training loss (raw points + EMA line) and validation top-1."""
    series = read_metrics(metrics_csv_path)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)

    if ("train", loss_name) in series:
        steps, loss = series[("train", loss_name)]
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="raw")
        ax_loss.plot(steps, ema_smooth(loss, smoothing), color="tab:blue", linewidth=1.8, label="EMA")
        ax_loss.legend(loc="upper right")
    else:
        _empty_note(ax_loss, "no training loss logged yet")
    ax_loss.set(title=f"train {loss_name}", xlabel="step", ylabel=loss_name)

    title = f"val {val_metric}"
    if ("val", val_metric) in series:
        steps, acc = series[("val", val_metric)]
        ax_val.plot(steps, acc, marker="o", color="tab:orange")
        if np.isfinite(acc).any():
            best = int(np.nanargmax(acc))
            title += f" (best {acc[best]:.2f} at step {steps[best]})"
    else:
        _empty_note(ax_val, "no validation yet")
    ax_val.set(title=title, xlabel="step", ylabel=f"{val_metric} (%)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    return save_png(fig, out_png, dpi)


def plot_confusion_matrix(
    cm: np.ndarray,
    class_names: Sequence[str] | None,
    out_png: str | Path,
    normalize: bool = True,
    dpi: int = 100,
) -> Path:
    """Heat map of ``cm`` (int [C, C], rows true, columns predicted), readable from 2 to 400 classes.

    ``normalize`` divides each row by its count (per-class recall on the diagonal). Tick labels are hidden
    beyond ``MAX_TICK_LABELS`` classes; the title gives the overall accuracy.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"plot_confusion_matrix: expected a square matrix, got shape {cm.shape}")
    num_classes = cm.shape[0]
    names = [str(c) for c in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"plot_confusion_matrix: {len(names)} class names for {num_classes} classes")

    total = cm.sum()
    accuracy = 100.0 * np.trace(cm) / total if total else float("nan")
    rows = cm.sum(axis=1, keepdims=True)
    values = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0) if normalize else cm

    side = 4.0 + 0.2 * min(num_classes, MAX_TICK_LABELS)  # inches; 5 for 5 classes, 12 from 40 on
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", interpolation="nearest", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class" if normalize else "videos")

    if num_classes <= MAX_TICK_LABELS:
        ticks = np.arange(num_classes)
        ax.set_xticks(ticks, names, rotation=90, fontsize=8)
        ax.set_yticks(ticks, names, fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if num_classes <= MAX_CELL_TEXT:
        threshold = values.max() / 2 if values.size else 0
        for (i, j), v in np.ndenumerate(values):
            text = f"{v:.2f}" if normalize else str(int(v))
            ax.text(
                j, i, text, ha="center", va="center", fontsize=8, color="white" if v > threshold else "black"
            )

    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(f"Confusion matrix, {num_classes} classes, top-1 {accuracy:.2f}% ({int(total)} videos)")
    return save_png(fig, out_png, dpi)
