"""Temporal sampling: which frames of a video make up a clip.

Two schemes, both pure functions of the video length that return ``np.int64`` frame indices:

* **dense** (Kinetics): ``num_frames`` frames ``stride`` apart from one start frame. Training draws the
  start at random; testing takes ``num_views`` starts spread from the beginning to the end of the video.
* **segment** (TSN, Something-Something): the video is cut into ``num_frames`` equal segments and one frame is
  taken from each, at random in training and at the segment's centre at test.

Randomness only comes from the ``np.random.Generator`` passed in: ``rng=None`` means test-time sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from evl.config import DataConfig

SamplingKind = Literal["dense", "segment"]


@dataclass(frozen=True)
class SamplingConfig:
    """How clips are drawn from a video.

    ``stride`` only applies to dense sampling; ``num_temporal_views`` is the clips per video at test.
    """

    kind: SamplingKind = "dense"
    num_frames: int = 8
    stride: int = 16
    num_temporal_views: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "segment"):
            raise ValueError(f"SamplingConfig: kind must be 'dense' or 'segment', got {self.kind!r}")
        _check_positive(
            num_frames=self.num_frames, stride=self.stride, num_temporal_views=self.num_temporal_views
        )

    @classmethod
    def from_data(cls, data: DataConfig) -> SamplingConfig:
        """The sampling a run's data settings describe (training draws one of the temporal views)."""
        return cls(
            kind=data.sampling,  # type: ignore[arg-type]  # DataConfig validates it
            num_frames=data.num_frames,
            stride=data.frame_stride,
            num_temporal_views=data.num_temporal_views,
        )

    @property
    def span(self) -> int:
        """Frames covered by one dense clip, first to last sampled frame inclusive."""
        return (self.num_frames - 1) * self.stride + 1


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _check_video(num_video_frames: int) -> None:
    if num_video_frames < 1:
        raise ValueError(
            f"cannot sample frames from a video with {num_video_frames} frames (an empty video?)"
        )


def _check_view(view: int, num_views: int) -> None:
    _check_positive(num_views=num_views)
    if not 0 <= view < num_views:
        raise ValueError(f"view {view} is outside [0, {num_views})")


def dense_indices(
    num_video_frames: int,
    num_frames: int,
    stride: int,
    rng: np.random.Generator | None = None,
    view: int = 0,
    num_views: int = 1,
) -> np.ndarray:
    """Frame indices of a dense clip: ``num_frames`` frames ``stride`` apart.

    Args:
        num_video_frames: frames in the video (n).
        num_frames: frames in the clip (T).
        stride: gap between consecutive sampled frames.
        rng: training mode when given: the start is uniform in ``[0, max(0, n - span)]``. ``view`` and
            ``num_views`` are then ignored.
        view: at test, which of the ``num_views`` temporal views to return.
        num_views: at test, the number of views. One view is the centred clip; several views start at
            ``round(slide * i / (num_views - 1))`` with ``slide = max(0, n - span)``, from the start of the
            video to its end.

    Returns:
        int64 [T]. A video shorter than the clip's span ``(T - 1) * stride + 1`` gives ``i * stride`` clipped
        to ``n - 1``, i.e. the clip is padded with the last frame.
    """
    _check_video(num_video_frames)
    _check_positive(num_frames=num_frames, stride=stride)
    slide = max(0, num_video_frames - ((num_frames - 1) * stride + 1))
    if rng is not None:
        start = int(rng.integers(0, slide + 1))
    else:
        _check_view(view, num_views)
        # NOTE(ref): the official test loader centres a single view (slide // 2) and spreads several views
        # with Python's round(slide / (V - 1) * i), which rounds halves to even; we match both exactly.
        start = slide // 2 if num_views == 1 else round(slide / (num_views - 1) * view)
    # NOTE(ref): short videos repeat their last frame, as the official loader pads with it.
    return np.minimum(start + np.arange(num_frames, dtype=np.int64) * stride, num_video_frames - 1)


def segment_indices(
    num_video_frames: int,
    num_frames: int,
    rng: np.random.Generator | None = None,
    view: int = 0,
    num_views: int = 1,
) -> np.ndarray:
    """TSN frame indices: one frame from each of ``num_frames`` equal segments of the video.

    Segment ``i`` covers the real interval ``[i * n / T, (i + 1) * n / T)``. Training (``rng`` given) takes a
    uniformly random point of each segment; test takes the point at fraction ``(view + 0.5) / num_views`` of
    each segment (its centre for one view). A point ``x`` selects frame ``floor(x)``.

    Returns:
        int64 [T], non-decreasing and within ``[0, n - 1]``; when ``n < T`` segments are shorter than a frame
        and neighbouring segments may share a frame.
    """
    _check_video(num_video_frames)
    _check_positive(num_frames=num_frames)
    if rng is not None:
        offsets = rng.random(num_frames)
    else:
        _check_view(view, num_views)
        offsets = np.full(num_frames, (view + 0.5) / num_views)
    # Official EVL draws from integer segments of (n - 1) / T frames; float boundaries are the TSN definition
    # and give equal-length segments for every n.
    points = (np.arange(num_frames) + offsets) * (num_video_frames / num_frames)
    return np.clip(np.floor(points).astype(np.int64), 0, num_video_frames - 1)


def clip_indices(
    kind: SamplingKind,
    num_video_frames: int,
    num_frames: int,
    stride: int = 1,
    rng: np.random.Generator | None = None,
    view: int = 0,
    num_views: int = 1,
) -> np.ndarray:
    """Dispatch to :func:`dense_indices` or :func:`segment_indices` (which ignores ``stride``); int64 [T]."""
    if kind == "dense":
        return dense_indices(num_video_frames, num_frames, stride, rng=rng, view=view, num_views=num_views)
    if kind == "segment":
        return segment_indices(num_video_frames, num_frames, rng=rng, view=view, num_views=num_views)
    raise ValueError(f"unknown sampling kind {kind!r}; expected 'dense' or 'segment'")


def temporal_views(
    config: SamplingConfig, num_video_frames: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """All clips to decode for one video: int64 [V, T].

    Training (``rng`` given) draws one clip, V = 1; test returns ``config.num_temporal_views`` clips.
    """
    num_views = 1 if rng is not None else config.num_temporal_views
    return np.stack(
        [
            clip_indices(
                config.kind,
                num_video_frames,
                config.num_frames,
                config.stride,
                rng=rng,
                view=view,
                num_views=num_views,
            )
            for view in range(num_views)
        ]
    )
