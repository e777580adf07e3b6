"""Time our EVL and the official EVL code side by side, in one process, in alternating rounds.

    python benchmarks/official_side_by_side.py --official-dir DIR [--batch-sizes 1 2] [--rounds 5]
                                               [--threads 2] [--output report.json]

DIR is a checkout of the official EVL repository (its ``model.py``, ``vision_transformer.py`` and
``weight_loaders.py``); it is put on ``sys.path`` for this measurement only. On a CPU its one hard-coded
``device='cuda'`` (in ``TemporalCrossAttention.forward``) must first be changed to ``device=q.device``.

Both models are EVL-B/16, 8 frames, 4 decoder layers, 400 classes, frozen backbone, random weights, fp32 on
the CPU with the same thread count. Ours is built and stepped as ``evl bench`` builds and steps it; the
official one as its ``main.py`` does (``backbone_mode='freeze_fp32'``, its default dropouts of 0.5, AdamW
over ``model.parameters()`` with lr 4e-4 and weight decay 0.05, ``torch.no_grad`` for inference). Measured:
the frozen training step (forward, cross-entropy, backward, AdamW step) at each batch size and inference
latency at batch 1. This machine's speed drifts by up to 20% over tens of seconds, so every round times
ours and theirs back to back (which goes first alternates) and gives its own ratio; the report gives each
side's median seconds, the median of the rounds' ratios (ours / official) and their range. Peak memory is
not reported: both models share the process, so its maximum resident set belongs to neither.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from evl.bench import BenchConfig, timing
from evl.bench.measures import random_video
from evl.devices import autocast, resolve_precision
from evl.engine.optim import allocate_adamw_state, build_optimizer
from evl.engine.step import TrainStep
from evl.models.evl import EVL
from evl.runtime import tune_cpu_allocator

MODEL = "evl-b16"
NUM_FRAMES = 8
# The official recipe (main.py defaults and the K400 scripts), used for both sides.
LR = 4e-4
WEIGHT_DECAY = 0.05


def _import_official(official_dir: Path) -> Any:
    """The official ``model`` module, imported from ``official_dir`` and nowhere else."""
    sys.path.insert(0, str(official_dir))
    module = importlib.import_module("model")
    if Path(module.__file__).resolve().parent != official_dir.resolve():
        raise SystemExit(f"official_side_by_side: 'model' came from {module.__file__}, not {official_dir}")
    return module


def _official_model(official: Any, device: torch.device) -> torch.nn.Module:
    """The official EVLTransformer, EVL-B/16 8 frames, frozen fp32 backbone with random weights."""
    vit = importlib.import_module("vision_transformer")
    backbone_name = "ViT-B/16-lnpre"
    # Its weight loader reads OpenAI TorchScript files only; a loader of its own backbone's random initial
    # weights gives the same shapes without a checkpoint.
    preset = vit.vit_presets[backbone_name]
    random_state = vit.VisionTransformer2D(return_all_features=True, **preset).state_dict()
    official.weight_loader_fn_dict["random"] = lambda _path: random_state
    cross_attention = inspect.getsource(official.TemporalCrossAttention.forward)
    if device.type != "cuda" and "device='cuda'" in cross_attention:
        raise SystemExit(
            "official_side_by_side: the official TemporalCrossAttention.forward allocates on 'cuda'; "
            "change its device='cuda' to device=q.device to run it on a CPU"
        )
    return official.EVLTransformer(
        num_frames=NUM_FRAMES,
        backbone_name=backbone_name,
        backbone_type="random",
        backbone_mode="freeze_fp32",
        decoder_num_layers=4,
        num_classes=400,
    ).to(device)


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_sides(official_dir: Path, device: torch.device) -> dict[str, dict[str, Any]]:
    """Per side: the model, a training step and an inference forward, each taking the video batch."""
    bench = BenchConfig(model=MODEL, num_frames=NUM_FRAMES)
    config = bench.model_config(freeze=True)
    ours = EVL(config).to(device)
    our_optimizer = build_optimizer(ours, lr=LR, weight_decay=WEIGHT_DECAY)
    allocate_adamw_state(our_optimizer)  # as training and `evl bench` do

    # The step of evl.bench.measures.measure_train_step: training's own.
    our_trainer = TrainStep(ours, our_optimizer, compute_dtype=resolve_precision("auto", device))

    def our_step(video: torch.Tensor, labels: torch.Tensor) -> None:
        ours.train()
        our_trainer.run([(video, labels)])
        our_trainer.apply()

    def our_inference(video: torch.Tensor) -> None:
        # The forward of evl.bench.measures.measure_inference.
        ours.eval()
        with torch.inference_mode(), autocast(resolve_precision("auto", device), device):
            ours(video)

    official = _official_model(_import_official(official_dir), device)
    # As its main.py builds them (fp32: its --disable_fp16 path, so no autocast and no loss scaling).
    their_optimizer = torch.optim.AdamW(official.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    criterion = torch.nn.CrossEntropyLoss()

    def their_step(video: torch.Tensor, labels: torch.Tensor) -> None:
        official.train()
        their_optimizer.zero_grad()
        loss = criterion(official(video), labels)
        loss.backward()
        their_optimizer.step()

    def their_inference(video: torch.Tensor) -> None:
        official.eval()
        with torch.no_grad():
            official(video)

    return {
        "ours": {
            "config": config,
            "step": our_step,
            "inference": our_inference,
            "trainable": _trainable(ours),
        },
        "official": {"step": their_step, "inference": their_inference, "trainable": _trainable(official)},
    }


def _summary(rounds: list[dict[str, float]]) -> dict[str, Any]:
    ratios = [r["ratio"] for r in rounds]
    return {
        "ours_s": statistics.median(r["ours_s"] for r in rounds),
        "official_s": statistics.median(r["official_s"] for r in rounds),
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "rounds": rounds,
    }


def run(
    official_dir: Path,
    batch_sizes: tuple[int, ...],
    rounds: int,
    threads: int,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    device = torch.device("cpu")
    tune_cpu_allocator()  # as `evl bench` and the CLI do; process-wide, so both sides run with it
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sides = build_sides(official_dir, device)
    config = sides["ours"]["config"]

    # One callable per side and measurement, fed the same random clips (official layout: B, C, T, H, W).
    measurements: dict[str, dict[str, Callable[[], None]]] = {}
    for batch in batch_sizes:
        video = random_video(batch, config, device)
        theirs = video.permute(0, 2, 1, 3, 4).contiguous()
        labels = torch.zeros(batch, dtype=torch.long)
        measurements[f"train_step_batch{batch}"] = {
            "ours": lambda v=video, y=labels: sides["ours"]["step"](v, y),
            "official": lambda v=theirs, y=labels: sides["official"]["step"](v, y),
        }
    video = random_video(1, config, device)
    theirs = video.permute(0, 2, 1, 3, 4).contiguous()
    measurements["inference_batch1"] = {
        "ours": lambda v=video: sides["ours"]["inference"](v),
        "official": lambda v=theirs: sides["official"]["inference"](v),
    }

    for name, fns in measurements.items():  # warm-up: allocator, lazy inits, optimiser state
        log(f"warm-up {name}")
        for fn in fns.values():
            fn()
    timed: dict[str, list[dict[str, float]]] = {name: [] for name in measurements}
    for index in range(rounds):
        order = ("ours", "official") if index % 2 == 0 else ("official", "ours")
        for name, fns in measurements.items():
            seconds = {side: timing.timed(fns[side], device) for side in order}
            timed[name].append(
                {"ours_s": seconds["ours"], "official_s": seconds["official"],
                 "ratio": seconds["ours"] / seconds["official"]}
            )  # fmt: skip
            log(f"round {index + 1}/{rounds} {name}: {timed[name][-1]}")

    return {
        "machine": {
            "device": platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "config": {
            "model": MODEL,
            "num_frames": NUM_FRAMES,
            "batch_sizes": list(batch_sizes),
            "rounds": rounds,
            "official_dir": str(official_dir),
            "trainable_params": {side: sides[side]["trainable"] for side in sides},
        },
        **{name: _summary(rows) for name, rows in timed.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-dir", type=Path, required=True, help="checkout of the official EVL code")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    report = run(args.official_dir, tuple(args.batch_sizes), args.rounds, args.threads)
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
