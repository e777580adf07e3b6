"""``evl predict`` (classes of video files, or timelines of long videos with ``--window``) and ``evl embed``
(video embeddings into one safetensors file)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from evl.cli.exits import EXIT_INPUT_ERROR, EXIT_OK
from evl.cli.flags import add_source_arguments, add_window_arguments, load_source, window_settings
from evl.video.decode import VideoDecodeError, printable_path

if TYPE_CHECKING:  # the engine is imported by each command when it runs (a fast start for --help)
    from evl.engine.predict import Predictor


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify video files with a trained run (or zero-shot CLIP)")
    add_source_arguments(p)
    p.add_argument("videos", nargs="+", help="video files or folders")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per video")
    timeline = p.add_argument_group(
        "timeline", "long, untrimmed videos: classify windows along the video and merge them into segments"
    )
    add_window_arguments(timeline)
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

    windows = window_settings(args)
    if windows is None and (args.timeline_out or args.overlay):
        raise ValueError("--timeline-out and --overlay need --window (or --window-frames)")
    if args.overlay and not args.timeline_out:
        raise ValueError("--overlay writes into the --timeline-out folder: pass --timeline-out DIR")
    predictor = Predictor(load_source(args))
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
            print_unreadable(path, err, args.json)
            continue
        if args.json:
            print(json.dumps(prediction.to_dict()))
        else:
            print_ranked(path, prediction.classes, prediction.probabilities)
    # Some videos unreadable: each has its error line and the others their predictions. None readable: an
    # input error, as a missing file is for every other command.
    return EXIT_INPUT_ERROR if failures == len(paths) else EXIT_OK


def print_ranked(path: str | Path, classes: list[str], probabilities: list[float]) -> None:
    """A video's path, then one line per class: its probability in percent and its name, best first."""
    print(printable_path(path))
    for name, prob in zip(classes, probabilities, strict=True):
        print(f"  {prob * 100:6.2f}%  {name}")


def print_unreadable(path: str | Path, err: VideoDecodeError, as_json: bool) -> None:
    """The line of a video that could not be decoded (a JSON object with ``--json``)."""
    print(json.dumps({"path": printable_path(path), "error": str(err)}) if as_json else f"error: {err}")


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
            print_unreadable(path, err, args.json)
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


def add_embed_parser(sub: argparse._SubParsersAction) -> None:
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
    add_window_arguments(p)
    p.add_argument("--batch-size", type=int, default=8, help="videos (or windows) per forward pass")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    from evl.engine.embed import embed_videos, load_embedder, read_video_paths

    windows = window_settings(args) or {}
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
