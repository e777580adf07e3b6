"""Decoding video files with PyAV: probe the metadata, then decode only the frames a clip needs.

Frame indices count frames in presentation order from 0. Turning an index into a timestamp to seek to
(and a decoded frame's timestamp back into an index) depends on the stream:

* constant frame rate: when the container's sample table (mp4 / mov / avi keep one in memory) lists every
  frame at evenly spaced times, index ``i`` sits at ``start + i * step`` with ``step = 1 / (fps *
  time_base)``, and a frame's index is ``round((pts - start) / step)``; ``start`` is the smallest pts
  among the first few packets. Only those packets are read beyond the frames decoded.
* variable frame rate, or a container without a full sample table (mkv, webm, ts): the pts of every
  packet is read by demuxing the file once (no decoding); sorted, they give each index its exact pts.
* no timestamps at all (raw elementary streams): frames are counted while decoding from the start.

In the first two cases decoding starts at the keyframe before the first wanted frame and stops right after
the last one, so a request near the end of a long video decodes a few frames, not the whole video. When a
seek lands after the wanted frame (approximate MPEG-TS seeks), decoding starts over from the beginning.
"""

from __future__ import annotations

import itertools
import operator
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = [
    "MAX_FRAME_PIXELS",
    "VideoDecodeError",
    "VideoMeta",
    "iter_frames",
    "printable_path",
    "probe",
    "read_frames",
]

PathLike = str | os.PathLike

# More packets than any encoder reorders (x264 allows at most 16 B-frames).
_MAX_REORDER = 32

# Larger frames are refused before decoding: twice 8K UHD, far above any dataset, and a clip of such frames
# would take gigabytes. A header declaring a size is enough to trip it, so a hostile file costs nothing.
MAX_FRAME_PIXELS = 8192 * 8192

# How a DataLoader worker's exception reaches the main process: type(err)(this text + the worker's traceback).
_WORKER_RERAISE = "Caught VideoDecodeError in DataLoader worker"


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened or decoded; the message is one line naming the file and the reason.

    Raised in a DataLoader worker, it reaches the main process rebuilt from a text that holds the worker's
    whole traceback; the constructor keeps only the original one-line message.
    """

    def __init__(self, message: str = "") -> None:
        message = str(message)
        if message.startswith(_WORKER_RERAISE):
            # The traceback's last line is "evl.video.decode.VideoDecodeError: <message>".
            last = message.rstrip("\n").rsplit("\n", 1)[-1]
            _, found, original = last.partition("VideoDecodeError: ")
            message = original if found else last
        super().__init__(message)


def printable_path(path: PathLike) -> str:
    """``path`` as text that any stream or UTF-8 file accepts: the bytes of a file name that is not valid
    UTF-8 (kept by Python as lone surrogates) are shown as ``\\xNN`` escapes."""
    return os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class VideoMeta:
    """What a frame sampler needs to know about a video.

    ``num_frames`` is exact when the container stores a frame count (mp4, mov, avi) and otherwise estimated
    from ``duration * fps``. ``rotation`` is the clockwise turn, in degrees (0, 90, 180 or 270), that
    displays the coded frames upright (the convention of the ``rotate`` tag); ``width`` and ``height`` are
    the displayed size, after that turn. :func:`read_frames` returns frames already turned.
    """

    path: str
    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    rotation: int


def probe(path: PathLike) -> VideoMeta:
    """Read a video's metadata; only its first frame is decoded (for the displayed size and rotation)."""
    with _open_video(path) as (container, stream):
        first = next(_iter_frames(container, stream), None)
        if first is None:
            raise VideoDecodeError(f"{printable_path(path)}: no decodable video frames")
        fps = _frame_rate(stream)
        duration = _duration(container, stream)
        num_frames = stream.frames
        rotation = _rotation(first, stream)
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
    if num_frames <= 0:  # mkv, webm and raw streams store no frame count
        num_frames = round(duration * fps) if duration > 0 and fps > 0 else _count_packets(path)
    if duration <= 0 and fps > 0:
        duration = num_frames / fps
    return VideoMeta(str(path), max(num_frames, 1), fps, duration, width, height, rotation)


def read_frames(path: PathLike, indices: Sequence[int], meta: VideoMeta | None = None) -> np.ndarray:
    """Decode the frames at ``indices`` (presentation order, from 0), upright and in RGB.

    Indices may be unsorted and may repeat (short videos pad a clip with their last frame); the output
    follows their order. An index past the last frame gives the last frame, since stored frame counts can
    be too high. ``meta`` (from :func:`probe`) only spares opening the file for an empty request.

    Returns:
        uint8 [len(indices), H, W, 3], H and W being the displayed size.

    Raises:
        VideoDecodeError: the file is missing, unreadable, a directory, empty, not a video, has no video
            stream, no decodable frame or frames larger than ``MAX_FRAME_PIXELS``, or its data is corrupted
            or truncated before a requested frame.
        ValueError: ``indices`` is not a 1-D sequence of non-negative integers.
    """
    order = _as_indices(indices)
    if order.size == 0:
        meta = meta if meta is not None else probe(path)
        return np.zeros((0, meta.height, meta.width, 3), dtype=np.uint8)
    wanted = np.unique(order).tolist()  # sorted: one forward pass serves every index
    with _open_video(path) as (container, stream):
        picked = _decode_range(container, stream, wanted)
        if not picked:
            raise VideoDecodeError(f"{printable_path(path)}: no decodable video frames")
        # Several indices can share one frame (padding, repeats): convert each frame once.
        images = {id(frame): _to_rgb(frame, stream) for frame in picked.values()}
    return np.stack([images[id(picked[index])] for index in order.tolist()])


def iter_frames(path: PathLike, indices: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Stream a video once from its start: ``(index, frame)`` in presentation order, upright and in RGB.

    For videos too long to hold: one frame at a time is converted and handed over, and nothing is kept.
    ``indices`` (strictly increasing) selects the frames to convert and yield; the others are decoded,
    since the codec needs them, but never converted. Frames are the ones :func:`read_frames` returns for
    the same indices: an index with no frame of its own (a gap left by dropped frames) gets the frame on
    screen at that moment, and an index past the last frame gets the last frame, unless the container's
    index promised it (then the data is truncated: VideoDecodeError). Without ``indices``, every frame is
    yielded, up to the last one decoded.

    Yields:
        (index, uint8 [H, W, 3]), H and W being the displayed size.

    Raises:
        VideoDecodeError: as :func:`read_frames`.
        ValueError: ``indices`` holds a negative number or is not strictly increasing (raised on reaching
            the offending index).
    """
    every = indices is None
    targets = itertools.count() if every else _increasing(indices)
    with _open_video(path) as (container, stream):
        timeline = _timeline(container, stream)
        target = next(targets, None)
        held: av.VideoFrame | None = None
        index = -1
        for frame in _iter_frames(container, stream):
            if target is None:
                return
            index = timeline.index_of(frame.pts, index)
            while target is not None and index > target:
                # No frame of its own: the one on screen then, or the first frame if none was yet.
                yield target, _to_rgb(frame if held is None else held, stream)
                target = next(targets, None)
            if target == index:
                yield target, _to_rgb(frame, stream)
                target = next(targets, None)
            held = frame
        if held is None:
            raise VideoDecodeError(f"{printable_path(path)}: no decodable video frames")
        while target is not None and not every:
            if target < timeline.num_frames:
                raise VideoDecodeError(
                    f"{printable_path(path)}: truncated or corrupted video data: frame {target} of "
                    f"{timeline.num_frames} could not be decoded"
                )
            yield target, _to_rgb(held, stream)
            target = next(targets, None)


def _increasing(indices: Iterable[int]) -> Iterator[int]:
    """``indices`` as ints, checked on the way: non-negative and strictly increasing."""
    previous = -1
    for value in indices:
        index = operator.index(value)
        if index <= previous:
            raise ValueError(
                f"iter_frames needs strictly increasing indices >= 0, got {index} after {previous}"
            )
        previous = index
        yield index


# ------------------------------------------------------------------------------------- frame selection


@dataclass(frozen=True)
class _Timeline:
    """Maps presentation-order frame indices to pts (in ``stream.time_base`` units) and back.

    Either a constant-rate grid (``start + i * step``), or the sorted pts of every frame (``table``), or
    neither, when the stream has no timestamps and frames can only be counted. ``num_frames`` is how many
    frames the container's index promises (0 when it promises none).
    """

    start: int = 0
    step: Fraction | None = None
    table: np.ndarray | None = None
    num_frames: int = 0

    @property
    def seekable(self) -> bool:
        return self.step is not None or (self.table is not None and self.table.size > 0)

    def pts_of(self, index: int) -> int:
        if self.table is not None:
            return int(self.table[min(index, self.table.size - 1)])
        return self.start + round(index * self.step)

    def index_of(self, pts: int | None, previous: int) -> int:
        """The index of a decoded frame with timestamp ``pts``; ``previous`` is the last frame's index."""
        if pts is None or not self.seekable:
            return previous + 1
        if self.table is not None:
            # A pts missing from the table (should not happen) counts as the frame before it.
            return int(np.searchsorted(self.table, pts, side="right")) - 1
        return round((pts - self.start) / self.step)


def _timeline(container: av.container.InputContainer, stream: av.VideoStream) -> _Timeline:
    """Choose how to locate frames in ``stream`` (see the module docstring)."""
    rate = stream.average_rate or stream.guessed_rate
    num_frames = _uniform_frame_count(stream)
    if rate and num_frames:
        # The first shown frame need not be the first packet (B-frames), nor match stream.start_time
        # (AVI reports 0 where its first frame has pts 1): take the smallest pts among the first packets.
        head = _packet_pts(container.name, stream.index, max_packets=_MAX_REORDER)
        start = int(head[0]) if head is not None and head.size else stream.start_time or 0
        step = 1 / (Fraction(rate) * stream.time_base)
        return _Timeline(start=start, step=step, num_frames=num_frames)
    table = _packet_pts(container.name, stream.index)
    return _Timeline(table=table, num_frames=0 if table is None else table.size)


def _uniform_frame_count(stream: av.VideoStream) -> int | None:
    """The number of frames in the in-memory sample table (mp4/mov/avi keep one), if they are evenly
    spaced in time; None for a variable frame rate or an index that does not list every frame.

    The table holds decode timestamps, which are evenly spaced exactly when the frame rate is constant
    (B-frames reorder pts, not dts). Rounding to a coarse time base (e.g. 33/34 ms steps at 29.97 fps)
    is tolerated.
    """
    entries = stream.index_entries
    if entries is None or stream.frames < 2 or len(entries) != stream.frames:
        return None
    times = np.array([entry.timestamp for entry in entries], dtype=np.float64)
    step = (times[-1] - times[0]) / (times.size - 1)
    if step <= 0 or np.abs(times - times[0] - step * np.arange(times.size)).max() >= 0.25 * step:
        return None
    return sum(not entry.is_discard for entry in entries)  # frames cut by an edit list are never shown


def _packet_pts(path: str, stream_index: int, max_packets: int | None = None) -> np.ndarray | None:
    """Sorted pts of the frames of a stream (all, or the first ``max_packets`` in decode order), read by
    demuxing (no decoding) through a second handle, which leaves the caller's position alone.

    Returns None when the packets carry no timestamps. A read error ends the scan early: the frames
    before it can still be decoded.
    """
    pts: list[int] = []
    with av.open(path, metadata_errors="ignore") as container:
        packets = container.demux(container.streams[stream_index])
        try:
            for packet in packets:
                if packet.size == 0 or packet.is_discard:  # end-of-stream marker, or cut by an edit list
                    continue
                if packet.pts is None:
                    return None
                pts.append(packet.pts)
                if len(pts) == max_packets:
                    break
        except av.FFmpegError:
            pass
    return np.unique(np.asarray(pts, dtype=np.int64))


def _decode_range(
    container: av.container.InputContainer, stream: av.VideoStream, wanted: list[int]
) -> dict[int, av.VideoFrame]:
    """Decode from the keyframe before ``wanted[0]`` until ``wanted[-1]`` (sorted, unique indices).

    Returns {index: frame} for every wanted index; empty when the stream yields no frame at all. An
    index past the last frame gets the last frame, unless the container's index promised that frame:
    then the data is truncated or corrupted, and that is an error.
    """
    timeline = _timeline(container, stream)
    found = None
    if timeline.seekable and wanted[0] > 0 and _seek(container, stream, timeline.pts_of(wanted[0])):
        found = _pick(_iter_frames(container, stream), timeline, wanted, after_seek=True)
        if found is None:
            # Nothing decodable after the seek, or it landed after the target (an index can lag B-frame
            # reordering; MPEG-TS seeks are approximate): start over. Time 0 of the container precedes
            # every stream's first frame; seeking to the stream's own start_time is not reliable.
            container.seek(0)
    if found is None:
        found = _pick(_iter_frames(container, stream), timeline, wanted, after_seek=False)
    if found is None:
        return {}
    picked, last = found
    for index in wanted[len(picked) :]:
        if index < timeline.num_frames:
            raise VideoDecodeError(
                f"{printable_path(container.name)}: truncated or corrupted video data: frame {index} of "
                f"{timeline.num_frames} could not be decoded"
            )
        picked[index] = last
    return picked


def _seek(container: av.container.InputContainer, stream: av.VideoStream, pts: int) -> bool:
    """Go to the last keyframe at or before ``pts``; False (position unchanged) if the format cannot seek."""
    try:
        container.seek(pts, backward=True, stream=stream)
    except av.FFmpegError:
        return False
    return True


def _pick(
    frames: Iterator[av.VideoFrame], timeline: _Timeline, wanted: list[int], after_seek: bool
) -> tuple[dict[int, av.VideoFrame], av.VideoFrame] | None:
    """Assign decoded frames to the ``wanted`` indices in one forward pass, stopping at the last one.

    An index with no frame of its own (a gap left by dropped frames) gets the latest frame before it:
    the one on screen at that moment. Returns the frames for a prefix of ``wanted`` (all of it unless the
    stream ended first) and the last frame decoded; None when nothing was decoded, or when a seek
    overshot the first wanted index, since earlier frames can then only be reached from the start.
    """
    picked: dict[int, av.VideoFrame] = {}
    pending = iter(wanted)
    target = next(pending, None)
    held: av.VideoFrame | None = None
    index = -1
    for frame in frames:
        index = timeline.index_of(frame.pts, index)
        if held is None and index > target and after_seek:
            return None
        while target is not None and index > target:
            picked[target] = frame if held is None else held  # before the first decodable frame: use it
            target = next(pending, None)
        if target == index:
            picked[target] = frame
            target = next(pending, None)
        held = frame
        if target is None:
            break
    return None if held is None else (picked, held)


def _iter_frames(container: av.container.InputContainer, stream: av.VideoStream) -> Iterator[av.VideoFrame]:
    """Decoded frames of ``stream`` from the container's current position (the one place that decodes)."""
    yield from container.decode(stream)


# ----------------------------------------------------------------------------------------- conversion


def _to_rgb(frame: av.VideoFrame, stream: av.VideoStream) -> np.ndarray:
    """uint8 [H, W, 3] RGB, turned upright. Gray, YUV and RGBA sources all convert through rgb24."""
    image = frame.to_ndarray(format="rgb24")
    turns = _rotation(frame, stream) // 90
    return np.ascontiguousarray(np.rot90(image, k=-turns)) if turns else image  # k < 0: clockwise


def _rotation(frame: av.VideoFrame, stream: av.VideoStream) -> int:
    """Clockwise degrees (0/90/180/270) that display ``frame`` upright.

    PyAV exposes the display matrix on decoded frames (``frame.rotation``, counterclockwise), not on the
    stream; files written by older muxers may carry only the clockwise ``rotate`` tag instead.
    """
    degrees = -frame.rotation
    if not degrees:
        try:
            degrees = float(stream.metadata.get("rotate", 0))
        except ValueError:
            degrees = 0
    return round(degrees / 90) % 4 * 90


# -------------------------------------------------------------------------------------- file handling


@contextmanager
def _open_video(path: PathLike) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """Open the first video stream for threaded decoding; every PyAV error becomes a VideoDecodeError."""
    shown = printable_path(path)
    _check_file(Path(path), shown)
    try:
        opened = av.open(str(path), metadata_errors="ignore")
    except PermissionError:
        raise VideoDecodeError(f"{shown}: permission denied") from None
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise VideoDecodeError(f"{shown}: not a readable video file ({_reason(err)})") from err
    with opened as container:
        if not container.streams.video:
            kinds = ", ".join(stream.type for stream in container.streams) or "none"
            raise VideoDecodeError(f"{shown}: no video stream (streams found: {kinds})")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > MAX_FRAME_PIXELS:
            raise VideoDecodeError(
                f"{shown}: frame size {width}x{height} is too large (limit {MAX_FRAME_PIXELS} pixels)"
            )
        stream.thread_type = "AUTO"  # frame and slice threads: several times faster on multi-core CPUs
        try:
            yield container, stream
        except av.FFmpegError as err:
            raise VideoDecodeError(f"{shown}: corrupted video data ({_reason(err)})") from err


def _check_file(path: Path, shown: str) -> None:
    # Checked up front: FFmpeg's messages for these cases are vague ("Invalid data found").
    try:
        info = path.stat()
    except FileNotFoundError:
        raise VideoDecodeError(f"{shown}: file not found") from None
    except NotADirectoryError:
        raise VideoDecodeError(f"{shown}: file not found (a parent of it is a file)") from None
    except PermissionError:
        raise VideoDecodeError(f"{shown}: permission denied") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise VideoDecodeError(f"{shown}: cannot access the file ({_reason(err)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise VideoDecodeError(f"{shown}: is a directory, not a video file")
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise VideoDecodeError(f"{shown}: empty file (0 bytes)")


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())  # one line


def _as_indices(indices: Sequence[int]) -> np.ndarray:
    order = np.asarray(indices)
    if order.size == 0:
        return order.astype(np.int64).reshape(0)
    if order.ndim != 1 or not np.issubdtype(order.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D sequence of integers, got {order.dtype} {order.shape}")
    if order.min() < 0:
        raise ValueError(f"frame indices must be >= 0, got {int(order.min())}")
    return order.astype(np.int64)


def _frame_rate(stream: av.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _duration(container: av.container.InputContainer, stream: av.VideoStream) -> float:
    """Seconds, from the stream if it knows, else the container; 0.0 when neither does."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return 0.0


def _count_packets(path: PathLike) -> int:
    """Number of frames in the first video stream, counted by demuxing (no decoding)."""
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size and not packet.is_discard)
    except av.FFmpegError as err:
        raise VideoDecodeError(f"{printable_path(path)}: cannot count frames ({_reason(err)})") from err
