"""A long, untrimmed video as a timeline: what the model sees in each window, and where the action changes.

``evl.load(RUN).timeline("match.mp4", window=2.0, stride=1.0)`` classifies windows of ``window`` seconds
every ``stride`` seconds (:mod:`evl.engine.window_pass`, :mod:`evl.video.windows`: one streamed read of the
video, memory independent of its length) and merges them into segments:

* a **window** keeps its top-k classes and their probabilities (softmax over the run's classes, or over any
  class list a text method is given);
* a **segment** is a run of consecutive windows with the same top-1 class; its score is the mean of their
  top-1 probabilities. A boundary between two segments lies halfway between the centres of the last window
  of one and the first window of the next: a window is assigned the moment at its centre, so a change seen
  between two window centres is placed between them, at most half a stride from either. The first segment
  starts at 0 and the last one ends with the video. No smoothing: one window that disagrees with both
  neighbours is a segment of its own.

Results are written as JSON (windows and segments), CSV (segments; windows in long form), a PNG (the top
classes' probabilities over time, segments shaded; :mod:`evl.engine.timeline_plot`) and an overlay mp4 (the
video with the current label and score drawn on each frame; :mod:`evl.video.captions`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evl.engine.predict import Predictor
from evl.engine.scoring import class_scores
from evl.engine.timeline_plot import plot_timeline
from evl.engine.window_pass import forward_windows, plan_video_windows, window_transform
from evl.io import atomic_write_text
from evl.video.captions import caption_video
from evl.video.decode import printable_path, probe
from evl.video.windows import FrameStore, WindowPlan

__all__ = [
    "Segment",
    "Timeline",
    "WindowPrediction",
    "merge_segments",
    "overlay",
    "predict_timeline",
    "timeline_from_probabilities",
    "unique_stems",
    "write_segments_csv",
    "write_timeline_files",
    "write_timeline_json",
    "write_windows_csv",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowPrediction:
    """One window: its time span in seconds and its top-k classes, best first."""

    start: float
    end: float
    labels: list[int]
    classes: list[str]
    probabilities: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "predictions": [
                {"label": i, "class": c, "probability": p}
                for i, c, p in zip(self.labels, self.classes, self.probabilities, strict=True)
            ],
        }


@dataclass(frozen=True)
class Segment:
    """Consecutive windows ``first..last`` sharing the top-1 class ``label``, from ``start`` to ``end``
    seconds; ``score`` is the mean of their top-1 probabilities."""

    start: float
    end: float
    label: int
    name: str
    score: float
    first: int
    last: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "label": self.label,
            "class": self.name,
            "score": self.score,
            "windows": [self.first, self.last],
        }


@dataclass(frozen=True)
class Timeline:
    """A video's windows and segments. ``probabilities`` is float32 [W, K]: every class, every window."""

    path: str
    classes: list[str]
    plan: WindowPlan
    probabilities: np.ndarray
    windows: list[WindowPrediction]
    segments: list[Segment]

    @property
    def duration(self) -> float:
        return self.plan.duration

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "path": self.path,
            "fps": plan.fps,
            "num_frames": plan.num_frames,
            "duration": plan.duration,
            "window": {
                "seconds": plan.length / plan.fps,
                "frames": plan.length,
                "stride_seconds": plan.stride / plan.fps,
                "stride_frames": plan.stride,
                "sampling": plan.sampling,
                "frames_per_clip": int(plan.indices.shape[1]),
            },
            "windows": [w.to_dict() for w in self.windows],
            "segments": [s.to_dict() for s in self.segments],
        }


def merge_segments(
    labels: Sequence[int],
    scores: Sequence[float],
    centres: Sequence[float],
    duration: float,
    classes: Sequence[str],
) -> list[Segment]:
    """Runs of equal consecutive ``labels`` (each window's top-1) as segments, bounded halfway between the
    centres of the windows on either side of a change (module docstring). ``scores`` are the windows' top-1
    probabilities, ``centres`` their centre times in seconds (increasing)."""
    labels = [int(label) for label in labels]
    if not labels:
        return []
    if not len(labels) == len(scores) == len(centres):
        raise ValueError(f"{len(labels)} labels, {len(scores)} scores and {len(centres)} centres")
    changes = [k for k in range(1, len(labels)) if labels[k] != labels[k - 1]]
    firsts, lasts = [0, *changes], [k - 1 for k in changes] + [len(labels) - 1]
    bounds = [0.0, *((centres[k - 1] + centres[k]) / 2 for k in changes), float(duration)]
    return [
        Segment(
            start=float(bounds[i]),
            end=float(bounds[i + 1]),
            label=labels[first],
            name=classes[labels[first]],
            score=float(np.mean(scores[first : last + 1])),
            first=first,
            last=last,
        )
        for i, (first, last) in enumerate(zip(firsts, lasts, strict=True))
    ]


def predict_timeline(
    predictor: Predictor,
    path: str | Path,
    window: float | None = 2.0,
    stride: float | None = None,
    *,
    window_frames: int | None = None,
    stride_frames: int | None = None,
    topk: int = 5,
    batch_size: int = 8,
    progress: bool = False,
    store: FrameStore | None = None,
) -> Timeline:
    """The timeline of one video under a loaded run: windows of ``window`` seconds every ``stride``
    seconds (default: half a window), or in frames (``window_frames``, ``stride_frames``, which win).

    Any method works, a text method with whatever classes it was given (``predictor.classes``).
    ``store`` is passed on to :func:`~evl.video.windows.window_clips` (its ``peak`` shows the frames held).
    """
    meta = probe(path)
    plan = plan_video_windows(predictor.views, meta, window, stride, window_frames, stride_frames)
    logger.debug(
        "%s: %d windows of %d frames every %d, %s sampling",
        printable_path(path),
        len(plan),
        plan.length,
        plan.stride,
        plan.sampling,
    )
    model = predictor.model
    probabilities = np.zeros((len(plan), len(predictor.classes)), dtype=np.float32)
    for first, probs in forward_windows(
        model,
        path,
        plan,
        window_transform(predictor.views),
        lambda clips: class_scores(model, model(clips)),
        batch_size=batch_size,
        progress=progress,
        store=store,
    ):
        probabilities[first : first + len(probs)] = probs.numpy()
    return timeline_from_probabilities(printable_path(path), predictor.classes, plan, probabilities, topk)


def timeline_from_probabilities(
    path: str, classes: Sequence[str], plan: WindowPlan, probabilities: np.ndarray, topk: int = 5
) -> Timeline:
    """Windows (top-k) and segments of per-window ``probabilities`` [W, K] over ``plan``'s windows."""
    classes = list(classes)
    if probabilities.shape != (len(plan), len(classes)):
        raise ValueError(
            f"probabilities of shape {probabilities.shape} for {len(plan)} windows of {len(classes)} classes"
        )
    k = max(1, min(topk, len(classes)))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]  # ties: the lower label first
    starts, ends = plan.start_times, plan.end_times
    windows = [
        WindowPrediction(
            float(starts[w]),
            float(ends[w]),
            [int(i) for i in order[w]],
            [classes[i] for i in order[w]],
            [float(probabilities[w, i]) for i in order[w]],
        )
        for w in range(len(plan))
    ]
    top = order[:, 0]
    scores = probabilities[np.arange(len(plan)), top]
    segments = merge_segments(top, scores, plan.centres, plan.duration, classes)
    return Timeline(path, classes, plan, probabilities, windows, segments)


# ---------------------------------------------------------------------------------------------- outputs


def write_timeline_json(timeline: Timeline, path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(timeline.to_dict(), indent=2) + "\n")


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_segments_csv(timeline: Timeline, path: str | Path) -> Path:
    """``start,end,label,class,score``: one row per segment, times in seconds."""
    rows = [(f"{s.start:.3f}", f"{s.end:.3f}", s.label, s.name, f"{s.score:.6f}") for s in timeline.segments]
    return atomic_write_text(path, _csv_text(("start", "end", "label", "class", "score"), rows))


def write_windows_csv(timeline: Timeline, path: str | Path) -> Path:
    """``window,start,end,rank,label,class,probability``: one row per window and top-k rank (long form)."""
    rows = [
        (w, f"{win.start:.3f}", f"{win.end:.3f}", rank, label, name, f"{prob:.6f}")
        for w, win in enumerate(timeline.windows)
        for rank, (label, name, prob) in enumerate(
            zip(win.labels, win.classes, win.probabilities, strict=True)
        )
    ]
    header = ("window", "start", "end", "rank", "label", "class", "probability")
    return atomic_write_text(path, _csv_text(header, rows))


def overlay(path: str | Path, timeline: Timeline, out_mp4: str | Path) -> Path:
    """``path`` re-encoded into ``out_mp4`` with the current label and score drawn on every frame: those
    of the window whose centre is nearest the frame's time (so the label is the segment's)."""
    centres = timeline.plan.centres
    fps = timeline.plan.fps
    captions = [f"{w.classes[0]}  {w.probabilities[0]:.0%}" for w in timeline.windows]
    # Halfway points between centres: frame time t belongs to the window whose interval holds it.
    edges = (centres[1:] + centres[:-1]) / 2

    def caption(index: int) -> str:
        return captions[int(np.searchsorted(edges, index / fps, side="right"))]

    return caption_video(path, out_mp4, caption)


def unique_stems(paths: Sequence[str | Path]) -> list[str]:
    """File-name stems for per-video outputs in one folder: ``clip``, and ``clip-2``, ``clip-3``... for
    videos of the same name from different folders."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def write_timeline_files(
    timeline: Timeline, out_dir: str | Path, stem: str, overlay_from: str | Path | None = None
) -> dict[str, Path]:
    """Every output of one video into ``out_dir``: ``STEM.timeline.json``, ``STEM.segments.csv``,
    ``STEM.windows.csv``, ``STEM.timeline.png``, and ``STEM.overlay.mp4`` drawn over ``overlay_from`` (the
    video the timeline was made from) when given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "json": write_timeline_json(timeline, out / f"{stem}.timeline.json"),
        "segments": write_segments_csv(timeline, out / f"{stem}.segments.csv"),
        "windows": write_windows_csv(timeline, out / f"{stem}.windows.csv"),
        "plot": plot_timeline(timeline, out / f"{stem}.timeline.png"),
    }
    if overlay_from is not None:
        written["overlay"] = overlay(overlay_from, timeline, out / f"{stem}.overlay.mp4")
    return written
