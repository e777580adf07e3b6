"""``evl bench``: where the time and memory of a configuration go, on this machine, as one JSON report.

Every figure is measured in a fresh process (so peak memory belongs to that measurement alone) with random
weights of the configured shapes: the training step with the backbone frozen and open, inference latency
and throughput, the backbone alone against this machine's fp32 matmul rate, feature extraction and a
training step on cached features read from a real memory-mapped cache (side by side, in alternating
rounds), and the training data loader. FLOPs are counted as
hardware does (two per multiply-add) for the achieved-GFLOP/s figures.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing as mp
import platform
import queue as queue_module
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from evl.config import ModelConfig, model_preset
from evl.devices import autocast, resolve_precision
from evl.engine.features import (
    CacheMeta,
    FeatureCache,
    cache_bytes_per_clip,
    collate_cached,
    to_frame_features,
)
from evl.engine.optim import allocate_adamw_state, build_optimizer
from evl.engine.step import TrainStep
from evl.flops import count_flops
from evl.models.evl import EVL, FrameFeatures
from evl.runtime import tune_cpu_allocator
from evl.synth import make_dataset
from evl.video.dataset import StreamSampler, TrainClips, collate_train
from evl.video.lists import VideoEntry, read_list
from evl.video.sampling import SamplingConfig
from evl.video.transforms import TransformConfig, build_train_transform


@dataclass(frozen=True)
class BenchConfig:
    model: str = "evl-b16"
    num_frames: int = 8
    train_batch_sizes: tuple[int, ...] = (1, 2)
    open_batch_size: int = 1
    infer_batch_size: int = 8  # throughput batch; latency is always batch 1
    cached_batch_size: int = 4  # micro-batch of the cached-feature step (memory is no constraint there)
    # Clips per optimiser step in the cached-feature epoch (the recipes' train.batch_size, reached with
    # train.batch_split micro-batches): the optimiser's own time is shared by this many clips.
    epoch_batch_size: int = 256
    repeats: int = 3  # timed repetitions after one warm-up; the median is reported
    device: str = "auto"
    threads: int | None = None  # CPU threads (default: torch's choice, one per core)
    dataloader: bool = True
    allocator: bool = True  # evl.runtime.tune_cpu_allocator in each measuring process, as the CLI does
    skip: tuple[str, ...] = field(default_factory=tuple)  # names of measurements to leave out

    def model_config(self, freeze: bool = True) -> ModelConfig:
        return dataclasses.replace(
            model_preset(self.model, num_frames=self.num_frames), freeze_backbone=freeze
        )


# --------------------------------------------------------------------------------------------- helpers


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device's queued work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocator, kernels, lazy inits
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def _peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB (2^30 bytes) and GB (10^9 bytes): the process's maximum resident set on CPU,
    the tensors' peak on CUDA."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"peak_memory_gib": peak / 2**30, "peak_memory_gb": peak / 1e9}


def _video(batch: int, config: ModelConfig, device: torch.device) -> torch.Tensor:
    size = config.backbone.image_size
    return torch.randn(batch, config.decoder.num_frames, 3, size, size, device=device)


def _eval_model_and_video(
    bench: BenchConfig, device: torch.device, batch: int
) -> tuple[ModelConfig, EVL, torch.Tensor]:
    """The configured model (frozen backbone) in eval mode on ``device`` and a random video batch."""
    config = bench.model_config()
    return config, EVL(config).to(device).eval(), _video(batch, config, device)


# -------------------------------------------------------------------------------------- measurements
# Each runs in its own process and returns a dict of plain numbers.


def measure_matmul(bench: BenchConfig, device: torch.device) -> dict[str, float]:
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = _median_time(lambda: a @ b, max(bench.repeats, 5), device)
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
    video = _video(batch, config, device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)

    def step() -> None:
        trainer.run([(video, labels)])
        trainer.apply()

    seconds = _median_time(step, bench.repeats, device)
    # The heap settles after a few steps (freed blocks are reused, not all of them at once): peak memory is
    # read once training has reached the steady state it keeps for the rest of a run.
    for _ in range(max(0, MEMORY_STEADY_STEPS - bench.repeats - 1)):
        step()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "batch": batch,
        "step_s": seconds,
        **_peak_memory(device),
        "trainable_params": trainable,
    }


def measure_inference(bench: BenchConfig, device: torch.device, batch: int) -> dict[str, float]:

    _, model, video = _eval_model_and_video(bench, device, batch)

    def forward() -> None:
        with torch.inference_mode(), autocast(resolve_precision("auto", device), device):
            model(video)

    seconds = _median_time(forward, bench.repeats, device)
    return {
        "batch": batch,
        "seconds": seconds,
        "videos_per_s": batch / seconds,
        **_peak_memory(device),
    }


def measure_backbone(bench: BenchConfig, device: torch.device) -> dict[str, float]:

    config, model, video = _eval_model_and_video(bench, device, 1)

    def forward() -> None:
        with torch.inference_mode():
            model.extract_block_features(video)

    seconds = _median_time(forward, bench.repeats, device)
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
    video = _video(1, config, device)

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
            _sync(device)
            start = time.perf_counter()
            items = [{"features": cache.read(next(rows), model.blocks), "label": 0, "index": 0}
                     for _ in range(batch)]  # fmt: skip
            features = to_frame_features(collate_cached(items)["features"], device)
            trainer.backward(features, labels)
            _sync(device)
            middle = time.perf_counter()
            trainer.apply()
            _sync(device)
            return middle - start, time.perf_counter() - middle

        extract()  # warm-up of both, then the rounds
        for _ in range(CACHED_STEPS_PER_ROUND):
            step()
        rounds = []
        for _ in range(max(bench.repeats, CACHED_ROUNDS)):
            extraction = _timed(extract, device)
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


# ------------------------------------------------------------------------------------------------ runner


def _child(queue: mp.Queue, name: str, bench: BenchConfig, kwargs: dict[str, Any]) -> None:
    try:
        if bench.allocator:
            tune_cpu_allocator()
        if bench.threads:
            torch.set_num_threads(bench.threads)
        torch.manual_seed(0)
        result = MEASUREMENTS[name](bench, _device(bench.device), **kwargs)
        queue.put(("ok", result))
    except Exception as err:  # reported in the JSON rather than lost with the child process
        queue.put(("error", f"{type(err).__name__}: {err}"))


MEASUREMENTS: dict[str, Callable[..., dict[str, Any]]] = {
    "matmul": measure_matmul,
    "train_step": measure_train_step,
    "inference": measure_inference,
    "backbone": measure_backbone,
    "cached_step": measure_cached_step,
    "dataloader": measure_dataloader,
}


def run_isolated(name: str, bench: BenchConfig, **kwargs: Any) -> dict[str, Any]:
    """One measurement in a fresh process: its peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, name, bench, kwargs))
    process.start()
    while True:  # a child killed by the system (out of memory) never reports: watch it as well
        try:
            status, result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive() and queue.empty():
                process.join()
                return {"error": f"measurement process ended without a result (exit code {process.exitcode})"}
    process.join()
    if status != "ok":
        return {"error": result}
    return result


def run_bench(bench: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """All measurements of ``bench``; ``log`` receives one line as each starts."""
    device = _device(bench.device)
    report: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "threads": bench.threads or torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "config": {k: v for k, v in dataclasses.asdict(bench).items() if k != "skip"},
    }

    def measure(key: str, name: str, **kwargs: Any) -> dict[str, Any] | None:
        if key in bench.skip or name in bench.skip:
            return None
        log(f"bench: {key} ...")
        report[key] = run_isolated(name, bench, **kwargs)
        return report[key]

    matmul = measure("matmul", "matmul")
    backbone = measure("backbone", "backbone")
    if backbone and matmul and "error" not in backbone and "error" not in matmul:
        backbone["fraction_of_matmul"] = backbone["gflops_per_s"] / matmul["gflops_per_s"]
    frozen = {}
    for batch in bench.train_batch_sizes:
        frozen[f"batch{batch}"] = run_isolated("train_step", bench, batch=batch, freeze=True)
        log(f"bench: train_frozen batch {batch}: {frozen[f'batch{batch}']}")
    report["train_frozen"] = frozen
    open_step = measure("train_open", "train_step", batch=bench.open_batch_size, freeze=False)
    same_batch = frozen.get(f"batch{bench.open_batch_size}")
    if open_step and same_batch and "error" not in open_step and "error" not in same_batch:
        report["frozen_open_step_ratio"] = same_batch["step_s"] / open_step["step_s"]
    measure("inference_latency", "inference", batch=1)
    measure("inference_throughput", "inference", batch=bench.infer_batch_size)
    features = cached = rounds = None
    if not {"features", "cached_step"} & set(bench.skip):
        log("bench: features and cached_step ...")
        paired = run_isolated("cached_step", bench, batch=bench.cached_batch_size)
        if "error" in paired:
            report["features"] = report["cached_step"] = paired
        else:
            features, cached, rounds = paired["features"], paired["cached_step"], paired["rounds"]
            report["features"], report["cached_step"] = features, cached
    loader = measure("dataloader", "dataloader") if bench.dataloader else None
    epoch = cached_epoch(bench, features, cached, loader, frozen, rounds)
    if epoch:
        report["cached_epoch"] = epoch
    return report


def cached_epoch(
    bench: BenchConfig,
    features: dict[str, Any] | None,
    cached: dict[str, Any] | None,
    loader: dict[str, Any] | None,
    frozen: dict[str, dict[str, Any]] | None = None,
    rounds: list[dict[str, float]] | None = None,
) -> dict[str, Any] | None:
    """Seconds per clip of an epoch trained from cached features, against the decoding and feature
    extraction that the cache saves (``speedup``) and, given the frozen training steps, against a whole
    epoch trained from videos (decoding plus the frozen step per clip at the largest measured batch:
    ``speedup_vs_training_from_videos``).

    A cached epoch reads and steps ``cached_batch_size`` clips at a time and runs the optimiser once per
    ``epoch_batch_size`` clips; with no data-loader figure the decoding is left out (a lower bound). Given
    the rounds of :func:`measure_cached_step` (extraction and cached steps measured side by side), the
    speedup is the median of the rounds' own ratios (their range as well); otherwise the ratio of medians.
    """
    if not features or not cached or "error" in features or "error" in cached:
        return None
    batch = cached["batch"]

    def per_clip(forward_backward: float, optimizer_s: float) -> float:
        return forward_backward / batch + optimizer_s / bench.epoch_batch_size

    cached_per_clip = per_clip(cached["forward_backward_s"], cached["optimizer_s"])
    decoding = loader["seconds_per_clip"] if loader and "error" not in loader else 0.0
    epoch: dict[str, Any] = {
        "cached_s_per_clip": cached_per_clip,
        "decode_s_per_clip": decoding,
        "features_s_per_clip": features["seconds"],
        "speedup": (features["seconds"] + decoding) / cached_per_clip,
    }
    if rounds:
        ratios = [
            (r["features_s"] + decoding) / per_clip(r["forward_backward_s"], r["optimizer_s"]) for r in rounds
        ]
        epoch["speedup"] = statistics.median(ratios)
        epoch["speedup_range"] = [min(ratios), max(ratios)]
    steps = [step for step in (frozen or {}).values() if "error" not in step]
    if steps:
        largest = max(steps, key=lambda step: step["batch"])
        from_videos = decoding + largest["step_s"] / largest["batch"]
        epoch["training_from_videos_s_per_clip"] = from_videos
        epoch["speedup_vs_training_from_videos"] = from_videos / cached_per_clip
    return epoch
