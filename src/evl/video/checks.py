"""Is a video file usable for training? Its metadata, and whether a few of its frames decode.

A check reads what a data loader will need (frame count, frame rate, size) through the same
:func:`evl.video.decode.probe` and :func:`~evl.video.decode.read_frames` that training uses, and decodes
three frames (first, middle, last), each from the keyframe before it: a file that is empty, not a video,
cut short or corrupted is found in milliseconds instead of deep inside a training run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import av

from evl.video.decode import VideoDecodeError, printable_path, probe, read_frames
from evl.video.parallel import map_in_processes

__all__ = ["VideoCheck", "check_video", "check_videos"]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class VideoCheck:
    """What one file holds; ``ok`` False means it cannot be trained on, and ``reason`` says why.

    ``path`` is the path as given. The numbers are 0 (and ``codec`` empty) where the file could not be
    read far enough to know them.
    """

    path: str
    ok: bool
    reason: str = ""
    frames: int = 0
    fps: float = 0.0
    seconds: float = 0.0
    width: int = 0
    height: int = 0
    codec: str = ""


def check_video(path: PathLike) -> VideoCheck:
    """Probe ``path`` and decode its first, middle and last frames; never raises for a bad file."""
    path = os.fspath(path)
    try:
        meta = probe(path)  # decodes the first frame
        codec = _codec_name(path)
        for index in sorted({meta.num_frames // 2, meta.num_frames - 1} - {0}):
            read_frames(path, [index], meta)  # one call each: a seek to each, not a decode of all between
    except VideoDecodeError as err:
        return VideoCheck(path, ok=False, reason=_without_path(str(err), path))
    except Exception as err:  # one odd file must not end a survey of thousands
        return VideoCheck(path, ok=False, reason=f"cannot be read ({type(err).__name__}: {err})")
    return VideoCheck(
        path,
        ok=True,
        frames=meta.num_frames,
        fps=meta.fps,
        seconds=meta.duration,
        width=meta.width,
        height=meta.height,
        codec=codec,
    )


def check_videos(
    paths: list[PathLike], workers: int = 1, progress: bool = True, desc: str = "checking videos"
) -> list[VideoCheck]:
    """:func:`check_video` for every path, in ``workers`` processes; results in the order of ``paths``."""
    return map_in_processes(check_video, [os.fspath(p) for p in paths], workers, progress, desc)


def _codec_name(path: str) -> str:
    with av.open(path, metadata_errors="ignore") as container:
        return container.streams.video[0].codec_context.name


def _without_path(message: str, path: str) -> str:
    """The reason alone: decode errors start with the file's name, which the caller already shows."""
    prefix = f"{printable_path(path)}: "
    return message[len(prefix) :] if message.startswith(prefix) else message
