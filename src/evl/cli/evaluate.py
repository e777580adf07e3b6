"""``evl eval``: a run (or zero-shot CLIP) on a list of videos, or on the base and novel lists of a split."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evl.cli.exits import EXIT_OK
from evl.cli.flags import add_source_arguments, load_source


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run (or zero-shot CLIP) on a list of videos (multi-view)")
    add_source_arguments(p)
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

    loaded = load_source(args)
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
