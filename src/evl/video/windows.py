"""A long video as a row of overlapping windows, each sampled as one clip, read in a single streamed pass.

Window ``k`` covers frames ``[k * stride, k * stride + length)``; windows start every ``stride`` frames as
long as they fit, so the last ``< stride`` frames may fall in no window of their own (a video shorter than
one window is one window of its whole length). Each window is sampled as a run samples a clip at test time,
with the same ``num_frames`` frames:

* **dense**, when the run samples densely and its span (``(num_frames - 1) * stride + 1`` frames) fits in
  the window: the run's stride, centred in the window, so that frames are as far apart in time as the model
  saw them in training;
* **segment** otherwise (or when the run samples segments): the centre frame of each of ``num_frames``
  equal parts of the window, so that the clip covers the whole window rather than padding with its last
  frame.

Reading: :func:`window_clips` decodes the video once (:func:`~evl.video.decode.iter_frames`), converts
only the frames some window needs, keeps each one transformed (resized, cropped, normalised: what the
model takes) only until the last window needing it is complete, and hands the windows over in batches. Since
windows start in order and share one offset pattern, a frame is never needed again once a window that
starts after it is complete: what is held at any time is the frames of the open window's span (a few
windows' worth when windows overlap) plus one batch, whatever the video's length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evl.video.decode import iter_frames
from evl.video.sampling import SamplingConfig, dense_indices, segment_indices
from evl.video.transforms import EvalTransform

__all__ = ["FrameStore", "WindowBatch", "WindowPlan", "frames_in", "plan_windows", "window_clips"]


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of one video lie and which frames each one samples.

    ``indices`` is int64 [W, T]: the frames of window ``k``, increasing along T. Times are seconds from the
    first frame, frame ``i`` shown from ``i / fps``.
    """

    fps: float
    num_frames: int  # in the video
    length: int  # frames per window
    stride: int  # frames between window starts
    sampling: str  # "dense" or "segment": how each window's frames were chosen (module docstring)
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def starts(self) -> np.ndarray:
        """First frame of each window, int64 [W]."""
        return np.arange(len(self), dtype=np.int64) * self.stride

    @property
    def start_times(self) -> np.ndarray:
        return self.starts / self.fps

    @property
    def end_times(self) -> np.ndarray:
        return (self.starts + self.length) / self.fps

    @property
    def centres(self) -> np.ndarray:
        return (self.starts + self.length / 2) / self.fps

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def frames_in(seconds: float, fps: float, what: str) -> int:
    """``seconds`` as a whole number of frames (at least one); ``what`` names it in errors."""
    if not seconds > 0:
        raise ValueError(f"{what} must be > 0 seconds, got {seconds}")
    if not fps > 0:
        raise ValueError(f"the video's frame rate is unknown: give the {what} in frames")
    return max(1, round(seconds * fps))


def plan_windows(
    num_frames: int, fps: float, sampling: SamplingConfig, length: int, stride: int
) -> WindowPlan:
    """Windows of ``length`` frames every ``stride`` frames over a video of ``num_frames`` frames, each
    sampled into ``sampling.num_frames`` frames (dense or segment: see the module docstring)."""
    if num_frames < 1:
        raise ValueError(f"cannot cut windows from a video of {num_frames} frames")
    if length < 1 or stride < 1:
        raise ValueError(f"window length and stride must be >= 1 frame, got {length} and {stride}")
    if not fps > 0:
        raise ValueError(f"a window plan needs the frame rate, got {fps}")
    length = min(length, num_frames)
    count = (num_frames - length) // stride + 1
    dense = sampling.kind == "dense" and sampling.span <= length
    if dense:
        offsets = dense_indices(length, sampling.num_frames, sampling.stride)  # centred in the window
    else:
        offsets = segment_indices(length, sampling.num_frames)  # segment centres
    indices = np.arange(count, dtype=np.int64)[:, None] * stride + offsets[None, :]
    return WindowPlan(fps, num_frames, length, stride, "dense" if dense else "segment", indices)


@dataclass(frozen=True)
class WindowBatch:
    """Consecutive windows ``first, first + 1, ...`` as clips [B, T, 3, S, S]."""

    first: int
    clips: torch.Tensor


class FrameStore:
    """The transformed frames waiting for their windows, by index; it counts what it holds (``peak``), so
    that the memory bound of a streamed pass can be checked rather than trusted."""

    def __init__(self) -> None:
        self.frames: dict[int, torch.Tensor] = {}
        self.peak = 0

    def __len__(self) -> int:
        return len(self.frames)

    def put(self, index: int, frame: torch.Tensor) -> None:
        self.frames[index] = frame
        self.peak = max(self.peak, len(self.frames))

    def clip(self, indices: np.ndarray) -> torch.Tensor:
        return torch.stack([self.frames[int(i)] for i in indices])

    def drop_before(self, index: int) -> None:
        for old in [i for i in self.frames if i < index]:
            del self.frames[old]

    def clear(self) -> None:
        self.frames.clear()


def window_clips(
    path: str | Path,
    plan: WindowPlan,
    transform: EvalTransform,
    batch_size: int,
    store: FrameStore | None = None,
) -> Iterator[WindowBatch]:
    """The windows of ``plan`` as clips, ``batch_size`` at a time, from one pass over the video.

    ``transform`` (one spatial view) turns each needed frame into what the model takes as soon as it is
    decoded; it acts on every frame alone (resize, crop, normalise), so a clip of transformed frames equals
    the transformed clip. ``store`` (default: a new one) holds the frames in between; pass one to look at
    its ``peak`` afterwards.
    """
    if transform.config.num_spatial_views != 1:
        raise ValueError("window clips take one spatial view (a centre crop)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    store = FrameStore() if store is None else store
    needed = np.unique(plan.indices)
    batch: list[torch.Tensor] = []
    done = 0  # windows complete so far; they complete in order, since their last frames increase
    for index, image in iter_frames(path, needed):
        store.put(index, transform(image[None])[0, 0])  # [3, S, S]
        while done < len(plan) and plan.indices[done, -1] <= index:
            batch.append(store.clip(plan.indices[done]))
            done += 1
            if done < len(plan):
                store.drop_before(int(plan.indices[done, 0]))  # no later window starts before it
            if len(batch) == batch_size:
                yield WindowBatch(done - len(batch), torch.stack(batch))
                batch = []
    store.clear()  # the last window is complete
    if batch:
        yield WindowBatch(done - len(batch), torch.stack(batch))
