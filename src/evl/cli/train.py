"""``evl train`` (a run from a recipe and flags) and ``evl extract`` (the frozen backbone's features of a
list, cached for training without it)."""

from __future__ import annotations

import argparse
import json
import math
import os

from evl.cli.exits import EXIT_OK
from evl.cli.flags import ABLATION_FLAGS, SWITCH_FLAGS, TRAIN_FLAGS, field_dest


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a video model on CLIP: EVL (default), ViFi-CLIP, X-CLIP; or set up zero-shot CLIP",
    )
    p.add_argument("--config", help="YAML recipe: a path or a shipped name such as k400_b16_8f")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    p.add_argument(
        "--output-dir", required=True, help="run directory (created; resumed when it has checkpoints)"
    )
    p.add_argument(
        "--resume", default="auto", help="auto (latest good checkpoint), none, or a checkpoint path"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for flag, field, type_, help_ in TRAIN_FLAGS:
        p.add_argument(flag, dest=field_dest(field), type=type_, help=help_)
    for flag, field in ABLATION_FLAGS:
        p.add_argument(
            flag, dest=field_dest(field), action="store_const", const=False, help=f"set {field} to false"
        )
    for flag, field, help_text in SWITCH_FLAGS:
        p.add_argument(flag, dest=field_dest(field), action="store_const", const=True, help=help_text)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from evl.engine.train import train
    from evl.recipes import build_run_config

    flags = {field: getattr(args, field_dest(field)) for _, field, _, _ in TRAIN_FLAGS}
    flags |= {field: getattr(args, field_dest(field)) for _, field in ABLATION_FLAGS}
    flags |= {field: getattr(args, field_dest(field)) for _, field, _ in SWITCH_FLAGS}
    run = build_run_config(args.config, args.set, **flags)
    resume = None if args.resume == "none" else args.resume
    result = train(run, args.output_dir, resume=resume, device=args.device, progress=not args.quiet)
    loss = result.final_loss if math.isfinite(result.final_loss) else None  # JSON has no NaN
    summary = {"run_dir": str(result.run_dir), "step": result.step, "final_loss": loss}
    if result.evaluation is not None:
        summary["val"] = result.evaluation.result.to_dict()
    if _is_first_process():  # one summary per distributed run
        print(json.dumps(summary))
    return EXIT_OK


def _is_first_process() -> bool:
    """Whether this is the process that reports (rank 0 under torchrun, the only one otherwise)."""
    return os.environ.get("RANK", "0") == "0"


# Data settings extraction has no use for: it reads videos, not caches, and one fixed view of each
# (centre clip, centre crop) with no training augmentation.
_NOT_FOR_EXTRACTION = (
    "data.features",
    "data.val_features",
    "data.multi_scale_crop",
    "data.color_jitter",
    "data.grayscale",
)


def add_extract_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="run the frozen backbone once over a list and cache what the decoder reads "
        "(under torchrun, the videos are shared out to the processes)",
    )
    p.add_argument("--config", help="YAML recipe: a path or a shipped name such as k400_b16_8f")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    p.add_argument(
        "--split", choices=("train", "val"), default="train", help="which list of the run to cache"
    )
    p.add_argument("--output", required=True, help="cache folder (resumed when it holds a partial cache)")
    p.add_argument("--batch-size", type=int, default=4, help="videos per backbone pass")
    p.add_argument("--blocks", help="backbone blocks to cache, e.g. 8,9,10,11 (default: the decoder's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for flag, field, type_, help_ in TRAIN_FLAGS:
        if not field.startswith(("train.", "method.")) and field not in _NOT_FOR_EXTRACTION:
            p.add_argument(flag, dest=field_dest(field), type=type_, help=help_)
    p.set_defaults(func=_cmd_extract)


def _cmd_extract(args: argparse.Namespace) -> int:
    from evl.engine.extract import extract_list
    from evl.recipes import build_run_config

    flags = {
        field: getattr(args, field_dest(field), None)
        for _, field, _, _ in TRAIN_FLAGS
        if hasattr(args, field_dest(field))
    }
    run = build_run_config(args.config, args.set, **flags)
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else None
    result = extract_list(
        run,
        args.split,
        args.output,
        batch_size=args.batch_size,
        blocks=blocks,
        device=args.device,
        progress=not args.quiet,
    )
    if not _is_first_process():
        return EXIT_OK
    print(
        json.dumps(
            {
                "cache": str(result.root),
                "videos": result.num_videos,
                "extracted_now": result.num_extracted,
                "skipped": result.num_skipped,
                "mib_per_clip": round(result.bytes_per_clip / 2**20, 2),
            }
        )
    )
    return EXIT_OK
