"""Training data-loader throughput (decode + sample + augment), in clips per second; prints JSON.

python benchmarks/dataloader.py                       # on freshly synthesized 112 px videos
python benchmarks/dataloader.py --size 256 --num-frames 8 --frame-stride 16 --rand-augment
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from evl.config import vision_preset
from evl.synth import make_dataset
from evl.video.dataset import StreamSampler, TrainClips, collate_train
from evl.video.lists import read_list
from evl.video.sampling import SamplingConfig
from evl.video.transforms import TransformConfig, build_train_transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="ViT-T/16@112", help="preset giving the crop size and mean/std")
    parser.add_argument("--size", type=int, default=112, help="side of the synthesized videos")
    parser.add_argument("--video-frames", type=int, default=64)
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--frame-stride", type=int, default=2)
    parser.add_argument("--rand-augment", action="store_true", help="rand-m7-n4-mstd0.5-inc1 (the paper's)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(
            Path(tmp), num_train_per_class=16, num_val_per_class=0, num_frames=args.video_frames,
            size=args.size, progress=False, workers=2,
        )  # fmt: skip
        entries = read_list(data.train_list)
        vision = vision_preset(args.backbone)
        transform = build_train_transform(
            TransformConfig.from_backbone(
                vision, rand_augment="rand-m7-n4-mstd0.5-inc1" if args.rand_augment else None
            )
        )
        sampling = SamplingConfig(num_frames=args.num_frames, stride=args.frame_stride)
        dataset = TrainClips(entries, data.root, sampling, transform)
        report = {"video_size": args.size, "crop": vision.image_size, "num_frames": args.num_frames,
                  "rand_augment": args.rand_augment, "clips_per_s": {}}  # fmt: skip
        for workers in args.workers:
            loader = DataLoader(
                dataset, batch_size=args.batch_size, sampler=StreamSampler(0, args.clips),
                num_workers=workers, collate_fn=collate_train,
            )  # fmt: skip
            start = time.perf_counter()
            count = sum(len(batch["label"]) for batch in loader)
            report["clips_per_s"][f"workers={workers}"] = round(count / (time.perf_counter() - start), 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
