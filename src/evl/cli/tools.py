"""Tools around the models: ``evl flops`` (GFLOPs of a configuration), ``evl bench`` (time and memory of a
model) and ``evl demo`` (the offline end-to-end demo)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evl.cli.exits import EXIT_OK


def add_flops_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="GFLOPs of a model configuration (papers' convention)")
    p.add_argument("--model", default="evl-b16", help="model preset, e.g. evl-b16, evl-l14, evl-b16-ssv2")
    p.add_argument(
        "--backbone",
        help="another image encoder preset under the model's decoder, e.g. SigLIP-B/16, DINOv2-B/14-reg",
    )
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--views", type=int, default=3)
    p.set_defaults(func=_cmd_flops)


def _cmd_flops(args: argparse.Namespace) -> int:
    import dataclasses

    from evl.config import model_preset, vision_preset
    from evl.flops import count_flops

    config = model_preset(args.model, num_frames=args.num_frames)
    if args.backbone:
        config = dataclasses.replace(
            config, backbone=vision_preset(args.backbone), backbone_name=args.backbone
        )
    report = count_flops(config, num_views=args.views)
    shown = {"model": args.model, "backbone": config.backbone_name, "num_frames": args.num_frames}
    print(json.dumps({**shown, **report.to_dict()}, indent=2))
    return EXIT_OK


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure step time, latency, throughput and memory of a model (JSON)")
    p.add_argument("--model", default="evl-b16", help="model preset (random weights of its shapes)")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2], help="frozen training batches")
    p.add_argument("--open-batch-size", type=int, default=1, help="batch of the open-backbone step")
    p.add_argument("--infer-batch-size", type=int, default=8, help="batch of the throughput measurement")
    p.add_argument("--cached-batch-size", type=int, default=4, help="micro-batch of the cached-feature step")
    p.add_argument(
        "--epoch-batch-size",
        type=int,
        default=256,
        help="clips per optimiser step in the cached-feature epoch",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median) after one warm-up")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    p.add_argument("--no-dataloader", action="store_true", help="skip the data-loader measurement")
    p.add_argument("--skip", nargs="*", default=[], help="measurements to leave out, e.g. train_open")
    p.add_argument("--output", help="also write the JSON report here")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from evl.bench import BenchConfig, run_bench
    from evl.io import atomic_write_text

    bench = BenchConfig(
        model=args.model,
        num_frames=args.num_frames,
        train_batch_sizes=tuple(args.batch_sizes),
        open_batch_size=args.open_batch_size,
        infer_batch_size=args.infer_batch_size,
        cached_batch_size=args.cached_batch_size,
        epoch_batch_size=args.epoch_batch_size,
        repeats=args.repeats,
        device=args.device,
        threads=args.threads,
        dataloader=not args.no_dataloader,
        skip=tuple(args.skip),
    )
    bench.model_config()  # an unknown preset fails here, before any process starts
    report = run_bench(bench, log=lambda line: print(line, file=sys.stderr))
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    return EXIT_OK


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline end-to-end demo on synthetic videos (minutes on a CPU)")
    p.add_argument("--output-dir", default="demo_run")
    p.add_argument("--steps", type=int, help="override the demo's training steps")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from evl.demo import format_summary, run_demo

    summary = run_demo(Path(args.output_dir), steps=args.steps, progress=not args.quiet)
    print(format_summary(summary))
    return EXIT_OK
