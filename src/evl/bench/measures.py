"""The measurements of ``evl bench``, by name in :data:`MEASUREMENTS`: each takes the bench configuration and
a device (and its own keyword arguments) and returns a dict of plain numbers. Models have the configured
shapes and random weights. Each measurement runs in its own process (:mod:`evl.bench.isolated`).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from evl.bench.config import BenchConfig
from evl.bench.timing import median_time, peak_memory, sync, timed
from evl.config import ModelConfig
from evl.devices import autocast, resolve_precision
from evl.engine.cached_data import collate_cached, to_frame_features
from evl.engine.feature_cache import CacheMeta, FeatureCache, cache_bytes_per_clip
from evl.engine.optim import allocate_adamw_state, build_optimizer
from evl.engine.step import TrainStep
from evl.flops import count_flops
from evl.models.evl import EVL, FrameFeatures
from evl.synth import make_dataset
from evl.video.dataset import StreamSampler, TrainClips, collate_train
from evl.video.lists import VideoEntry, read_list
from evl.video.sampling import SamplingConfig
from evl.video.transforms import TransformConfig, build_train_transform


def random_video(batch: int, config: ModelConfig, device: torch.device) -> torch.Tensor:
    """A batch of random clips [B, T, 3, S, S] at the model's frame count and input size."""
    size = config.backbone.image_size
    return torch.randn(batch, config.decoder.num_frames, 3, size, size, device=device)


def _eval_model_and_video(
    bench: BenchConfig, device: torch.device, batch: int
) -> tuple[ModelConfig, EVL, torch.Tensor]:
    """The configured model (frozen backbone) in eval mode on ``device`` and a random video batch."""
    config = bench.model_config()
    return config, EVL(config).to(device).eval(), random_video(batch, config, device)


def measure_matmul(bench: BenchConfig, device: torch.device) -> dict[str, float]:
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = median_time(lambda: a @ b, max(bench.repeats, 5), device)
    return {"size": n, "dtype": "float32", "gflops_per_s": 2 * n**3 / seconds / 1e9}


MEMORY_STEADY_STEPS = 10  # training steps before the peak memory of a training step is read


def measure_train_step(
    bench: BenchConfig, device: torch.device, batch: int, freeze: bool
) -> dict[str, float]:

    config = bench.model_config(freeze=freeze)
    model = EVL(config).to(device).train()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    allocate_adamw_state(optimizer)  # as training does
    # The training step itself, as `evl train` runs it (one micro-batch; precision "auto").
    trainer = TrainStep(model, optimizer, compute_dtype=resolve_precision("auto", device))
    video = random_video(batch, config, device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def step() -> None:
        trainer.run([(video, labels)])
        trainer.apply()

    seconds = median_time(step, bench.repeats, device)
    # The heap settles after a few steps (freed blocks are reused, not all of them at once): peak memory is
    # read once training has reached the steady state it keeps for the rest of a run.
    for _ in range(max(0, MEMORY_STEADY_STEPS - bench.repeats - 1)):
        step()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "batch": batch,
        "step_s": seconds,
        **peak_memory(device),
        "trainable_params": trainable,
    }


def measure_inference(bench: BenchConfig, device: torch.device, batch: int) -> dict[str, float]:

    _, model, video = _eval_model_and_video(bench, device, batch)

    def forward() -> None:
        with torch.inference_mode(), autocast(resolve_precision("auto", device), device):
            model(video)

    seconds = median_time(forward, bench.repeats, device)
    return {
        "batch": batch,
        "seconds": seconds,
        "videos_per_s": batch / seconds,
        **peak_memory(device),
    }


def measure_backbone(bench: BenchConfig, device: torch.device) -> dict[str, float]:

    config, model, video = _eval_model_and_video(bench, device, 1)

    def forward() -> None:
        with torch.inference_mode():
            model.extract_block_features(video)

    seconds = median_time(forward, bench.repeats, device)
    flops = count_flops(config).backbone_gflops * 2  # G multiply-adds -> GFLOP
    return {
        "frames": config.decoder.num_frames,
        "seconds": seconds,
        "gflop": flops,
        "gflops_per_s": flops / seconds,
    }


CACHED_ROUNDS = 5
CACHED_STEPS_PER_ROUND = 4  # the first of a round is not timed: the extraction before it evicted the caches
CACHE_ROWS_PER_CLIP = 2  # rows in the cache per clip of the micro-batch: every step reads other rows


def measure_cached_step(bench: BenchConfig, device: torch.device, batch: int) -> dict[str, Any]:
    """What a feature cache saves and what training on it costs, in alternating rounds in one process.

    Each round extracts one clip's features from frames (the backbone plus the cross-frame maps, as
    on-the-fly training computes them), then runs decoder training steps fed from a real float16
    memory-mapped cache: rows read every step, forward and backward of one micro-batch (gradients
    accumulating, as over the micro-batches of an optimiser step), and the optimiser step, timed apart.
    A shared machine's speed drifts (by 20% over tens of seconds on the 2-core reference machine), so
    the two sides of the cached-epoch speedup are measured side by side and each round gives its ratio.
    """
    config = bench.model_config()
    model = EVL(config).to(device).train()
    model.decoder.checkpoint_memory = False  # as `evl train --features` runs it
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    allocate_adamw_state(optimizer)  # as training does
    # Training's step on features, as `evl train --features` runs it; its two halves are timed apart.
    trainer = TrainStep(
        model, optimizer, step_model=model.forward_head, compute_dtype=resolve_precision("auto", device)
    )
    video = random_video(1, config, device)

    def extract() -> list[FrameFeatures]:
        with torch.no_grad():
            return model.extract_features(video, with_attention=True)

    num_rows = CACHE_ROWS_PER_CLIP * batch
    with tempfile.TemporaryDirectory() as tmp:
        meta = CacheMeta(
            backbone=dataclasses.asdict(config.backbone), backbone_name=config.backbone_name,
            fingerprint="bench",
            blocks=tuple(model.blocks), num_frames=config.decoder.num_frames, sampling={}, classes=[],
            num_videos=num_rows,
        )  # fmt: skip
        entries = [VideoEntry(f"v{i}.mp4", 0, i + 1) for i in range(num_rows)]
        writer = FeatureCache.create_or_resume(tmp, meta, entries)
        features = extract()  # real features; one clip's serve every row (their values do not matter)
        for i in range(num_rows):
            writer.write([i], features)
        cache = FeatureCache.open(tmp)  # read as training reads it
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        rows = itertools.cycle(range(num_rows))

        def step() -> tuple[float, float]:
            sync(device)
            start = time.perf_counter()
            items = [{"features": cache.read(next(rows), model.blocks), "label": 0, "index": 0}
                     for _ in range(batch)]  # fmt: skip
            features = to_frame_features(collate_cached(items)["features"], device)
            trainer.backward(features, labels)
            sync(device)
            middle = time.perf_counter()
            trainer.apply()
            sync(device)
            return middle - start, time.perf_counter() - middle

        extract()  # warm-up of both, then the rounds
        for _ in range(CACHED_STEPS_PER_ROUND):
            step()
        rounds = []
        for _ in range(max(bench.repeats, CACHED_ROUNDS)):
            extraction = timed(extract, device)
            # Gradients accumulate over the micro-batches of an optimiser step, as in training: the
            # untimed first step of a round makes them, the timed ones add to them.
            trainer.zero_grad()
            steps = [step() for _ in range(CACHED_STEPS_PER_ROUND)][1:]
            forward_backward, optimizer_s = (statistics.median(part) for part in zip(*steps, strict=True))
            rounds.append({"features_s": extraction, "forward_backward_s": forward_backward,
                           "optimizer_s": optimizer_s})  # fmt: skip
    forward_backward = statistics.median(r["forward_backward_s"] for r in rounds)
    optimizer_s = statistics.median(r["optimizer_s"] for r in rounds)
    return {
        "features": {
            "frames": config.decoder.num_frames,
            "seconds": statistics.median(r["features_s"] for r in rounds),
        },
        "cached_step": {
            "batch": batch,
            "step_s": forward_backward + optimizer_s,
            "forward_backward_s": forward_backward,
            "optimizer_s": optimizer_s,
            "mib_per_clip": cache_bytes_per_clip(meta) / 2**20,
        },
        "rounds": rounds,
    }


def measure_dataloader(bench: BenchConfig, device: torch.device) -> dict[str, float]:
    """Decode + sample + augment (RandAugment, the paper's recipe) of 256 px videos to the model's crop."""

    config = bench.model_config()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp), num_train_per_class=4, num_val_per_class=0, num_frames=72, size=256,
                            progress=False, workers=1)  # fmt: skip
        transform = build_train_transform(
            TransformConfig.from_backbone(config.backbone, rand_augment="rand-m7-n4-mstd0.5-inc1")
        )
        sampling = SamplingConfig(num_frames=config.decoder.num_frames, stride=8)
        dataset = TrainClips(read_list(data.train_list), data.root, sampling, transform)
        clips = 32
        loader = DataLoader(dataset, batch_size=4, sampler=StreamSampler(0, clips), collate_fn=collate_train)
        start = time.perf_counter()
        count = sum(len(batch["label"]) for batch in loader)
        seconds = time.perf_counter() - start
    return {"workers": 0, "clips_per_s": count / seconds, "seconds_per_clip": seconds / count}


MEASUREMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "matmul": measure_matmul,
    "train_step": measure_train_step,
    "inference": measure_inference,
    "backbone": measure_backbone,
    "cached_step": measure_cached_step,
    "dataloader": measure_dataloader,
}
