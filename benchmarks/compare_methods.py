"""The four methods on the project's synthetic videos: same data, frames, views, steps and batch.

    python benchmarks/compare_methods.py --out-dir runs/compare [--steps 800] [--methods evl vifi ...]

Every method starts from the same random-init CLIP (ViT-T/16 at 112 px and its text tower: nothing is
pretrained, so zero-shot CLIP is at chance by construction) and is trained through ``evl train`` with the
demo's data settings. Prints one JSON line per method and a Markdown table at the end (also written to
OUT_DIR/results.md and results.json). A finished method is not run again (delete its folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from evl.cli import main as evl
from evl.demo import NUM_FRAMES, SIZE, TRAIN_PER_CLASS, VAL_PER_CLASS, write_flip_map
from evl.models.registry import clip_state_dict, create_clip
from evl.synth import make_dataset

METHODS = ("evl", "vifi", "xclip", "zeroshot")
# Each method's own learning rate for a model trained from random weights (all else is shared):
# EVL trains only a decoder; ViFi-CLIP and X-CLIP fine-tune whole encoders (X-CLIP's new modules at 10x).
LEARNING_RATES = {"evl": 1e-3, "vifi": 1e-4, "xclip": 1e-4}
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


def run_method(method: str, out_dir: Path, data, flip_map: Path, clip: Path, steps: int) -> dict:
    run_dir = out_dir / method
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
    tic = time.perf_counter()
    if evl(args) != 0:
        raise SystemExit(f"evl train --method {method} failed")
    train_s = time.perf_counter() - tic
    metrics = run_dir / "metrics.json"
    if evl(["eval", str(run_dir), "--output", str(metrics), "--quiet", "--batch-size", "8"]) != 0:
        raise SystemExit(f"evl eval of {run_dir} failed")
    result = {
        "method": method,
        **json.loads(metrics.read_text()),
        "steps": 0 if method == "zeroshot" else steps,
        "lr": LEARNING_RATES.get(method),
        "train_s": round(train_s, 1),
        "s_per_step": round(train_s / steps, 3) if method != "zeroshot" else None,
    }
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(results: list[dict]) -> str:
    lines = [
        "| method | what trains | top-1 | top-5 | steps x batch | lr | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        steps = f"{r['steps']} x 8" if r["steps"] else "none"
        lr = f"{r['lr']:g}" if r["lr"] else "-"
        time_s = f"{r['train_s']:.0f} s" if r["steps"] else "-"
        lines.append(
            f"| {r['method']} | {DESCRIPTION[r['method']]} | {r['top1']:.1f} | {r['top5']:.1f} | {steps} | "
            f"{lr} | {time_s} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/compare"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args(argv)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    data = make_dataset(
        out / "data",
        task="motion",
        num_train_per_class=TRAIN_PER_CLASS,
        num_val_per_class=VAL_PER_CLASS,
        num_frames=NUM_FRAMES,
        size=SIZE,
        workers=2,
        progress=False,
    )
    flip_map = write_flip_map(out / "data" / "flip_label_map.json")
    clip = write_clip(out / "clip_random_t16_112.safetensors")
    results = []
    for method in args.methods:
        result = run_method(method, out, data, flip_map, clip, args.steps)
        print(json.dumps(result), file=sys.stderr)
        results.append(result)
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
