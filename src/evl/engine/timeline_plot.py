"""A video's timeline as a PNG: the top classes' probabilities over time, its segments shaded.

Built on :class:`matplotlib.figure.Figure` directly, as :mod:`evl.engine.plots`: no pyplot, no backend
switch, nothing kept alive between calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from evl.engine.plots import save_png

if TYPE_CHECKING:
    from evl.engine.timeline import Timeline

MAX_LINES = 6  # classes drawn as lines; more turn the plot into a tangle
MIN_LABELLED_SEGMENT = 0.04  # segments narrower than this fraction of the video get no name on the plot


def plotted_classes(timeline: Timeline, limit: int = MAX_LINES) -> list[int]:
    """Which classes get a line: those that win a segment (longest total time first), then the rest by
    their highest probability in any window, up to ``limit``."""
    airtime: dict[int, float] = {}
    for segment in timeline.segments:
        airtime[segment.label] = airtime.get(segment.label, 0.0) + segment.end - segment.start
    chosen = sorted(airtime, key=lambda label: (-airtime[label], label))[:limit]
    peaks = timeline.probabilities.max(axis=0) if len(timeline.probabilities) else np.zeros(0)
    for label in np.argsort(-peaks, kind="stable"):
        if len(chosen) >= limit:
            break
        if int(label) not in chosen:
            chosen.append(int(label))
    return chosen


def plot_timeline(timeline: Timeline, out_png: str | Path, dpi: int = 100) -> Path:
    """Probability against time (window centres) for :func:`plotted_classes`; each segment shaded in the
    colour of its class and named at the top when it is wide enough to read."""
    labels = plotted_classes(timeline)
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig = Figure(figsize=(12, 4), layout="constrained")
    ax = fig.subplots()
    duration = max(timeline.duration, 1e-9)
    for segment in timeline.segments:
        colour = colours.get(segment.label, "0.5")
        ax.axvspan(segment.start, segment.end, color=colour, alpha=0.12, linewidth=0)
        if (segment.end - segment.start) / duration >= MIN_LABELLED_SEGMENT:
            ax.text(
                (segment.start + segment.end) / 2,
                1.02,
                segment.name,
                ha="center",
                va="bottom",
                fontsize=8,
                color=colour,
                clip_on=False,
            )
    centres = timeline.plan.centres
    for label in labels:
        ax.plot(
            centres,
            timeline.probabilities[:, label],
            color=colours[label],
            marker="." if len(centres) < 60 else None,
            linewidth=1.5,
            label=timeline.classes[label],
        )
    plan = timeline.plan
    ax.set(
        xlim=(0, timeline.duration),
        ylim=(0, 1),
        xlabel="time (s)",
        ylabel="probability",
    )
    segments = len(timeline.segments)
    ax.set_title(
        f"{Path(timeline.path).name}: {len(plan)} windows of {plan.length / plan.fps:.2f} s every "
        f"{plan.stride / plan.fps:.2f} s, {segments} segment{'s' if segments != 1 else ''}",
        pad=16,
    )
    ax.grid(alpha=0.3)
    if labels:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return save_png(fig, out_png, dpi)
