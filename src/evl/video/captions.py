"""Captions drawn onto a video's frames, and the video encoded again with them.

Text is rendered by matplotlib's Agg renderer into an alpha mask once per distinct caption (captions repeat
from frame to frame; a bounded cache keeps the recent ones) and blended onto each frame, white over a
translucent dark box in the top-left corner, which reads on any footage. Nothing beyond matplotlib draws.
The video is streamed (:func:`~evl.video.decode.iter_frames`): one frame in memory at a time, however long.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evl.io import atomic_path
from evl.video.decode import iter_frames, probe

__all__ = ["caption_video", "draw_caption", "text_mask"]

TEXT_HEIGHT = 1 / 16  # of the frame's height: the font size
MIN_TEXT_PIXELS = 10  # smaller glyphs are not readable
BOX_OPACITY = 0.6  # of the dark box behind the text
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}  # that take H.264


@functools.lru_cache(maxsize=512)
def text_mask(text: str, pixels: int) -> np.ndarray:
    """``text`` in a ``pixels``-point font at 72 dpi (so one point is one pixel): float32 [h, w] coverage in
    [0, 1], cropped to the ink. Read-only: it is shared through the cache."""
    dpi = 72
    width = (len(text) + 2) * pixels  # wider than any run of that many glyphs
    fig = Figure(figsize=(width / dpi, 2 * pixels / dpi), dpi=dpi)
    fig.patch.set_alpha(0.0)
    canvas = FigureCanvasAgg(fig)
    fig.text(pixels / 2 / width, 0.5, text, fontsize=pixels, color="white", ha="left", va="center")
    canvas.draw()
    alpha = np.asarray(canvas.buffer_rgba())[..., 3]
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:  # blank text
        mask = np.zeros((1, 1), dtype=np.float32)
    else:
        mask = alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32) / 255.0
    mask.setflags(write=False)
    return mask


def draw_caption(image: np.ndarray, text: str) -> np.ndarray:
    """A copy of ``image`` (uint8 [H, W, 3]) with ``text`` in its top-left corner, clipped to the frame."""
    height, width = image.shape[:2]
    pixels = max(MIN_TEXT_PIXELS, round(height * TEXT_HEIGHT))
    mask = text_mask(text, pixels)
    pad = max(2, pixels // 4)
    box_h, box_w = min(mask.shape[0] + 2 * pad, height), min(mask.shape[1] + 2 * pad, width)
    out = image.copy()
    box = out[:box_h, :box_w].astype(np.float32) * (1.0 - BOX_OPACITY)
    ink = mask[: max(box_h - pad, 0), : max(box_w - pad, 0)][..., None]
    inside = box[pad : pad + ink.shape[0], pad : pad + ink.shape[1]]
    box[pad : pad + ink.shape[0], pad : pad + ink.shape[1]] = inside * (1.0 - ink) + 255.0 * ink
    out[:box_h, :box_w] = np.rint(box).astype(np.uint8)
    return out


def caption_video(
    path: str | Path, out_path: str | Path, caption: Callable[[int], str | None], crf: int = 20
) -> Path:
    """Re-encode ``path`` (H.264, at its frame rate) into ``out_path`` with ``caption(index)`` drawn on
    frame ``index`` (None: nothing drawn). Every frame :func:`~evl.video.decode.iter_frames` yields is
    written, so the copy has the same frames, upright, played at a constant rate."""
    out_path = Path(out_path)
    container_format = CONTAINERS.get(out_path.suffix.lower())
    if container_format is None:
        raise ValueError(f"{out_path}: write the captioned video as one of {', '.join(CONTAINERS)}")
    fps = Fraction(probe(path).fps or 25.0).limit_denominator(1001)
    with atomic_path(out_path) as tmp, av.open(str(tmp), mode="w", format=container_format) as container:
        stream = None
        for index, image in iter_frames(path):
            text = caption(index)
            if text:
                image = draw_caption(image, text)
            # yuv420p halves the chroma resolution: sizes must be even, so odd ones gain an edge row.
            image = np.pad(image, ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0)), mode="edge")
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.width, stream.height = image.shape[1], image.shape[0]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": "veryfast"}
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return out_path
