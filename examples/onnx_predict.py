"""Classify a video with an exported model, needing only onnxruntime, numpy and PyAV (no torch, no evl).

    evl export runs/k400 --format onnx --output k400_onnx
    python examples/onnx_predict.py k400_onnx clip.mp4 [--topk 5]

It reproduces what ``evl predict`` does before and after the model, as ``deployment.json`` describes it:
clips sampled over the video, each frame's short side resized (bilinear, no antialiasing), centre (or
three) crops, normalised; the softmax of each view's scores averaged over the views. Frames are read in
decoding order, upright as stored (``evl predict`` also turns rotated phone videos upright).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import av
import numpy as np
import onnxruntime


def frame_indices(config: dict, num_video_frames: int) -> np.ndarray:
    """The frames of every temporal view: int [Vt, T]."""
    t, views = config["num_frames"], config["num_temporal_views"]
    if config["sampling"] == "segment":  # one frame per equal segment, at the view's offset within it
        offsets = (np.arange(views)[:, None] + 0.5) / views
        points = (np.arange(t)[None, :] + offsets) * (num_video_frames / t)
        return np.clip(np.floor(points).astype(np.int64), 0, num_video_frames - 1)
    stride = config["frame_stride"]  # dense: T frames `stride` apart, one clip centred or several spread
    slide = max(0, num_video_frames - ((t - 1) * stride + 1))
    starts = [slide // 2] if views == 1 else [round(slide / (views - 1) * v) for v in range(views)]
    return np.minimum(np.array(starts)[:, None] + np.arange(t)[None, :] * stride, num_video_frames - 1)


def read_frames(path: str, config: dict) -> np.ndarray:
    """uint8 [Vt, T, H, W, 3]: the sampled frames, RGB (two passes: count the frames, then keep those)."""
    with av.open(path) as container:
        count = sum(1 for _ in container.decode(video=0))
    indices = frame_indices(config, count)
    wanted, kept = set(indices.ravel().tolist()), {}
    with av.open(path) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                kept[index] = frame.to_ndarray(format="rgb24")
    return np.stack([np.stack([kept[i] for i in view]) for view in indices.tolist()])


def resize_bilinear(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 [..., H, W, C] -> [..., height, width, C]: bilinear on pixel centres, no antialiasing (as
    torch's ``F.interpolate(mode="bilinear", align_corners=False)``)."""

    def taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
        return low, np.minimum(low + 1, size_in - 1), (source - low).astype(np.float32)

    top, bottom, dy = taps(frames.shape[-3], height)
    left, right, dx = taps(frames.shape[-2], width)
    rows = frames[..., top, :, :] * (1 - dy)[:, None, None] + frames[..., bottom, :, :] * dy[:, None, None]
    return rows[..., left, :] * (1 - dx)[:, None] + rows[..., right, :] * dx[:, None]


def preprocess(clips: np.ndarray, config: dict) -> np.ndarray:
    """uint8 [Vt, T, H, W, 3] -> float32 [Vt * Vs, T, 3, S, S], temporal-view-major, normalised."""
    size, (h, w) = config["image_size"], clips.shape[2:4]
    new_h, new_w = (size, w * size // h) if h < w else (h * size // w, size)  # short side to S
    frames = resize_bilinear(clips.astype(np.float32), new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    if config["num_spatial_views"] == 1:
        offsets = [(top, left)]
    elif new_h > new_w:  # three crops along the long side
        offsets = [(0, left), (top, left), (new_h - size, left)]
    else:
        offsets = [(top, 0), (top, left), (top, new_w - size)]
    crops = np.stack([frames[:, :, y : y + size, x : x + size] for y, x in offsets], axis=1)
    crops = crops.reshape(-1, *crops.shape[2:])  # [Vt * Vs, T, S, S, 3]
    mean = np.asarray(config["mean"], dtype=np.float32) * 255
    std = np.asarray(config["std"], dtype=np.float32) * 255
    return np.ascontiguousarray(((crops - mean) / std).transpose(0, 1, 4, 2, 3), dtype=np.float32)


def scores(export_dir: Path, config: dict, views: np.ndarray) -> np.ndarray:
    """Class scores [V, K] of the views, through the model (or its backbone, then its decoder)."""
    values = {config["inputs"][next(iter(config["files"]))][0]: views}
    for part, file in config["files"].items():
        session = onnxruntime.InferenceSession(str(export_dir / file), providers=["CPUExecutionProvider"])
        outputs = session.run(
            config["outputs"][part], {name: values[name] for name in config["inputs"][part]}
        )
        values = dict(zip(config["outputs"][part], outputs, strict=True))
    return values["scores"]


def probabilities(export_dir: Path, video: str) -> tuple[list[str], np.ndarray]:
    """(class names, probabilities [K]): softmax per view, averaged over the views."""
    config = json.loads((export_dir / "deployment.json").read_text())
    logits = scores(export_dir, config, preprocess(read_frames(video, config), config))
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return config["classes"], (exp / exp.sum(axis=1, keepdims=True)).mean(axis=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path, help="a folder written by 'evl export --format onnx'")
    parser.add_argument("video")
    parser.add_argument("--topk", type=int, default=5)
    args = parser.parse_args(argv)
    classes, probs = probabilities(args.export_dir, args.video)
    print(args.video)
    for index in np.argsort(-probs, kind="stable")[: args.topk]:
        print(f"  {probs[index] * 100:6.2f}%  {classes[index]}")


if __name__ == "__main__":
    main()
