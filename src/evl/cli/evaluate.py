"""``evl eval``: a run (or zero-shot CLIP) on a list of videos, on the base and novel lists of a split, or on
every split of a cross-dataset set."""

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
    p.add_argument(
        "--splits",
        metavar="SPLITS_DIR",
        help="a folder from 'evl splits cross-dataset': each split's top-1/top-5 and their mean ± std",
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

    split_set = _split_set(args)
    loaded = load_source(args)
    data = loaded.run.data
    changes = {
        "val_list": args.val_list,
        "data_root": args.data_root or (split_set.data_root if split_set else None),
        "num_temporal_views": args.num_temporal_views,
        "num_spatial_views": args.num_spatial_views,
        "num_workers": args.num_workers,
        "on_bad_video": args.on_bad_video,
    }
    data = dataclasses.replace(data, **{k: v for k, v in changes.items() if v is not None})
    default_out = (loaded.run_dir or Path(".")) / "eval"
    out_dir = Path(args.out_dir) if args.out_dir else default_out
    progress = not args.quiet
    if split_set is not None:
        return _eval_splits(args, loaded, data, out_dir)
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


def _split_set(args: argparse.Namespace):
    """The cross-dataset set of ``--splits`` (read before the model loads, so a bad folder fails at once)."""
    from evl.splits import read_split_set

    if args.splits is None:
        return None
    flags = (("--base-novel", args.base_novel), ("--val-list", args.val_list), ("--classes", args.classes))
    given = [flag for flag, value in flags if value]
    if given:
        raise ValueError(f"--splits: each split names its own list and classes; leave out {', '.join(given)}")
    split_set = read_split_set(args.splits)
    if args.method is not None:
        # CLIP weights are built over a class list; the first split's will do, each split sets its own.
        args.classes = str(split_set.splits[0].classes)
    return split_set


def _eval_splits(args: argparse.Namespace, loaded, data, out_dir: Path) -> int:
    from evl.engine.evaluate import evaluate_cross_dataset
    from evl.io import atomic_write_text

    result = evaluate_cross_dataset(
        loaded.model, loaded.run.method, Path(args.splits), data, args.batch_size, not args.quiet, out_dir
    )
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    atomic_write_text(out_dir / "summary.json", text)
    if args.output:
        atomic_write_text(args.output, text)
    for name, count, split in zip(result.names, result.num_classes, result.results, strict=True):
        print(
            f"{name}  top1 {split.top1_listed:.2f}  top5 {split.top5_listed:.2f}  ({count} classes, "
            f"{split.num_listed} videos, {split.num_skipped} skipped)"
        )
    summary = result.summary()
    skipped = sum(split.num_skipped for split in result.results)
    note = f"; {skipped} undecodable videos counted wrong" if skipped else ""
    print(
        f"mean ± std over {len(result.names)} splits (population std): top1 {summary['top1_mean']:.2f} ± "
        f"{summary['top1_std']:.2f}  top5 {summary['top5_mean']:.2f} ± {summary['top5_std']:.2f}{note}  "
        f"(per split in {out_dir}/<split>, summary in {out_dir / 'summary.json'})"
    )
    return EXIT_OK
