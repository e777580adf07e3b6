"""The ``evl bench`` report: every measurement of a configuration in its own process, and the figures
derived from them (the backbone against the matmul rate, frozen against open steps, the cached epoch)."""

from __future__ import annotations

import dataclasses
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

from evl.bench.config import BenchConfig, resolve_device
from evl.bench.isolated import run_isolated


def run_bench(bench: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """All measurements of ``bench``; ``log`` receives one line as each starts."""
    device = resolve_device(bench.device)
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
    the rounds of :func:`~evl.bench.measures.measure_cached_step` (extraction and cached steps measured side
    by side), the speedup is the median of the rounds' own ratios (their range as well); otherwise the ratio
    of medians.
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
