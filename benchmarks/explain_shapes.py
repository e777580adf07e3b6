"""Does a trained EVL look at the moving shape? The demo's run explained over its held-out videos.

    python benchmarks/explain_shapes.py --out-dir runs/explain [--run runs/demo/run] [--docs docs/img]

Without ``--run`` it trains the demo first (``evl demo``'s data, recipe and 800 steps: about 5 min on two
CPU cores). For every held-out video it runs ``evl explain``'s engine on the view evaluation takes and
measures, per decoder layer, the share of the query's attention within each frame that falls on the patches
the shape covers in that frame (the synthetic videos are regenerated from their seeds, so where the shape
is is known exactly), against the share of the frame those patches are, and against the patches the shape
covers at the mirrored time (a region fixed in the frame would score the same on both). Writes
``results.md`` / ``results.json`` and the pictures of one correctly classified video into OUT_DIR/pictures
(``--docs DIR`` also copies the last layer's and the cross-frame picture there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import evl
from evl.demo import NUM_FRAMES, SIZE, run_demo
from evl.engine.explain import explanation_views, save_explanation
from evl.engine.run import read_run_config
from evl.synth import class_names, clip_rng, sample_spec, shape_coverage
from evl.video.lists import read_list, resolve_path
from evl.video.sampling import temporal_views

SEED = 0  # the demo's dataset seed (evl.synth.make_dataset's default)
ON_SHAPE = 0.25  # a patch is on the shape when the shape covers at least this much of it


def patch_coverage(
    path: str, label: int, indices: np.ndarray, patch: int, task: str = "motion"
) -> torch.Tensor:
    """Where the shape is in the sampled frames of a demo video: coverage of each patch [T, rows, cols]."""
    split, index = Path(path).parts[-3], int(Path(path).stem)
    spec = sample_spec(task, label, NUM_FRAMES, clip_rng(SEED, split, label, index))
    cover = torch.from_numpy(shape_coverage(spec, NUM_FRAMES, SIZE)[indices]).float()  # [T, H, W]
    grid = SIZE // patch
    return cover.view(len(indices), grid, patch, grid, patch).mean(dim=(2, 4))


def measure(run_dir: Path) -> tuple[list[dict], dict]:
    """Per layer: the query's attention on the shape (own time, mirrored time) and the shape's share; and
    the first correctly classified video, for the pictures."""
    predictor = evl.load(run_dir)
    run, _ = read_run_config(run_dir)
    entries = read_list(run.data.val_list, data_root=run.data.data_root)
    views = explanation_views(predictor)
    vision = predictor.model.vision_config
    if vision.image_size != SIZE:
        raise SystemExit(f"{run_dir}: expected a run on the demo's {SIZE}px videos")
    own, mirrored, shares, peaks, correct, example = [], [], [], [], 0, None
    for entry in entries:
        path = resolve_path(entry, run.data.data_root)
        indices = temporal_views(views.sampling, NUM_FRAMES, None)[0]  # the frames the view holds
        on_shape = (patch_coverage(entry.path, entry.label, indices, vision.patch_size) > ON_SHAPE).float()
        explanation = predictor.explain(path)
        patches = explanation.attention.query_patches()[0]  # [M, T, rows, cols]
        per_frame = patches / patches.sum(dim=(-2, -1), keepdim=True)
        own.append((per_frame * on_shape).sum(dim=(-2, -1)).mean(dim=1))  # [M]
        mirrored.append((per_frame * on_shape.flip(0)).sum(dim=(-2, -1)).mean(dim=1))
        shares.append(on_shape.mean())
        peak = per_frame.flatten(-2).argmax(dim=-1)  # [M, T]
        peaks.append(on_shape.flatten(-2).gather(-1, peak.t()).t().mean(dim=1))  # [M]
        hit = explanation.top(1)[0] == entry.label
        correct += hit
        if hit and example is None:
            example = {"path": str(path), "explanation": explanation}
    own_t, mirrored_t, peaks_t = (torch.stack(x) for x in (own, mirrored, peaks))  # [N, M]
    share = float(torch.stack(shares).mean())
    rows = [
        {
            "layer": m,
            "block": predictor.model.blocks[m],
            "attention_on_shape": round(float(own_t[:, m].mean()), 4),
            "attention_on_shape_mirrored_time": round(float(mirrored_t[:, m].mean()), 4),
            "shape_share_of_frame": round(share, 4),
            "peak_on_shape": round(float(peaks_t[:, m].mean()), 4),
        }
        for m in range(own_t.shape[1])
    ]
    summary = {"videos": len(entries), "top1_of_the_view": round(100 * correct / len(entries), 1)}
    return rows, {**summary, "example": example}


def markdown(rows: list[dict], summary: dict) -> str:
    lines = [
        f"{summary['videos']} held-out videos; top-1 of the explained view {summary['top1_of_the_view']}%",
        "",
        "| decoder layer (block) | attention on the shape | on the shape at mirrored time | shape's share "
        "of the frame | most attended patch on the shape |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} ({r['block']}) | {100 * r['attention_on_shape']:.1f}% | "
            f"{100 * r['attention_on_shape_mirrored_time']:.1f}% | {100 * r['shape_share_of_frame']:.1f}% | "
            f"{100 * r['peak_on_shape']:.0f}% of frames |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/explain"))
    parser.add_argument("--run", type=Path, help="a trained demo run (default: train one into OUT_DIR/demo)")
    parser.add_argument("--steps", type=int, help="demo training steps when training (default: the demo's)")
    parser.add_argument("--docs", type=Path, help="also copy the README pictures into this folder")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the pictures")
    args = parser.parse_args(argv)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    run_dir = args.run
    if run_dir is None:
        run_dir = Path(run_demo(out / "demo", steps=args.steps, progress=False)["run_dir"])
    rows, summary = measure(run_dir)
    example = summary.pop("example")
    table = markdown(rows, summary)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({**summary, "layers": rows}, indent=2) + "\n")
    print(table)
    if example is not None:
        written = save_explanation(example["explanation"], out / "pictures", dpi=args.dpi)
        print(f"pictures of {example['path']} ({class_names('motion')[example['explanation'].top(1)[0]]}):")
        for path in written:
            print(f"  {path}")
        if args.docs is not None:
            args.docs.mkdir(parents=True, exist_ok=True)
            last = sorted(p for p in written if p.name.startswith("attention_layer"))[-1]
            shutil.copyfile(last, args.docs / "explain_attention.png")
            shutil.copyfile(out / "pictures" / "cross_frame.png", args.docs / "explain_cross_frame.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
