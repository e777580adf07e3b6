"""The four methods on the project's synthetic videos: same data, frames, views, steps and batch.

    python benchmarks/compare_methods.py --out-dir runs/compare [--steps 800] [--tasks motion shapes]
    python benchmarks/compare_methods.py --out-dir runs/compare --methods vifi xclip --augment

Two synthetic tasks: ``motion`` (which way a shape moves: no single frame tells) and ``shapes`` (which
shape moves: any frame tells). Every method starts from the same random-init CLIP (ViT-T/16 at 112 px and
its text tower: nothing is pretrained, so zero-shot CLIP is at chance by construction) and is trained
through ``evl train`` with the demo's data settings. Prints one JSON line per run and a Markdown table at
the end (also OUT_DIR/results.md and results.json). A finished run is not repeated (delete its folder).
``--augment`` trains with the X-CLIP / ViFi-CLIP references' pipeline (:data:`AUGMENT`) into ``METHOD+aug``
folders, and the table puts those runs beside the plain ones already in OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from evl.cli import main as evl
from evl.demo import make_demo_dataset, write_flip_map
from evl.models.registry import clip_state_dict, create_clip

METHODS = ("evl", "vifi", "xclip", "zeroshot")
# Each method's own learning rate for a model trained from random weights (all else is shared):
# EVL trains only a decoder; ViFi-CLIP and X-CLIP fine-tune whole encoders (X-CLIP's new modules at 10x).
LEARNING_RATES = {"evl": 1e-3, "vifi": 1e-4, "xclip": 1e-4}
# The X-CLIP and ViFi-CLIP references' training pipeline (their recipes in this project turn it on).
AUGMENT = [
    "--multi-scale-crop", "1,0.875,0.75,0.66", "--color-jitter", "0.8", "--grayscale", "0.2",
    "--mixup", "0.8", "--cutmix", "1.0", "--label-smoothing", "0.1",
]  # fmt: skip
DESCRIPTION = {
    "evl": "EVL: frozen image encoder, decoder + linear head",
    "vifi": "ViFi-CLIP: both encoders fine-tuned, frames averaged",
    "xclip": "X-CLIP: cross-frame messages, MIT, video prompts",
    "zeroshot": "zero-shot CLIP: nothing trained",
}


def write_clip(path: Path, seed: int = 0) -> Path:
    """One random CLIP (both towers) that every method starts from."""
    import torch
    from safetensors.torch import save_file

    if not path.is_file():
        torch.manual_seed(seed)
        save_file(clip_state_dict(create_clip("random:ViT-T/16@112")), str(path))
    return path


def run_method(
    method: str, out_dir: Path, data, flip_map: Path, clip: Path, steps: int, augment: bool = False
) -> dict:
    run_dir = out_dir / data.task / (f"{method}+aug" if augment else method)
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    args = [
        "train", "--config", "demo_synth", "--method", method, "--backbone", str(clip),
        "--data-root", str(data.root), "--train-list", str(data.train_list), "--val-list", str(data.val_list),
        "--classes", str(data.classes_file), "--set", f"data.flip_label_map={flip_map}",
        "--steps", str(steps), "--eval-every", str(steps), "--save-every", str(steps),
        "--output-dir", str(run_dir), "--quiet",
    ]  # fmt: skip
    if method in LEARNING_RATES:
        args += ["--lr", str(LEARNING_RATES[method])]
    if augment:
        args += AUGMENT
    tic = time.perf_counter()
    if evl(args) != 0:
        raise SystemExit(f"evl train --method {method} failed")
    train_s = time.perf_counter() - tic
    metrics = run_dir / "metrics.json"
    if evl(["eval", str(run_dir), "--output", str(metrics), "--quiet", "--batch-size", "8"]) != 0:
        raise SystemExit(f"evl eval of {run_dir} failed")
    result = {
        "task": data.task,
        "method": method,
        "augment": augment,
        **json.loads(metrics.read_text()),
        "steps": 0 if method == "zeroshot" else steps,
        "lr": LEARNING_RATES.get(method),
        "train_s": round(train_s, 1),
        "s_per_step": round(train_s / steps, 3) if method != "zeroshot" else None,
    }
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(results: list[dict], tasks: list[str]) -> str:
    by_key = {(r["task"], r["method"], r.get("augment", False)): r for r in results}
    methods = sorted(
        dict.fromkeys((r["method"], r.get("augment", False)) for r in results),
        key=lambda m: (METHODS.index(m[0]), m[1]),
    )
    head = " | ".join(f"{t} top-1" for t in tasks)
    lines = [
        f"| method | what trains | {head} | steps x batch | lr | s/step |",
        "|---" * (5 + len(tasks)) + "|",
    ]
    for method, augment in methods:
        runs = [by_key.get((t, method, augment)) for t in tasks]
        first = next(r for r in runs if r)
        accuracy = " | ".join(f"{r['top1']:.1f}" if r else "-" for r in runs)
        steps = f"{first['steps']} x 8" if first["steps"] else "none"
        lr = f"{first['lr']:g}" if first["lr"] else "-"
        speed = f"{first['s_per_step']:.2f}" if first["s_per_step"] else "-"
        name, what = (
            (f"{method} + aug", "the same, with the references' augmentation")
            if augment
            else (
                method,
                DESCRIPTION[method],
            )
        )
        lines.append(f"| {name} | {what} | {accuracy} | {steps} | {lr} | {speed} |")
    return "\n".join(lines)


def write_results(out: Path, table: str, results: list[dict]) -> None:
    """OUT/results.md (the table) and OUT/results.json (every run's numbers); the table is printed too."""
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/compare"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--tasks", nargs="+", choices=("motion", "shapes"), default=["motion", "shapes"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--augment", action="store_true", help="train with the references' augmentation")
    args = parser.parse_args(argv)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    clip = write_clip(out / "clip_random_t16_112.safetensors")
    results = []
    for task in args.tasks:
        data = make_demo_dataset(out / task / "data", task=task, progress=False)
        flip_map = write_flip_map(out / task / "data" / "flip_label_map.json", task)
        for method in args.methods:
            if args.augment and method == "zeroshot":
                continue  # nothing trains
            result = run_method(method, out, data, flip_map, clip, args.steps, args.augment)
            print(json.dumps(result), file=sys.stderr)
    results = [json.loads(f.read_text()) for f in sorted(out.glob("*/*/result.json"))]
    results = [r for r in results if r["task"] in args.tasks]
    write_results(out, markdown(results, args.tasks), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
