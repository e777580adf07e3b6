"""One pass of a model over the windows of a long video: what the timeline and window embeddings share.

The windows are cut and sampled by :mod:`evl.video.windows` from the run's own clip sampling; each window
is one clip, one centre crop, normalised as the run evaluates, and windows go through the model
``batch_size`` at a time, under the method's inference context (a text method encodes its class prompts
once for the whole video).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from evl.engine.methods import inference_context
from evl.engine.scoring import evaluation_out_of_memory, forward_or_none, model_device
from evl.video.dataset import EvalViews
from evl.video.decode import VideoMeta
from evl.video.transforms import EvalTransform
from evl.video.windows import FrameStore, WindowPlan, frames_in, plan_windows, window_clips

__all__ = ["forward_windows", "plan_video_windows", "window_transform"]


def plan_video_windows(
    views: EvalViews,
    meta: VideoMeta,
    window: float | None = None,
    stride: float | None = None,
    window_frames: int | None = None,
    stride_frames: int | None = None,
) -> WindowPlan:
    """The windows of a video: ``window`` seconds every ``stride`` seconds (default: half a window), or
    the same in frames (``window_frames``, ``stride_frames``, which win over seconds), each sampled as
    ``views`` samples a clip."""
    if window_frames is None:
        if window is None:
            raise ValueError("give the window length, in seconds or in frames")
        window_frames = frames_in(window, meta.fps, "window")
    if stride_frames is None:
        stride_frames = (
            frames_in(stride, meta.fps, "stride") if stride is not None else max(1, window_frames // 2)
        )
    if window_frames < 1 or stride_frames < 1:
        raise ValueError(f"window and stride must be >= 1 frame, got {window_frames} and {stride_frames}")
    if not meta.fps > 0:
        raise ValueError(f"{meta.path}: the frame rate is unknown, so windows have no times")
    return plan_windows(meta.num_frames, meta.fps, views.sampling, window_frames, stride_frames)


def window_transform(views: EvalViews) -> EvalTransform:
    """The run's evaluation transform (size, normalisation) with one centre crop: a window is one clip."""
    config = dataclasses.replace(views.transform.config, num_spatial_views=1)
    return EvalTransform(config)


@torch.no_grad()
def forward_windows(
    model: nn.Module,
    path: str | Path,
    plan: WindowPlan,
    transform: EvalTransform,
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 8,
    progress: bool = False,
    store: FrameStore | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first window, forward(clips) on the CPU in float32)`` per batch of windows, in order.

    ``forward`` maps clips [B, T, 3, S, S] on the model's device to one row per clip. Running out of device
    memory raises :class:`~evl.devices.DeviceOutOfMemory` naming ``batch_size``. ``store`` is passed to
    :func:`~evl.video.windows.window_clips`.
    """
    device = model_device(model)
    bar = tqdm(total=len(plan), desc="windows", unit="window", disable=not progress, leave=False)
    try:
        with inference_context(model):
            for batch in window_clips(path, plan, transform, batch_size, store):
                clips = batch.clips.to(device)
                outputs = forward_or_none(forward, clips)
                if outputs is None:
                    del clips
                    raise evaluation_out_of_memory(batch_size, len(batch.clips)) from None
                yield batch.first, outputs.float().cpu()
                bar.update(len(batch.clips))
    finally:
        bar.close()
