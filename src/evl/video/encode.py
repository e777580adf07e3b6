"""Writing real video files (used by the synthetic dataset, the demo and the tests)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float = 25.0,
    codec: str = "libx264",
    lossless: bool = False,
    crf: int = 18,
) -> Path:
    """Encode ``frames`` (uint8 [T, H, W, 3], RGB) into a video file; the container follows the suffix.

    ``lossless=True`` uses ``libx264rgb`` at qp 0, so decoding gives back the exact pixels (for tests).
    Encoding runs on one thread (several threads make x264's output vary from run to run); on small
    frames x264's output can still differ slightly between runs, at the level of compression noise.
    Odd frame sizes are fine for the RGB encoder; ``yuv420p`` needs even sizes, so they are padded by
    repeating the last row/column.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"write_video: expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if lossless:
        codec, pix_fmt, options = "libx264rgb", "rgb24", {"qp": "0", "preset": "ultrafast"}
    else:
        pix_fmt, options = "yuv420p", {"crf": str(crf), "preset": "veryfast"}
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        # One encoder thread and one lookahead thread: with more, x264's output varies from run to run.
        stream.options = {**options, "x264-params": "threads=1:lookahead-threads=1"}
        stream.codec_context.thread_count = 1
        for image in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
