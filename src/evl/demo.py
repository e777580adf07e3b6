"""``evl demo``: the whole pipeline offline, on the project's own synthetic videos, in minutes on a CPU.

Synthesize real mp4 files of shapes moving left, right, up or down (a task that single frames cannot
solve) -> train EVL's decoder on a frozen random-init ViT -> evaluate -> plots and a summary.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from evl.engine.evaluate import evaluate, write_evaluation
from evl.engine.run import load_run
from evl.engine.train import train
from evl.io import atomic_write_text
from evl.recipes import build_run_config
from evl.synth import SynthDataset, class_names, flip_label_map, make_dataset
from evl.video.lists import read_list, resolve_path

DEMO_RECIPE = "demo_synth"
TRAIN_PER_CLASS = 160
VAL_PER_CLASS = 16
NUM_FRAMES = 24
SIZE = 112


def write_flip_map(path: Path, task: str = "motion") -> Path:
    """The synthetic task's left<->right swap as the name-based JSON map that training reads."""
    names = class_names(task)
    pairs = {names[a]: names[b] for a, b in flip_label_map(task).items() if a != b}
    atomic_write_text(path, json.dumps(pairs, indent=2) + "\n")
    return path


def make_demo_dataset(root: Path, task: str = "motion", progress: bool = True) -> SynthDataset:
    """The demo's synthetic videos (``task``: motion or shapes) under ``root``: its class counts, frames and
    size, so that other runs on "the demo's data" see exactly the same videos."""
    return make_dataset(
        root,
        task=task,
        num_train_per_class=TRAIN_PER_CLASS,
        num_val_per_class=VAL_PER_CLASS,
        num_frames=NUM_FRAMES,
        size=SIZE,
        workers=2,
        progress=progress,
    )


def run_demo(out_dir: Path, steps: int | None = None, progress: bool = True) -> dict:
    """Synthesize, train, evaluate; returns the summary (metrics, paths) that :func:`format_summary`
    words for a terminal."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = make_demo_dataset(out_dir / "data", progress=progress)
    flags = {
        "data.data_root": str(dataset.root),
        "data.train_list": str(dataset.train_list),
        "data.val_list": str(dataset.val_list),
        "data.classes": str(dataset.classes_file),
        "data.flip_label_map": str(write_flip_map(out_dir / "data" / "flip_label_map.json")),
        "train.steps": steps,
    }
    run = build_run_config(DEMO_RECIPE, **flags)
    warmup = min(run.train.warmup_steps, run.train.steps // 10)  # a shortened demo keeps a short warm-up
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, warmup_steps=warmup))
    run_dir = out_dir / "run"
    train(run, run_dir, progress=progress)

    loaded = load_run(run_dir)
    entries = read_list(run.data.val_list, num_classes=len(loaded.classes), data_root=run.data.data_root)
    evaluation = evaluate(loaded.model, entries, run.data, batch_size=8, progress=progress)
    write_evaluation(evaluation, run_dir / "eval", loaded.classes, run_dir / "eval" / "metrics.json")
    result = evaluation.result
    summary = {
        **result.to_dict(),
        "chance": 100 / len(loaded.classes),
        "steps": run.train.steps,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "run_dir": str(run_dir),
        "num_classes": len(loaded.classes),
        "example_video": str(resolve_path(entries[0], dataset.root)),
    }
    return summary


def format_summary(summary: dict) -> str:
    """The demo's closing lines: accuracy against chance, and where the plots and a next command are."""
    run_dir = Path(summary["run_dir"])
    return (
        f"\nevl demo: top-1 {summary['top1']:.1f}% on {summary['num_videos']} held-out videos "
        f"({summary['num_classes']} motion directions, chance {summary['chance']:.0f}%), "
        f"{summary['wall_time_s']:.0f} s in all.\n"
        f"  loss curve:       {run_dir / 'training_curves.png'}\n"
        f"  confusion matrix: {run_dir / 'eval' / 'confusion_matrix.png'}\n"
        f"  try:              evl predict {run_dir} {summary['example_video']}\n"
        f"  where it looks:   evl explain {run_dir} {summary['example_video']} --out {run_dir / 'explain'}"
    )
