"""Flags that more than one command shares.

The run-config flags of ``evl train`` (``extract`` takes the data ones, and the error advice names them),
the model source of ``eval``, ``predict`` and ``export`` (a run directory, or CLIP weights for zero-shot),
and the windows of long videos (``predict`` timelines and ``embed``).
"""

from __future__ import annotations

import argparse


def float_list(text: str) -> list[float]:
    """A comma-separated list of numbers, as ``--multi-scale-crop 1,0.875,0.75,0.66`` takes it."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


# Plain flags of `evl train`: (flag, run-config field, type, help).
TRAIN_FLAGS = [
    ("--method", "method.name", str, "evl (default) | vifi | vifi_prompt | xclip | zeroshot"),
    ("--tune", "method.tune", str, "ViFi-CLIP: which CLIP encoders train: both | image | text"),
    ("--data-root", "data.data_root", str, "folder the list files' paths are relative to"),
    ("--train-list", "data.train_list", str, "training list: 'relpath label' per line, or CSV"),
    ("--val-list", "data.val_list", str, "validation list"),
    ("--classes", "data.classes", str, "class names: classes.txt (one per line) or a JSON list"),
    (
        "--backbone",
        "backbone.name",
        str,
        "CLIP weights: a path, a preset with local weights, or random:PRESET "
        "(vifi_prompt: also a ViFi-CLIP run directory, whose tuned towers it prompts)",
    ),
    ("--backbone-heads", "backbone.heads", int, "attention heads, for checkpoints not using width // 64"),
    ("--num-frames", "data.num_frames", int, "frames per clip"),
    ("--frame-stride", "data.frame_stride", int, "frames between sampled frames (dense sampling)"),
    ("--sampling", "data.sampling", str, "dense | segment (TSN)"),
    ("--steps", "train.steps", int, "optimiser steps"),
    ("--batch-size", "train.batch_size", int, "clips per optimiser step"),
    ("--batch-split", "train.batch_split", int, "micro-batches per step (gradient accumulation)"),
    ("--lr", "train.lr", float, "peak learning rate"),
    ("--weight-decay", "train.weight_decay", float, "AdamW weight decay"),
    ("--label-smoothing", "train.label_smoothing", float, "cross-entropy label smoothing"),
    ("--mixup", "train.mixup", float, "Mixup Beta(a, a) of each micro-batch, 0 off (X-CLIP/ViFi: 0.8)"),
    ("--cutmix", "train.cutmix", float, "CutMix Beta(a, a) of each micro-batch, 0 off (X-CLIP/ViFi: 1.0)"),
    ("--mix-switch-prob", "train.mix_switch_prob", float, "with both on, the probability of CutMix"),
    (
        "--multi-scale-crop",
        "data.multi_scale_crop",
        float_list,
        "multi-scale training crop instead of the random-resized one: fractions of the short side, "
        "e.g. 1,0.875,0.75,0.66 (X-CLIP/ViFi)",
    ),
    (
        "--color-jitter",
        "data.color_jitter",
        float,
        "probability of a clip's colour jitter (X-CLIP/ViFi: 0.8)",
    ),
    ("--grayscale", "data.grayscale", float, "probability of a grey training clip (X-CLIP/ViFi: 0.2)"),
    ("--warmup-steps", "train.warmup_steps", int, "linear warm-up steps"),
    ("--precision", "train.precision", str, "decoder autocast: auto | float32 | bfloat16 | float16"),
    ("--eval-every", "train.eval_every", int, "validate every N steps"),
    ("--save-every", "train.save_every", int, "checkpoint every N steps"),
    ("--seed", "train.seed", int, "seed of data order, augmentation and initialisation"),
    ("--num-workers", "data.num_workers", int, "data-loader processes (default: from the CPU count)"),
    ("--on-bad-video", "data.on_bad_video", str, "skip | error"),
    ("--decoder-layers", "decoder.num_layers", int, "decoder depth (reads the last N backbone blocks)"),
    ("--init-from", "train.init_from", str, "run directory or checkpoint whose decoder initialises this run"),
    ("--features", "data.features", str, "feature cache from 'evl extract': train without the backbone"),
    ("--val-features", "data.val_features", str, "feature cache of the validation list"),
]
ABLATION_FLAGS = [
    ("--no-temporal-conv", "decoder.temporal_conv"),
    ("--no-temporal-pos-embed", "decoder.temporal_pos_embed"),
    ("--no-temporal-cross-attention", "decoder.temporal_cross_attention"),
    ("--no-flip", "data.flip"),
]
SWITCH_FLAGS = [
    (
        "--compile",
        "train.compile",
        "torch.compile the training step (slow to start; see benchmarks/README.md)",
    ),
]


def field_dest(field: str) -> str:
    return field.replace(".", "__")


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Where the model comes from: a run directory, or CLIP weights for zero-shot classification."""
    p.add_argument(
        "source", metavar="RUN_DIR", help="a run directory; or CLIP weights with --method zeroshot"
    )
    p.add_argument(
        "--method", choices=("zeroshot",), help="zeroshot: SOURCE is CLIP weights, nothing trained"
    )
    p.add_argument(
        "--classes", help="class names to predict (text methods: any list; default: the run's classes)"
    )
    p.add_argument(
        "--template",
        action="append",
        dest="templates",
        metavar="TEXT",
        help="class prompt with {} for the name, repeatable (text methods; default: the method's own)",
    )
    p.add_argument("--num-frames", type=int, help="zero-shot from CLIP weights: frames per clip (default 8)")
    p.add_argument("--frame-stride", type=int, help="zero-shot from CLIP weights: frame stride (default 16)")
    p.add_argument("--sampling", choices=("dense", "segment"), help="zero-shot from CLIP weights: sampling")
    p.add_argument("--device")


def load_source(args: argparse.Namespace):
    """The model to evaluate or predict with: a run directory's, or zero-shot CLIP from weights."""
    from evl.engine.run import load_source as load

    data = {"num_frames": args.num_frames, "frame_stride": args.frame_stride, "sampling": args.sampling}
    return load(
        args.source,
        method=args.method,
        classes=args.classes,
        templates=args.templates,
        data=data,
        device=args.device,
    )


def add_window_arguments(p: argparse.ArgumentParser) -> None:
    """Windows of a long video: in seconds, or in frames (which win over seconds)."""
    p.add_argument("--window", type=float, metavar="S", help="windows of S seconds along the video")
    p.add_argument("--stride", type=float, metavar="S", help="seconds between windows (default: half one)")
    p.add_argument("--window-frames", type=int, metavar="N", help="windows of N frames (instead of --window)")
    p.add_argument("--stride-frames", type=int, metavar="N", help="frames between windows (or --stride)")


def window_settings(args: argparse.Namespace) -> dict | None:
    """The window flags as keyword arguments, or None when no window was asked for."""
    if args.window is None and args.window_frames is None:
        if args.stride is not None or args.stride_frames is not None:
            raise ValueError("--stride and --stride-frames need --window or --window-frames")
        return None
    keys = ("window", "stride", "window_frames", "stride_frames")
    return {key: getattr(args, key) for key in keys}
