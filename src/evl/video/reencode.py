"""Re-encoding one video (or one segment of it) into a small H.264 mp4 that a data loader reads fast.

Training decodes a short clip from a random place of each video. Its cost is set by the frame size and by
the distance from the keyframe before the clip: downloaded videos are often 720p or more with a keyframe
every 4-10 seconds, so each clip decodes hundreds of large frames it then throws away. The output here has
its short side brought to ``short_side`` (aspect kept, sizes even, never enlarged) and a keyframe every
``keyframe_interval`` frames, so a clip decodes at most that many small frames before its own.

The output is upright (a rotated source is turned, not tagged), at the source's average frame rate with
one output frame per decoded source frame (a variable-rate source becomes constant-rate), and without
audio. It is written to a temporary file renamed into place when complete (:func:`evl.io.atomic_path`),
so a killed run leaves no half file under the output's name; the temporary files it leaves are found and
removed by :func:`clear_interrupted_writes`. Each output carries a tag of the settings that made it, which
tells an output of this module (complete, since it was renamed into place) from any other file.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from evl.io import atomic_path
from evl.video.decode import VideoDecodeError, VideoMeta, printable_path, probe

__all__ = [
    "TAG_PREFIX",
    "EncodeSettings",
    "Segment",
    "clear_interrupted_writes",
    "output_size",
    "output_state",
    "pick_encoder",
    "reencode",
]

PathLike = str | os.PathLike

TAG_PREFIX = "evl prepare"
# H.264 encoders in order of preference; mpeg4 (FFmpeg's own, always built) when no H.264 encoder is.
ENCODERS = ("libx264", "libopenh264", "mpeg4")
# Frames this close to a segment's bounds count as inside: timestamps are rounded to the time base.
_TIME_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Segment:
    """The part of a video to keep: frames shown from ``start`` (inclusive) to ``end`` (exclusive) seconds."""

    start: float
    end: float


@dataclass(frozen=True)
class EncodeSettings:
    """How outputs are encoded. ``crf`` is x264's constant rate factor (lower: larger and closer)."""

    short_side: int = 256
    keyframe_interval: int = 16
    crf: int = 23
    preset: str = "veryfast"

    def __post_init__(self) -> None:
        if self.short_side < 2:
            raise ValueError(f"short_side must be >= 2, got {self.short_side}")
        if self.keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1, got {self.keyframe_interval}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in 0..51 (x264's range), got {self.crf}")

    def tag(self, encoder: str, segment: Segment | None) -> str:
        """The text stored in an output's ``comment`` metadata: what made it, to compare on a later run."""
        cut = f" segment={segment.start:g}-{segment.end:g}" if segment else ""
        return (
            f"{TAG_PREFIX}: short_side={self.short_side} keyframe_interval={self.keyframe_interval} "
            f"crf={self.crf} preset={self.preset} encoder={encoder}{cut}"
        )


def pick_encoder() -> str:
    """The first of :data:`ENCODERS` this FFmpeg build can encode with."""
    for name in ENCODERS:
        if name in av.codecs_available:
            try:
                av.Codec(name, "w")
            except ValueError:  # av's UnknownCodecError: a decoder only
                continue
            return name
    raise RuntimeError(f"no video encoder among {ENCODERS} in this FFmpeg build")


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at ``short_side`` (not enlarged), aspect kept, both even."""
    scale = min(1.0, short_side / min(width, height))
    return _even(width * scale), _even(height * scale)


def output_state(path: PathLike, tag: str) -> str:
    """What is at an output's path: ``"missing"``; ``"complete"`` (written by this module with the settings
    ``tag`` describes); ``"outdated"`` (written by this module with other settings, so it may be replaced);
    ``"foreign"`` (anything else: never replaced, since someone else put it there)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            written = container.metadata.get("comment", "")
            frames = container.streams.video[0].frames if container.streams.video else 0
    except (av.FFmpegError, OSError, UnicodeDecodeError):
        return "foreign"
    if not written.startswith(TAG_PREFIX + ":"):
        return "foreign"
    return "complete" if written == tag and frames > 0 else "outdated"


def clear_interrupted_writes(output: PathLike) -> list[Path]:
    """Remove the temporary files that writers of ``output`` killed mid-way left beside it; returns them.

    They are named by :func:`evl.io.atomic_path`: ``.{name}.{pid in hex}-{8 hex digits}.tmp``. A file whose
    process is still running is another writer's, at work now, and is left alone.
    """
    output = Path(output)
    pattern = re.compile(rf"\.{re.escape(output.name)}\.([0-9a-f]+)-[0-9a-f]{{8}}\.tmp")
    removed = []
    if not output.parent.is_dir():
        return removed
    for entry in output.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _process_alive(int(match.group(1), 16)):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def reencode(
    source: PathLike,
    output: PathLike,
    settings: EncodeSettings,
    segment: Segment | None = None,
    encoder: str | None = None,
    threads: int = 0,
) -> int:
    """Write ``source`` (or its ``segment``) to ``output`` as described in the module docstring.

    ``threads`` is the decoder's and encoder's thread count (0: FFmpeg's choice; 1 when many files are
    encoded side by side in processes). Returns the number of frames written.

    Raises:
        VideoDecodeError: the source cannot be read, or holds no frame in ``segment``.
    """
    meta = probe(source)  # one-line errors for empty, missing or non-video files
    encoder = encoder or pick_encoder()
    with av.open(os.fspath(source), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        frames = _frames_in(container, stream, segment)
        first = next(frames, None)
        if first is None:
            where = f" between {segment.start:g} and {segment.end:g} s" if segment else ""
            raise VideoDecodeError(
                f"{printable_path(source)}: no frames{where} (the video lasts {meta.duration:.3g} s)"
            )
        tag = settings.tag(encoder, segment)
        with atomic_path(output) as tmp:
            return _write_mp4(tmp, itertools.chain([first], frames), meta, settings, tag, encoder, threads)


def _write_mp4(
    path: Path,
    frames: Iterator[av.VideoFrame],
    meta: VideoMeta,
    settings: EncodeSettings,
    tag: str,
    encoder: str,
    threads: int,
) -> int:
    width, height = output_size(meta.width, meta.height, settings.short_side)
    rate = Fraction(meta.fps).limit_denominator(1001) if meta.fps > 0 else Fraction(25)
    count = 0
    # The name has a .tmp suffix, from which no container can be guessed: mp4 is named.
    with av.open(str(path), mode="w", format="mp4") as container:
        container.metadata["comment"] = tag
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = settings.keyframe_interval
        stream.codec_context.thread_count = threads
        stream.options = _encoder_options(encoder, settings, threads)
        if encoder != "libx264":  # the others take a bit rate: about 0.15 bit per pixel per frame
            stream.codec_context.bit_rate = int(width * height * float(rate) * 0.15)
        turns = meta.rotation // 90
        for frame in frames:
            image = _resized(frame, turns, width, height)
            # Frame n at n / rate: a resized frame keeps the source's time base, which the encoder would
            # otherwise rescale this count from.
            image.pts, image.time_base = count, 1 / rate
            container.mux(stream.encode(image))
            count += 1
        container.mux(stream.encode())
    return count


def _encoder_options(encoder: str, settings: EncodeSettings, threads: int) -> dict[str, str]:
    if encoder != "libx264":
        return {}
    k = settings.keyframe_interval
    # A keyframe exactly every k frames (scenecut off: no extra ones that would shift the others).
    params = f"keyint={k}:min-keyint={k}:scenecut=0"
    if threads:
        params += f":threads={threads}:lookahead-threads=1"
    return {"crf": str(settings.crf), "preset": settings.preset, "x264-params": params}


def _resized(frame: av.VideoFrame, turns: int, width: int, height: int) -> av.VideoFrame:
    """The frame upright, at (width, height), in yuv420p. Area averaging: no aliasing when shrinking a lot."""
    if turns:
        image = np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), k=-turns))  # clockwise
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
    return frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")


def _frames_in(
    container: av.container.InputContainer, stream: av.VideoStream, segment: Segment | None
) -> Iterator[av.VideoFrame]:
    """Decoded frames of ``stream``: all, or those shown within ``segment`` (from a seek near its start)."""
    if segment is None:
        yield from container.decode(stream)
        return
    origin = float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
    sought = segment.start > 0 and stream.time_base is not None and _seek(container, stream, segment, origin)
    decoded = container.decode(stream)
    first = next(decoded, None)
    if sought and first is not None and _time(first, origin, 0) > segment.start + _TIME_TOLERANCE:
        container.seek(0)  # an approximate seek landed past the start: read from the beginning instead
        decoded = container.decode(stream)
        first = next(decoded, None)
    for index, frame in enumerate(itertools.chain([first] if first is not None else [], decoded)):
        shown = _time(frame, origin, index / float(stream.average_rate or 25))
        if shown < segment.start - _TIME_TOLERANCE:
            continue
        if shown >= segment.end - _TIME_TOLERANCE:
            return
        yield frame


def _seek(
    container: av.container.InputContainer, stream: av.VideoStream, segment: Segment, origin: float
) -> bool:
    """Go to the keyframe at or before the segment's start; False (position unchanged) if the file cannot."""
    try:
        container.seek(int((segment.start + origin) / stream.time_base), backward=True, stream=stream)
    except av.FFmpegError:
        return False
    return True


def _time(frame: av.VideoFrame, origin: float, counted: float) -> float:
    """Seconds from the video's start at which ``frame`` is shown; ``counted`` when it has no timestamp."""
    return counted if frame.time is None else frame.time - origin


def _even(size: float) -> int:
    return max(2, 2 * round(size / 2))


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: alive
    return True
