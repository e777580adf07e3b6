"""``evl ensemble``: fuse the score files of several runs (any methods) by a weighted average, the weights
given or searched on a grid as the EVL paper does."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from evl.cli.exits import EXIT_OK

if TYPE_CHECKING:
    from evl.engine.ensemble import Ensemble

# The paper's grid: weights in steps of 0.1.
DEFAULT_SEARCH_STEP = 0.1


def add_ensemble_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ensemble",
        help="fuse the scores.csv of several runs (weighted average; weights given or searched)",
        description="Fuse per-video scores of several runs by a weighted average. The files (scores.csv "
        "of 'evl eval', or its folder) must list the same videos in the same order with the same labels.",
    )
    p.add_argument("scores", nargs="+", metavar="SCORES", help="two or more scores.csv files (or folders)")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--weights",
        type=float,
        nargs="+",
        metavar="W",
        help="one per file, normalised to sum 1 (default: equal)",
    )
    how.add_argument(
        "--search",
        type=float,
        nargs="?",
        const=DEFAULT_SEARCH_STEP,
        metavar="STEP",
        help=f"search the weights maximising top-1 on a grid of STEP (default {DEFAULT_SEARCH_STEP}) over "
        "all weights summing to 1; ties go to the most even weights",
    )
    p.add_argument(
        "--search-on",
        nargs="+",
        metavar="SCORES",
        help="search on these files instead (one per member, same order; e.g. the runs scored on other "
        "videos), then fuse the main files with the weights found; implies --search",
    )
    p.add_argument("--output", required=True, help="folder for the fused scores.csv and metrics.json")
    p.set_defaults(func=_cmd_ensemble)


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from evl.engine.ensemble import ensemble_files, write_ensemble

    if args.search_on and args.weights:
        raise ValueError("--search-on searches the weights: drop --weights")
    step = args.search
    if step is None and args.search_on:
        step = DEFAULT_SEARCH_STEP  # --search-on alone: the paper's grid
    ensemble = ensemble_files(args.scores, weights=args.weights, search_step=step, search_on=args.search_on)
    out_dir = write_ensemble(ensemble, Path(args.output))
    width = max(len(m.file) for m in ensemble.members)
    for m in ensemble.members:
        print(f"{m.file:<{width}}  weight {m.weight:.3f}  top1 {m.result.top1:.2f}  top5 {m.result.top5:.2f}")
    result = ensemble.result
    print(
        f"{'ensemble':<{width}}  top1 {result.top1:.2f}  top5 {result.top5:.2f}  "
        f"mean class {result.mean_class_accuracy:.2f}  ({result.num_videos} videos; {_how(ensemble)})"
    )
    print(f"scores in {out_dir / 'scores.csv'}, metrics in {out_dir / 'metrics.json'}")
    return EXIT_OK


def _how(ensemble: Ensemble) -> str:
    search = ensemble.search
    if search is None:
        return "weights fixed"
    found = f"weights searched at step {search.step:g} on {search.num_videos}"
    if search.optimistic:
        return f"{found} videos, {search.num_shared} of them fused here: optimistic"
    return f"{found} other videos, top1 there {search.top1:.2f}"
