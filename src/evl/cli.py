"""The ``evl`` command line. Thin: each sub-command parses flags and calls an engine function.

Errors a user can fix (a malformed list, a missing file, a bad flag) print one line and exit with 2;
nothing a user did should end in a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from evl.config import SettingError
from evl.devices import DeviceOutOfMemory
from evl.engine.checkpoint import CheckpointError
from evl.recipes import RecipeError
from evl.runtime import tune_cpu_allocator
from evl.video.decode import VideoDecodeError, printable_path
from evl.video.lists import ListFileError
from evl.weights import WeightFormatError

if TYPE_CHECKING:  # the engine is imported by each command when it runs (a fast start for --help)
    from evl.engine.predict import Predictor

# Exit statuses, the same for every command: success; a mistake in what the user passed (one line on
# stderr says which); interrupted (128 + SIGINT, as shells report it). Anything else is a bug: a traceback.
EXIT_OK, EXIT_INPUT_ERROR, EXIT_INTERRUPTED = 0, 2, 130

USER_ERRORS = (
    RecipeError,
    ListFileError,
    VideoDecodeError,
    WeightFormatError,
    CheckpointError,
    FileNotFoundError,
    ValueError,
    FloatingPointError,  # a non-finite loss: the message says where the last good checkpoint is
)

# Plain flags of `evl train`: (flag, run-config field, type, help).
TRAIN_FLAGS = [
    ("--method", "method.name", str, "evl (default) | vifi | xclip | zeroshot"),
    ("--tune", "method.tune", str, "ViFi-CLIP: which CLIP encoders train: both | image | text"),
    ("--data-root", "data.data_root", str, "folder the list files' paths are relative to"),
    ("--train-list", "data.train_list", str, "training list: 'relpath label' per line, or CSV"),
    ("--val-list", "data.val_list", str, "validation list"),
    ("--classes", "data.classes", str, "class names: classes.txt (one per line) or a JSON list"),
    (
        "--backbone",
        "backbone.name",
        str,
        "CLIP weights: a path, a preset with local weights, or random:PRESET",
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


def _dest(field: str) -> str:
    return field.replace(".", "__")


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
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
        p.add_argument(flag, dest=_dest(field), type=type_, help=help_)
    for flag, field in ABLATION_FLAGS:
        p.add_argument(
            flag, dest=_dest(field), action="store_const", const=False, help=f"set {field} to false"
        )
    for flag, field, help_text in SWITCH_FLAGS:
        p.add_argument(flag, dest=_dest(field), action="store_const", const=True, help=help_text)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from evl.engine.train import train
    from evl.recipes import build_run_config

    flags = {field: getattr(args, _dest(field)) for _, field, _, _ in TRAIN_FLAGS}
    flags |= {field: getattr(args, _dest(field)) for _, field in ABLATION_FLAGS}
    flags |= {field: getattr(args, _dest(field)) for _, field, _ in SWITCH_FLAGS}
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


def _add_extract_parser(sub: argparse._SubParsersAction) -> None:
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
        if not field.startswith(("train.", "method.")) and field not in (
            "data.features",
            "data.val_features",
        ):
            p.add_argument(flag, dest=_dest(field), type=type_, help=help_)
    p.set_defaults(func=_cmd_extract)


def _cmd_extract(args: argparse.Namespace) -> int:
    from evl.engine.extract import extract_list
    from evl.recipes import build_run_config

    flags = {
        field: getattr(args, _dest(field), None)
        for _, field, _, _ in TRAIN_FLAGS
        if hasattr(args, _dest(field))
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


def _add_source_arguments(p: argparse.ArgumentParser) -> None:
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


def _load_source(args: argparse.Namespace):
    """The model to evaluate or predict with: a run directory's, or zero-shot CLIP from weights."""
    from evl.engine.run import load_source

    data = {"num_frames": args.num_frames, "frame_stride": args.frame_stride, "sampling": args.sampling}
    return load_source(
        args.source,
        method=args.method,
        classes=args.classes,
        templates=args.templates,
        data=data,
        device=args.device,
    )


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run (or zero-shot CLIP) on a list of videos (multi-view)")
    _add_source_arguments(p)
    p.add_argument("--val-list", help="list to evaluate (default: the run's validation list)")
    p.add_argument("--data-root", help="folder the list's paths are relative to (default: the run's)")
    p.add_argument(
        "--base-novel",
        metavar="SPLIT_DIR",
        help="a folder from 'evl splits base-novel': report base, novel and harmonic-mean accuracy",
    )
    p.add_argument("--num-temporal-views", type=int)
    p.add_argument("--num-spatial-views", type=int, choices=(1, 3))
    p.add_argument("--batch-size", type=int, default=4, help="videos per forward pass")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--on-bad-video", choices=("skip", "error"), help="default: the run's setting")
    p.add_argument("--output", help="metrics JSON (top1, top5, mean_class_accuracy, num_videos, ...)")
    p.add_argument("--out-dir", help="where scores.csv and confusion_matrix.png go (default: RUN_DIR/eval)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from evl.engine.evaluate import evaluate, evaluate_base_novel, write_evaluation
    from evl.io import atomic_write_text
    from evl.video.lists import read_list

    loaded = _load_source(args)
    data = loaded.run.data
    changes = {
        "val_list": args.val_list,
        "data_root": args.data_root,
        "num_temporal_views": args.num_temporal_views,
        "num_spatial_views": args.num_spatial_views,
        "num_workers": args.num_workers,
        "on_bad_video": args.on_bad_video,
    }
    data = dataclasses.replace(data, **{k: v for k, v in changes.items() if v is not None})
    default_out = (loaded.run_dir or Path(".")) / "eval"
    out_dir = Path(args.out_dir) if args.out_dir else default_out
    progress = not args.quiet
    if args.base_novel:
        result = evaluate_base_novel(
            loaded.model, loaded.run.method, Path(args.base_novel), data, args.batch_size, progress, out_dir
        )
        if args.output:
            atomic_write_text(args.output, json.dumps(result.to_dict(), indent=2) + "\n")
        print(
            f"base {result.base.top1:.2f}  novel {result.novel.top1:.2f}  harmonic mean "
            f"{result.harmonic_mean:.2f}  ({result.base.num_videos} + {result.novel.num_videos} videos; "
            f"scores in {out_dir}/base and {out_dir}/novel)"
        )
        return EXIT_OK
    if data.val_list is None:
        raise ValueError("no list to evaluate: pass --val-list")
    entries = read_list(data.val_list, num_classes=len(loaded.classes), data_root=data.data_root)
    evaluation = evaluate(loaded.model, entries, data, batch_size=args.batch_size, progress=progress)
    write_evaluation(evaluation, out_dir, loaded.classes, Path(args.output) if args.output else None)
    result = evaluation.result
    print(
        f"top1 {result.top1:.2f}  top5 {result.top5:.2f}  mean class {result.mean_class_accuracy:.2f}  "
        f"({result.num_videos} videos, {result.num_skipped} skipped; views "
        f"{data.num_temporal_views}x{data.num_spatial_views}; scores in {out_dir / 'scores.csv'})"
    )
    for path, reason in evaluation.failed:
        print(f"skipped: {path}: {reason}", file=sys.stderr)
    return EXIT_OK


def _add_window_arguments(p: argparse.ArgumentParser) -> None:
    """Windows of a long video: in seconds, or in frames (which win over seconds)."""
    p.add_argument("--window", type=float, metavar="S", help="windows of S seconds along the video")
    p.add_argument("--stride", type=float, metavar="S", help="seconds between windows (default: half one)")
    p.add_argument("--window-frames", type=int, metavar="N", help="windows of N frames (instead of --window)")
    p.add_argument("--stride-frames", type=int, metavar="N", help="frames between windows (or --stride)")


def _window_settings(args: argparse.Namespace) -> dict | None:
    """The window flags as keyword arguments, or None when no window was asked for."""
    if args.window is None and args.window_frames is None:
        if args.stride is not None or args.stride_frames is not None:
            raise ValueError("--stride and --stride-frames need --window or --window-frames")
        return None
    keys = ("window", "stride", "window_frames", "stride_frames")
    return {key: getattr(args, key) for key in keys}


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify video files with a trained run (or zero-shot CLIP)")
    _add_source_arguments(p)
    p.add_argument("videos", nargs="+", help="video files or folders")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per video")
    timeline = p.add_argument_group(
        "timeline", "long, untrimmed videos: classify windows along the video and merge them into segments"
    )
    _add_window_arguments(timeline)
    timeline.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    timeline.add_argument(
        "--timeline-out",
        metavar="DIR",
        help="write STEM.timeline.json, STEM.segments.csv, STEM.windows.csv and STEM.timeline.png per video",
    )
    timeline.add_argument(
        "--overlay",
        action="store_true",
        help="also write STEM.overlay.mp4 into --timeline-out: the video with the current label and score",
    )
    timeline.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from evl.engine.predict import Predictor, expand_video_paths

    windows = _window_settings(args)
    if windows is None and (args.timeline_out or args.overlay):
        raise ValueError("--timeline-out and --overlay need --window (or --window-frames)")
    if args.overlay and not args.timeline_out:
        raise ValueError("--overlay writes into the --timeline-out folder: pass --timeline-out DIR")
    predictor = Predictor(_load_source(args))
    paths = expand_video_paths(args.videos)
    if not paths:
        raise FileNotFoundError(f"no video files in {' '.join(args.videos)}")
    if windows is not None:
        return _predict_timelines(args, predictor, paths, windows)
    failures = 0
    for path in paths:
        try:
            prediction = predictor.predict(path, topk=args.topk)
        except VideoDecodeError as err:
            failures += 1
            shown = printable_path(path)
            print(json.dumps({"path": shown, "error": str(err)}) if args.json else f"error: {err}")
            continue
        if args.json:
            print(json.dumps(prediction.to_dict()))
        else:
            print(printable_path(path))
            for name, prob in zip(prediction.classes, prediction.probabilities, strict=True):
                print(f"  {prob * 100:6.2f}%  {name}")
    # Some videos unreadable: each has its error line and the others their predictions. None readable: an
    # input error, as a missing file is for every other command.
    return EXIT_INPUT_ERROR if failures == len(paths) else EXIT_OK


def _predict_timelines(
    args: argparse.Namespace, predictor: Predictor, paths: list[Path], windows: dict
) -> int:
    """``evl predict --window``: per video, its segments (or the whole timeline as JSON) and the files."""
    from evl.engine.timeline import unique_stems, write_timeline_files

    failures = 0
    for path, stem in zip(paths, unique_stems(paths), strict=True):
        try:
            timeline = predictor.timeline(
                path, topk=args.topk, batch_size=args.batch_size, progress=not args.quiet, **windows
            )
            written = {}
            if args.timeline_out:
                overlay_from = path if args.overlay else None
                written = write_timeline_files(timeline, args.timeline_out, stem, overlay_from=overlay_from)
        except VideoDecodeError as err:
            failures += 1
            shown = printable_path(path)
            print(json.dumps({"path": shown, "error": str(err)}) if args.json else f"error: {err}")
            continue
        if args.json:
            files = {kind: str(file) for kind, file in written.items()}
            print(json.dumps({**timeline.to_dict(), "files": files}))
            continue
        plan = timeline.plan
        every = f"{plan.length / plan.fps:.2f} s every {plan.stride / plan.fps:.2f} s"
        print(f"{printable_path(path)}  ({len(plan)} windows of {every})")
        for s in timeline.segments:
            print(f"  {s.start:9.2f} - {s.end:9.2f} s  {s.score * 100:6.2f}%  {s.name}")
        for kind, file in written.items():
            print(f"  {kind}: {file}")
    return EXIT_INPUT_ERROR if failures == len(paths) else EXIT_OK


def _add_embed_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed", help="video embeddings (per video, or per window of long videos) into one safetensors file"
    )
    p.add_argument(
        "source", metavar="RUN_DIR", help="a run directory; or CLIP weights with --method zeroshot"
    )
    p.add_argument(
        "input",
        metavar="LIST_OR_FOLDER",
        help="a folder of videos, a video file, or a list file (training lists, or one path per line)",
    )
    p.add_argument("--output", required=True, help="the safetensors file to write")
    p.add_argument("--data-root", help="folder the list's paths are relative to")
    p.add_argument(
        "--method", choices=("zeroshot",), help="zeroshot: SOURCE is CLIP weights, nothing trained"
    )
    p.add_argument("--num-frames", type=int, help="zero-shot from CLIP weights: frames per clip (default 8)")
    p.add_argument("--frame-stride", type=int, help="zero-shot from CLIP weights: frame stride (default 16)")
    p.add_argument("--sampling", choices=("dense", "segment"), help="zero-shot from CLIP weights: sampling")
    _add_window_arguments(p)
    p.add_argument("--batch-size", type=int, default=8, help="videos (or windows) per forward pass")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    from evl.engine.embed import embed_videos, load_embedder, read_video_paths

    windows = _window_settings(args) or {}
    data = {"num_frames": args.num_frames, "frame_stride": args.frame_stride, "sampling": args.sampling}
    predictor = load_embedder(args.source, method=args.method, data=data, device=args.device)
    paths = read_video_paths(args.input, data_root=args.data_root)
    if not paths:
        raise FileNotFoundError(f"no video files in {args.input}")
    written = embed_videos(
        predictor,
        paths,
        args.output,
        batch_size=args.batch_size,
        progress=not args.quiet,
        source=args.source,
        **windows,
    )
    summary = {
        "output": str(args.output),
        "videos": len(written.paths),
        "rows": len(written),
        "dim": written.dim,
        "failed": len(written.failed),
    }
    print(json.dumps(summary))
    return EXIT_OK


def _add_lists_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lists",
        help="train/val lists from a folder of videos: one subfolder per class, or train/ and val/ of them",
    )
    p.add_argument(
        "folder",
        metavar="FOLDER",
        help="one subfolder of videos per class, or train/ and val/ each holding class subfolders; "
        "the lists' paths are relative to it (train with --data-root FOLDER)",
    )
    p.add_argument(
        "--out-dir", required=True, help="where train.txt, val.txt, classes.txt, skipped.txt, summary.csv go"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of each class drawn for validation (not used when FOLDER has train/ and val/)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the validation draw")
    p.add_argument("--workers", type=int, help="processes checking the videos (default: one per CPU core)")
    p.add_argument("--overwrite", action="store_true", help="replace the lists already in --out-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_lists)


def _cmd_lists(args: argparse.Namespace) -> int:
    from evl.video.folder_lists import format_summary, lists_from_folder
    from evl.video.parallel import default_workers

    result = lists_from_folder(
        args.folder,
        args.out_dir,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers or default_workers(),
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(format_summary(result))
    if result.layout == "train/val":
        print(f"split: the train/ and val/ folders of {result.data_root}")
    else:
        print(f"split: {args.val_fraction:g} of each class to validation, seed {args.seed}")
    val = f" --val-list {result.val_list}" if result.val_list else ""
    print(
        f"train with: --data-root {result.data_root} --train-list {result.train_list}{val} "
        f"--classes {result.classes_file}  (per-video details: {result.summary_file})"
    )
    if result.skipped:
        print(
            f"{len(result.skipped)} videos left out, with the reasons in {result.skipped_file}",
            file=sys.stderr,
        )
    return EXIT_OK


def _add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="re-encode videos once (smaller, a keyframe every few frames) so that training loads them fast",
    )
    p.add_argument(
        "src_root", metavar="SRC_ROOT", help="folder the list's paths are relative to (never written)"
    )
    p.add_argument(
        "list",
        metavar="LIST",
        nargs="?",
        help="the videos: 'relpath label' lines or a CSV list (not needed with a labelled --trim CSV)",
    )
    p.add_argument(
        "--out-root", required=True, help="folder for the new videos and their list (outside SRC_ROOT)"
    )
    p.add_argument("--short-side", type=int, default=256, help="short side in pixels (never enlarged)")
    p.add_argument("--keyframe-interval", type=int, default=16, help="a keyframe every N frames")
    p.add_argument("--crf", type=int, default=23, help="x264 quality: lower is larger and closer")
    p.add_argument(
        "--trim",
        metavar="CSV",
        help="clips to cut, in seconds: video,start,end[,label] rows, or Kinetics annotations "
        "(label,youtube_id,time_start,time_end,...)",
    )
    p.add_argument(
        "--classes", help="with --trim: class-names file numbering the CSV's label names (default: sorted)"
    )
    p.add_argument("--workers", type=int, help="processes encoding (default: one per CPU core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from evl.video.parallel import default_workers
    from evl.video.prepare import prepare_videos

    result = prepare_videos(
        args.src_root,
        args.list,
        args.out_root,
        trim=args.trim,
        classes=args.classes,
        short_side=args.short_side,
        keyframe_interval=args.keyframe_interval,
        crf=args.crf,
        workers=args.workers or default_workers(),
        progress=not args.quiet,
    )
    print(
        f"prepared {len(result.done)} videos, kept {len(result.existing)} from an earlier run, "
        f"{len(result.failed)} failed ({result.encoder})"
    )
    classes = f" --classes {result.classes_file}" if result.classes_file else ""
    print(f"train with: --data-root {result.out_root} --train-list {result.list_path}{classes}")
    for failure in result.failed[:10]:
        print(f"failed: {failure}", file=sys.stderr)
    if result.failed:
        more = f"{len(result.failed) - 10} more; " if len(result.failed) > 10 else ""
        print(f"({more}all failures in {result.failures_path})", file=sys.stderr)
    return EXIT_OK


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a run's model for deployment: ONNX or a torch.export program (.pt2)"
    )
    _add_source_arguments(p)
    p.set_defaults(device="cpu")  # traced on the CPU, whatever the machine has
    p.add_argument("--format", choices=("onnx", "torch-export"), default="onnx")
    p.add_argument("--output", help="folder for the files and deployment.json (default: RUN_DIR/export)")
    p.add_argument("--split", action="store_true", help="EVL: the frozen backbone and the decoder apart")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip comparing its scores with the model's")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from evl.engine.export import DEPLOYMENT_FILE, ExportDependencyError, export_run

    loaded = _load_source(args)
    output = Path(args.output) if args.output else (loaded.run_dir or Path(".")) / "export"
    try:
        result = export_run(loaded, output, args.format, args.split, args.opset, check=not args.no_check)
    except ExportDependencyError as err:  # an ImportError: not among the errors main reports in one line
        print(f"evl export: error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    checked = ""  # the files themselves were reported as they were written
    if result.max_difference is not None:
        checked = f"; its scores are within {result.max_difference:.1e} of the model's"
    print(f"wrote {result.directory / DEPLOYMENT_FILE}{checked}")
    return EXIT_OK


def _add_splits_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("splits", help="few-shot and base-to-novel splits (seeded, deterministic)")
    kinds = p.add_subparsers(dest="kind", required=True)
    few = kinds.add_parser("few-shot", help="K videos per class: LIST_few_shot_K.txt for each K (nested)")
    few.add_argument("--list", required=True, help="the full training list")
    few.add_argument("--k", default="2,4,8,16", help="shots per class, comma-separated")
    few.add_argument("--seed", type=int, default=0)
    few.add_argument("--data-root", help="check that every listed video exists under this folder")
    few.add_argument("--allow-fewer", action="store_true", help="a class with fewer videos keeps them all")
    few.add_argument("--out-dir", required=True)
    few.set_defaults(func=_cmd_splits)
    bn = kinds.add_parser(
        "base-novel", help="base classes (few-shot training, base_val) and novel classes (novel_val)"
    )
    bn.add_argument("--list", required=True, help="the full training list")
    bn.add_argument("--classes", required=True, help="class names of the full list")
    bn.add_argument("--val-list", help="the full validation list (-> base_val.txt, novel_val.txt)")
    bn.add_argument("--shots", type=int, default=16, help="training videos per base class")
    bn.add_argument("--seeds", default="1,2,3", help="one training list per seed: fs_base_s{seed}_train.txt")
    bn.add_argument(
        "--split-seed", type=int, help="draw the base classes with this seed (default: first half)"
    )
    bn.add_argument("--num-base", type=int, help="number of base classes (default: half, rounded up)")
    bn.add_argument("--base-classes", help="class-names file of the base classes (e.g. a published split)")
    bn.add_argument("--allow-fewer", action="store_true", help="a class with fewer videos keeps them all")
    bn.add_argument("--out-dir", required=True)
    bn.set_defaults(func=_cmd_splits)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _cmd_splits(args: argparse.Namespace) -> int:
    from evl.splits import write_base_novel_lists, write_few_shot_lists

    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if args.kind == "few-shot":
        paths = write_few_shot_lists(
            args.list,
            args.out_dir,
            ks=_int_list(args.k, "--k"),
            seed=args.seed,
            data_root=args.data_root,
            allow_fewer=args.allow_fewer,
        )
    else:
        paths = write_base_novel_lists(
            args.list,
            args.classes,
            args.out_dir,
            shots=args.shots,
            seeds=_int_list(args.seeds, "--seeds"),
            val_list=args.val_list,
            split_seed=args.split_seed,
            num_base=args.num_base,
            base_classes=args.base_classes,
            allow_fewer=args.allow_fewer,
        )
    for path in paths:
        print(path)
    return EXIT_OK


def _add_synth_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic dataset of moving shapes (real mp4 files)")
    p.add_argument("out_dir")
    p.add_argument("--task", default="motion", choices=("motion", "shapes", "mixed"))
    p.add_argument("--train-per-class", type=int, default=32)
    p.add_argument("--val-per-class", type=int, default=8)
    p.add_argument("--num-frames", type=int, default=32)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from evl.synth import make_dataset

    ds = make_dataset(
        args.out_dir,
        task=args.task,
        num_train_per_class=args.train_per_class,
        num_val_per_class=args.val_per_class,
        num_frames=args.num_frames,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
    )
    print(f"wrote {ds.num_classes} classes to {ds.root}: {ds.train_list}, {ds.val_list}, {ds.classes_file}")
    return EXIT_OK


def _add_flops_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
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


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evl", description="Video recognition on frozen CLIP image encoders."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train_parser,
        _add_extract_parser,
        _add_eval_parser,
        _add_predict_parser,
        _add_embed_parser,
        _add_lists_parser,
        _add_prepare_parser,
        _add_export_parser,
        _add_splits_parser,
        _add_synth_parser,
        _add_flops_parser,
        _add_bench_parser,
        _add_demo_parser,
    ):
        add(sub)
    return parser


def _setting_advice(err: SettingError) -> str:
    """The flag that sets the run-config field an engine error names, where the command line has one."""
    flags = {field: flag for flag, field, _, _ in TRAIN_FLAGS}
    return f"; pass {flags[err.field]}" if err.field in flags else ""


def _memory_advice(err: DeviceOutOfMemory, command: str) -> str:
    """What to pass next time, by the flags of the command that ran out of memory."""
    if err.stage == "training":
        return (
            f"pass --batch-split {2 * err.batch_split} (or more) to run the same batch of {err.batch_size} "
            "in smaller micro-batches; the last good checkpoint is kept and --resume auto continues from it"
        )
    if command == "predict" and err.batch_size == 1:  # one video's views: only the device can change
        return "the views of one video do not fit: use a device with more memory or --device cpu"
    return f"pass a smaller --batch-size (now {err.batch_size})"


class _TerminalHandler(logging.Handler):
    """The engine's messages as the command line shows them: information on stdout, warnings (prefixed
    ``warning:``) on stderr, written through tqdm so that an open progress bar is redrawn below them.
    The streams are looked up per message, so a redirected ``sys.stdout`` (tests, notebooks) is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                tqdm.write(f"warning: {message}", file=sys.stderr)
            else:
                tqdm.write(message, file=sys.stdout)
        except Exception:
            self.handleError(record)


def install_log_handler() -> None:
    """Show the engine's (``evl.*`` loggers') information and warnings on the terminal; idempotent, since
    ``main`` may run many times in one process."""
    logger = logging.getLogger("evl")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _TerminalHandler) for h in logger.handlers):
        logger.addHandler(_TerminalHandler())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    tune_cpu_allocator()
    install_log_handler()
    try:
        return args.func(args)
    except DeviceOutOfMemory as err:
        if os.environ.get("EVL_DEBUG"):
            raise
        print(f"evl {args.command}: error: {err}; {_memory_advice(err, args.command)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except USER_ERRORS as err:
        if os.environ.get("EVL_DEBUG"):
            raise
        advice = _setting_advice(err) if isinstance(err, SettingError) else ""
        print(f"evl {args.command}: error: {err}{advice}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(f"evl {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
