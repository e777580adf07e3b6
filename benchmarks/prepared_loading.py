"""Training data-loader throughput on large videos, and on the same videos after `evl prepare`; prints JSON.

The loader is the training one (decode + sample + RandAugment + crop, as `evl bench`'s dataloader measure
runs it). The source videos stand in for downloads: 640x360, 300 frames at 30 fps, a keyframe every 250
frames (x264's default); the prepared copies have a short side of 256 and a keyframe every 16 frames.

python benchmarks/prepared_loading.py                       # 8 videos, 64 clips, 0 and 2 loader workers
python benchmarks/prepared_loading.py --videos 2 --clips 8 --workers 0    # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from torch.utils.data import DataLoader

from evl.config import vision_preset
from evl.video.dataset import StreamSampler, TrainClips, collate_train
from evl.video.lists import read_list
from evl.video.parallel import map_in_processes
from evl.video.prepare import prepare_videos
from evl.video.sampling import SamplingConfig
from evl.video.transforms import TransformConfig, build_train_transform

GRAIN_STD = 5.0  # uint8 levels, new in every frame


def render(job: tuple[Path, int, int, int, float, int, int]) -> None:
    """A textured background panning sideways under a moving square, with grain: cheap to draw, and at about
    the bit rate of real 360p video (0.4 Mbit/s; without the grain x264 squeezes it five times smaller)."""
    path, width, height, frames, fps, keyint, seed = job
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0 : 2 * width].astype(np.float32)
    texture = sum(np.sin(x * rng.uniform(0.01, 0.08) + y * rng.uniform(0.01, 0.08) + rng.uniform(0, 6))
                  for _ in range(4))  # fmt: skip
    background = ((texture + 4) / 8)[..., None] * rng.uniform(80, 230, size=3)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        shift = (3 * t) % width
        grain = rng.standard_normal((height, width, 1), dtype=np.float32) * GRAIN_STD
        video[t] = np.clip(background[:, shift : shift + width] + grain, 0, 255)
        cx, cy = int(width / 2 + width / 3 * np.sin(t / 20)), int(height / 2 + height / 3 * np.cos(t / 15))
        video[t, max(cy - 30, 0) : cy + 30, max(cx - 30, 0) : cx + 30] = (250, 40, 40)
    _write(path, video, fps, keyint)


def _write(path: Path, video: np.ndarray, fps: float, keyint: int) -> None:
    # evl.video.encode.write_video leaves the keyframe interval to x264 (250): here it is set explicitly.
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast", "x264-params": f"keyint={keyint}:threads=1"}
        for image in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def clips_per_s(args: argparse.Namespace, root: Path, list_path: Path, workers: int) -> float:
    vision = vision_preset(args.backbone)
    augment = None if args.no_rand_augment else "rand-m7-n4-mstd0.5-inc1"
    transform = build_train_transform(TransformConfig.from_backbone(vision, rand_augment=augment))
    sampling = SamplingConfig(num_frames=args.num_frames, stride=args.frame_stride)
    dataset = TrainClips(read_list(list_path), root, sampling, transform)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=StreamSampler(0, args.clips),
                        num_workers=workers, collate_fn=collate_train)  # fmt: skip
    start = time.perf_counter()
    count = sum(len(batch["label"]) for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--frames", type=int, default=300, help="frames per source video")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument(
        "--source-keyint", type=int, default=250, help="frames between the sources' keyframes"
    )
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--keyframe-interval", type=int, default=16)
    parser.add_argument("--backbone", default="ViT-B/16", help="preset giving the crop size and mean/std")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--frame-stride", type=int, default=8)
    parser.add_argument("--no-rand-augment", action="store_true")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data-loader processes")
    parser.add_argument("--procs", type=int, default=2, help="processes rendering and preparing the videos")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "prepared"
        (src / "videos").mkdir(parents=True)
        jobs = [(src / "videos" / f"{i:04d}.mp4", args.width, args.height, args.frames, args.fps,
                 args.source_keyint, i) for i in range(args.videos)]  # fmt: skip
        map_in_processes(render, jobs, args.procs, progress=False)
        source_list = src / "train.txt"
        source_list.write_text("".join(f"videos/{i:04d}.mp4 {i % 4}\n" for i in range(args.videos)))

        start = time.perf_counter()
        result = prepare_videos(
            src, source_list, dst, short_side=args.short_side, keyframe_interval=args.keyframe_interval,
            workers=args.procs, progress=False,
        )  # fmt: skip
        prepare_s = time.perf_counter() - start
        if result.failed:
            raise SystemExit(f"prepare failed: {result.failed[0]}")

        report = {
            "videos": args.videos, "clips": args.clips, "crop": vision_preset(args.backbone).image_size,
            "num_frames": args.num_frames, "frame_stride": args.frame_stride,
            "rand_augment": not args.no_rand_augment, "encoder": result.encoder,
            "prepare_s_per_video": round(prepare_s / args.videos, 3),
        }  # fmt: skip
        sides = {
            "source": (src, source_list, f"{args.width}x{args.height}", args.source_keyint),
            "prepared": (dst, result.list_path, f"short side {args.short_side}", args.keyframe_interval),
        }
        for name, (root, list_path, size, keyint) in sides.items():
            mib = sum(p.stat().st_size for p in (root / "videos").iterdir()) / 2**20 / args.videos
            report[name] = {"size": size, "frames": args.frames, "keyframe_interval": keyint,
                            "mib_per_video": round(mib, 2), "clips_per_s": {}}  # fmt: skip
            for workers in args.workers:
                rate = clips_per_s(args, root, list_path, workers)
                report[name]["clips_per_s"][f"workers={workers}"] = round(rate, 2)
        report["speedup"] = {
            key: round(report["prepared"]["clips_per_s"][key] / rate, 2)
            for key, rate in report["source"]["clips_per_s"].items()
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
