"""What score fusion gains over its members, measured without optimism, on the demo's synthetic videos.

    python benchmarks/ensemble_gain.py --out-dir runs/ensemble_gain [--seeds 0 1 2 3 4 5] [--members 2]

Each seed is one EVL run on the demo's data and schedule (``demo_synth``: 800 steps of 8 clips, frozen
random-init ViT-T/16 at 112 px): the seed draws the backbone's weights and the decoder's, and the run trains
from a feature cache of its backbone (``evl extract``, then ``evl train --features``), which makes a run
about a minute on two cores instead of several (the cache holds one clip per video, so no flip or scale
augmentation). Each run's validation videos are scored as ``evl eval`` does, and the seeds, taken
``--members`` at a time, are fused as ``evl ensemble --search 0.1`` does. The weights are searched on one
half of the validation videos (stratified by class) and the fused accuracy read on the other half, then
the halves swap; the held-out figure pools both halves, so every video is scored by weights chosen
without it. Prints one JSON object and a Markdown table (also OUT_DIR/results.json and results.md). A
seed whose scores exist is not trained again (delete its folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evl.demo import DEMO_RECIPE, make_demo_dataset
from evl.engine.ensemble import ensemble_files
from evl.engine.evaluate import evaluate, write_evaluation
from evl.engine.extract import extract_list
from evl.engine.metrics import EvalResult, read_scores, write_scores
from evl.engine.run import load_run
from evl.engine.train import train
from evl.recipes import build_run_config
from evl.video.lists import read_list

SEARCH_STEP = 0.1  # the paper's grid


def train_and_score(out: Path, data, seed: int) -> tuple[Path, float]:
    """One EVL run on the demo's data; returns its ``scores.csv`` and its seconds (0 if reused)."""
    run_dir = out / f"seed{seed}"
    scores = run_dir / "run" / "eval" / "scores.csv"
    if scores.is_file():
        return scores, 0.0
    tic = time.perf_counter()
    flags = {
        "data.data_root": str(data.root),
        "data.train_list": str(data.train_list),
        "data.val_list": str(data.val_list),
        "data.classes": str(data.classes_file),
        "train.seed": seed,
    }
    run = build_run_config(DEMO_RECIPE, **flags)
    caches = {split: run_dir / f"cache_{split}" for split in ("train", "val")}
    for split, cache in caches.items():
        # Seeded before each list, so that both caches are made by the same random-init backbone.
        torch.manual_seed(seed)
        extract_list(run, split, cache, batch_size=8, progress=False)
    cached = {"data.features": str(caches["train"]), "data.val_features": str(caches["val"])}
    train(build_run_config(DEMO_RECIPE, **flags, **cached), run_dir / "run", progress=False)
    # What `evl eval RUN_DIR` does: the run's validation videos and views, scores.csv + metrics.json.
    loaded = load_run(run_dir / "run")
    entries = read_list(run.data.val_list, num_classes=len(loaded.classes), data_root=run.data.data_root)
    evaluation = evaluate(loaded.model, entries, run.data, batch_size=8, progress=False)
    write_evaluation(evaluation, scores.parent, loaded.classes, scores.parent / "metrics.json")
    for cache in caches.values():  # 0.3 GB a seed, and made again from the seed if ever needed
        shutil.rmtree(cache)
    return scores, time.perf_counter() - tic


def stratified_halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of two halves with each class split evenly (alternating in list order): deterministic."""
    first = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        first[np.flatnonzero(labels == label)[::2]] = True
    return np.flatnonzero(first), np.flatnonzero(~first)


def write_half(scores: Path, rows: np.ndarray, name: str) -> Path:
    full = read_scores(scores)
    path = scores.with_name(f"{name}.csv")
    write_scores(path, [full.paths[i] for i in rows], full.labels[rows], full.scores[rows])
    return path


def held_out_ensemble(files: list[Path], tag: str) -> dict:
    """Weights searched on one half, accuracy read on the other, both ways; pooled over all videos."""
    labels = read_scores(files[0]).labels
    halves = dict(zip("ab", stratified_halves(labels), strict=True))
    split = {h: [write_half(f, rows, f"{tag}_half_{h}") for f in files] for h, rows in halves.items()}
    folds, fused, fused_labels = [], [], []
    for search_half, report_half in (("a", "b"), ("b", "a")):
        ens = ensemble_files(split[report_half], search_step=SEARCH_STEP, search_on=split[search_half])
        assert not ens.search.optimistic  # the halves share no video
        folds.append(
            {
                "searched_on": search_half,
                "weights": list(ens.weights),
                "search_top1": ens.search.top1,
                "held_out_top1": ens.result.top1,
                "members_top1": [m.result.top1 for m in ens.members],
            }
        )
        fused.append(ens.fused.scores)
        fused_labels.append(ens.fused.labels)
    num_classes = fused[0].shape[1]
    pooled = EvalResult.from_scores(np.concatenate(fused), np.concatenate(fused_labels), num_classes)
    return {"held_out": pooled.to_dict(), "folds": folds}


def measure(seeds: list[int], files: list[Path]) -> dict:
    """Members, equal weights, held-out search and (for contrast) the optimistic search on all videos."""
    equal = ensemble_files(files)
    optimistic = ensemble_files(files, search_step=SEARCH_STEP)  # warns: searched on the reported videos
    members = [m.result.top1 for m in equal.members]
    held_out = held_out_ensemble(files, "seeds_" + "_".join(map(str, seeds)))
    return {
        "seeds": seeds,
        "members_top1": members,
        "equal_weights_top1": equal.result.top1,
        "optimistic_top1": optimistic.result.top1,
        "optimistic_weights": list(optimistic.weights),
        **held_out,
        "gain_over_best_member": held_out["held_out"]["top1"] - max(members),
        "gain_over_mean_member": held_out["held_out"]["top1"] - float(np.mean(members)),
    }


def markdown(groups: list[dict]) -> str:
    lines = [
        "| seeds | members' top-1 | equal weights | searched on the other half (held out) | searched on all "
        "(optimistic) | held-out gain over best / mean member |",
        "|---|---|---|---|---|---|",
    ]
    for g in groups:
        members = " / ".join(f"{t:.1f}" for t in g["members_top1"])
        weights = " and ".join("(" + ", ".join(f"{w:.1f}" for w in f["weights"]) + ")" for f in g["folds"])
        lines.append(
            f"| {', '.join(map(str, g['seeds']))} | {members} | {g['equal_weights_top1']:.1f} | "
            f"**{g['held_out']['top1']:.1f}** (weights {weights}) | {g['optimistic_top1']:.1f} | "
            f"{g['gain_over_best_member']:+.1f} / {g['gain_over_mean_member']:+.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/ensemble_gain"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="one run per seed")
    parser.add_argument("--members", type=int, default=2, help="runs per ensemble (consecutive seeds)")
    args = parser.parse_args(argv)
    if args.members < 2 or len(args.seeds) < args.members:
        parser.error("an ensemble needs two or more members, and at least that many seeds")
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = make_demo_dataset(out / "data", progress=False)
    runs = {seed: train_and_score(out, data, seed) for seed in args.seeds}
    groups = []
    for first in range(0, len(args.seeds) - args.members + 1, args.members):
        seeds = args.seeds[first : first + args.members]
        groups.append(measure(seeds, [runs[s][0] for s in seeds]))
    summary = {
        "members": args.members,
        "num_videos": groups[0]["held_out"]["num_videos"],
        "groups": groups,
        "mean_gain_over_best_member": float(np.mean([g["gain_over_best_member"] for g in groups])),
        "mean_gain_over_mean_member": float(np.mean([g["gain_over_mean_member"] for g in groups])),
        "seconds_per_run": {s: round(t, 1) for s, (_, t) in runs.items()},
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    table = markdown(groups)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    print(json.dumps(summary), file=sys.stderr)
    print(table)
    print(
        f"mean held-out gain over {len(groups)} ensembles: {summary['mean_gain_over_best_member']:+.1f} over "
        f"the best member, {summary['mean_gain_over_mean_member']:+.1f} over the mean member "
        f"({summary['num_videos']} videos; {summary['wall_time_s']:.0f} s in all)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
