"""Commands that write data: ``evl lists`` (train/val lists from a folder of videos), ``evl prepare``
(videos re-encoded for fast loading), ``evl splits`` (few-shot, base-to-novel and cross-dataset lists) and
``evl synth`` (a synthetic dataset)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evl.cli.exits import EXIT_OK
from evl.splits import K600_SPLITS


def add_lists_parser(sub: argparse._SubParsersAction) -> None:
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


def add_prepare_parser(sub: argparse._SubParsersAction) -> None:
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


def add_splits_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "splits", help="few-shot, base-to-novel and cross-dataset splits (seeded, deterministic)"
    )
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
    cd = kinds.add_parser(
        "cross-dataset",
        help="splits of another dataset's classes for zero-shot transfer: drawn (the Kinetics-600 way) or "
        "published (HMDB-51 / UCF-101 test lists); evaluate with 'evl eval RUN --splits DIR'",
    )
    source = cd.add_mutually_exclusive_group(required=True)
    source.add_argument("--list", help="the dataset's full evaluation list, to draw class splits from")
    source.add_argument(
        "--split-lists", nargs="+", metavar="LIST", help="published splits: one list per split, kept as is"
    )
    cd.add_argument("--classes", help="class names of --list (or of every --split-lists list)")
    cd.add_argument(
        "--split-classes", nargs="+", metavar="FILE", help="with --split-lists: one class-names file per list"
    )
    cd.add_argument(
        "--exclude-classes",
        metavar="FILE",
        help="with --list: classes the model was trained on (e.g. Kinetics-400's), left out by name",
    )
    cd.add_argument("--num-splits", type=int, help=f"with --list (default {K600_SPLITS['num_splits']})")
    cd.add_argument(
        "--classes-per-split", type=int, help=f"with --list (default {K600_SPLITS['classes_per_split']})"
    )
    cd.add_argument("--seed", type=int, help="with --list: seed of the class draws (default 0)")
    cd.add_argument(
        "--data-root", help="folder the lists' paths are relative to: recorded as 'evl eval --splits' default"
    )
    cd.add_argument("--out-dir", required=True)
    cd.set_defaults(func=_cmd_cross_dataset)


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


# Flags of each way of making a cross-dataset set that the other way does not take.
_DRAW_ONLY = ("exclude_classes", "num_splits", "classes_per_split", "seed")
_PUBLISHED_ONLY = ("split_classes",)


def _cmd_cross_dataset(args: argparse.Namespace) -> int:
    from evl.splits import write_cross_dataset_lists, write_published_splits

    def refuse(names: tuple[str, ...], other: str) -> None:
        given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: not taken with {other}")

    if args.list is not None:
        refuse(_PUBLISHED_ONLY, "--list")
        if args.classes is None:
            raise ValueError("--list needs --classes (the class names its labels index)")
        settings = {k: getattr(args, k) for k in ("num_splits", "classes_per_split", "seed")}
        paths = write_cross_dataset_lists(
            args.list,
            args.classes,
            args.out_dir,
            exclude_classes=args.exclude_classes,
            data_root=args.data_root,
            **{k: v for k, v in settings.items() if v is not None},
        )
    else:
        refuse(_DRAW_ONLY, "--split-lists")
        paths = write_published_splits(
            args.split_lists,
            args.out_dir,
            classes=args.classes,
            split_classes=args.split_classes,
            data_root=args.data_root,
        )
    for path in paths:
        print(path)
    return EXIT_OK


def add_synth_parser(sub: argparse._SubParsersAction) -> None:
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
