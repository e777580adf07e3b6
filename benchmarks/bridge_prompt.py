"""ViFi-CLIP's "bridge and prompt" on the project's synthetic videos: does a bridge help a K-shot task?

    python benchmarks/bridge_prompt.py --out-dir runs/bridge_prompt [--shots 8] [--steps 200] \
        [--bridge-steps 800] [--prompt-lr 8e-3]
    python benchmarks/bridge_prompt.py --out-dir runs/bridge_prompt --bridge-run runs/compare/shapes/vifi
    python benchmarks/bridge_prompt.py --out-dir runs/bridge_prompt --task shapes   # the bridge's classes

1. Bridge: a ViFi-CLIP run (``vifi``, both towers fine-tuned) on the demo's ``shapes`` task (which shape
   moves), from the random CLIP that benchmarks/compare_methods.py uses; ``--bridge-run DIR`` reuses a
   ViFi-CLIP run instead (compare_methods' ``shapes/vifi`` is one).
2. A K-shot training list of the ``mixed`` task (12 classes, shape and direction: ``circle_left`` ...), or
   with ``--task shapes`` of the bridge's own classes on other videos (``--data-seed``), with the demo's
   frames and size, and its validation list (``--val-per-class``, default 8).
3. On that list, the same steps, batch and data settings (the demo's recipe) for:
   * ViFi alone: ``vifi`` from the same random CLIP (both towers fine-tuned on the K shots);
   * bridge + prompt: ``vifi_prompt`` from the bridge, with the few-shot recipe's tokens and depths (the
     depths clipped to the tiny model's layers) and ``--prompt-lr``: only the prompt vectors train;
   * the bridge zero-shot: ``evl eval BRIDGE --classes`` the K-shot task's class names, nothing trained.

Nothing is pretrained: the text tower has met only the bridge's three shape names, so on the mixed task
zero-shot can hardly do better than tell the shape (25% top-1 with the direction a guess; chance is 8.3%).
``--text-tokens 4`` starts the text context from the bridge's own prompt ("a photo of a"). Writes
OUT_DIR/results.md (a Markdown table) and results.json; a finished run is not repeated (delete its folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from compare_methods import LEARNING_RATES, write_clip, write_results

from evl.cli import main as evl
from evl.demo import DEMO_RECIPE, NUM_FRAMES, SIZE, make_demo_dataset, write_flip_map
from evl.engine.run import BACKBONE_FILE, load_run
from evl.recipes import build_run_config
from evl.synth import SynthDataset, make_dataset

FEW_SHOT_RECIPE = "vifi_prompt_few_shot_b16_32f"  # the bridge-and-prompt tokens, depths and lr
BATCH = build_run_config(DEMO_RECIPE).train.batch_size
DESCRIPTION = {
    "vifi": ("ViFi alone", "both CLIP encoders, from random CLIP"),
    "vifi_prompt": ("bridge + prompt", "deep prompts only, on the bridge's frozen towers"),
    "zeroshot_bridge": ("bridge zero-shot", "nothing: the bridge with the K-shot task's class names"),
}


def data_flags(data: SynthDataset, flip_map: Path) -> list[str]:
    return [
        "--data-root", str(data.root), "--train-list", str(data.train_list), "--val-list", str(data.val_list),
        "--classes", str(data.classes_file), "--set", f"data.flip_label_map={flip_map}",
    ]  # fmt: skip


def schedule_flags(steps: int, lr: float) -> list[str]:
    """``steps`` with the demo's warm-up, shortened for short runs as the demo does."""
    warmup = min(build_run_config(DEMO_RECIPE).train.warmup_steps, steps // 10)
    return [
        "--steps", str(steps), "--warmup-steps", str(warmup), "--eval-every", str(steps),
        "--save-every", str(steps), "--lr", str(lr),
    ]  # fmt: skip


def train_run(run_dir: Path, args: list[str]) -> float:
    """``evl train`` into ``run_dir``; the seconds it took."""
    tic = time.perf_counter()
    if evl(["train", "--config", DEMO_RECIPE, *args, "--output-dir", str(run_dir), "--quiet"]) != 0:
        raise SystemExit(f"evl train into {run_dir} failed")
    return time.perf_counter() - tic


def evaluate_run(run_dir: Path, out: Path, *extra: str) -> dict:
    """``evl eval`` of a run (on its validation list unless ``extra`` says otherwise)."""
    metrics = out / "metrics.json"
    if evl(["eval", str(run_dir), "--output", str(metrics), "--quiet", "--batch-size", "8", *extra]) != 0:
        raise SystemExit(f"evl eval of {run_dir} failed")
    return json.loads(metrics.read_text())


def trained_parameters(run_dir: Path) -> int:
    """How many numbers the run's checkpoints hold: what training changed."""
    return sum(v.numel() for v in load_run(run_dir, device="cpu").model.trainable_state_dict().values())


def make_bridge(out: Path, clip: Path, steps: int) -> Path:
    """A ViFi-CLIP run on the demo's shapes task, trained ``steps`` steps from ``clip``."""
    run_dir = out / "bridge"
    data = make_demo_dataset(out / "shapes" / "data", task="shapes", progress=False)
    flip_map = write_flip_map(out / "shapes" / "data" / "flip_label_map.json", "shapes")
    args = ["--method", "vifi", "--backbone", str(clip), *data_flags(data, flip_map)]
    train_run(run_dir, [*args, *schedule_flags(steps, LEARNING_RATES["vifi"])])
    return run_dir


def bridge_clip(bridge: Path, out: Path) -> Path:
    """The CLIP file the bridge started from, where ViFi alone starts too: its weights file, or the random
    CLIP saved in it; else the shared random one."""
    name = json.loads((bridge / "config.json").read_text())["run"]["backbone"]["name"]
    if Path(name).is_file():
        return Path(name)
    saved = bridge / BACKBONE_FILE
    if name.startswith("random:") and saved.is_file():
        return saved
    return write_clip(out / "clip_random_t16_112.safetensors")


def prompt_settings(bridge: Path, text_tokens: int | None = None) -> list[str]:
    """The few-shot recipe's prompt tokens and depths, the depths clipped to the bridge's layers;
    ``text_tokens`` replaces the recipe's text token count."""
    method = build_run_config(FEW_SHOT_RECIPE).method
    model = json.loads((bridge / "config.json").read_text())["model"]
    settings = {
        "prompt_vision_tokens": method.prompt_vision_tokens,
        "prompt_text_tokens": method.prompt_text_tokens if text_tokens is None else text_tokens,
        "prompt_vision_depth": min(method.prompt_vision_depth, model["vision"]["layers"]),
        "prompt_text_depth": min(method.prompt_text_depth, model["text"]["layers"]),
    }
    return [arg for key, value in settings.items() for arg in ("--set", f"method.{key}={value}")]


def run_case(
    case: str,
    out: Path,
    data: SynthDataset,
    flip_map: Path,
    bridge: Path,
    clip: Path,
    steps: int,
    lr: float,
    text_tokens: int | None = None,
) -> dict:
    """One row of the table: a K-shot run (``vifi``, ``vifi_prompt``) or the bridge zero-shot."""
    run_dir = out / case
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    if case == "zeroshot_bridge":
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = evaluate_run(
            bridge, run_dir, "--classes", str(data.classes_file), "--val-list", str(data.val_list),
            "--data-root", str(data.root), "--out-dir", str(run_dir / "eval"),
        )  # fmt: skip
        trained = {"steps": 0, "lr": None, "trained_parameters": 0, "train_s": None, "s_per_step": None}
    else:
        start = (
            ["--backbone", str(clip)]
            if case == "vifi"
            else ["--backbone", str(bridge), *prompt_settings(bridge, text_tokens)]
        )
        train_s = train_run(
            run_dir, ["--method", case, *start, *data_flags(data, flip_map), *schedule_flags(steps, lr)]
        )
        trained = {
            "steps": steps,
            "lr": lr,
            "trained_parameters": trained_parameters(run_dir),
            "train_s": round(train_s, 1),
            "s_per_step": round(train_s / steps, 3),
        }
        metrics = evaluate_run(run_dir, run_dir)
    result = {
        "case": case,
        **metrics,
        "task": data.task,
        "chance": 100 / len(data.classes),
        "batch_size": BATCH,
        **trained,
        "bridge": str(bridge),
    }
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(results: list[dict], shots: int) -> str:
    task = results[0].get("task", "mixed")
    lines = [
        f"| run | what trains | {task} top-1 ({shots}-shot) | steps x batch | lr | trained params | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name, what = DESCRIPTION[r["case"]]
        steps = f"{r['steps']} x {r['batch_size']}" if r["steps"] else "none"
        lr = f"{r['lr']:g}" if r["lr"] else "-"
        speed = f"{r['s_per_step']:.2f}" if r["s_per_step"] else "-"
        lines.append(
            f"| {name} | {what} | {r['top1']:.1f} | {steps} | {lr} | {r['trained_parameters']:,} | {speed} |"
        )
    lines.append(f"\nChance: {results[0]['chance']:.1f}. Bridge: {results[0]['bridge']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bridge_prompt"))
    parser.add_argument("--shots", type=int, default=8, help="training videos per class of the K-shot task")
    parser.add_argument("--val-per-class", type=int, default=8, help="validation videos per class")
    parser.add_argument(
        "--text-tokens",
        type=int,
        help="text context tokens of bridge + prompt (default: the few-shot recipe's 10; at most 4 start "
        "from the bridge's own 'a photo of a')",
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=1,
        help="seed of the K-shot videos (the bridge's, the demo's, are seed 0: 1 gives other videos)",
    )
    parser.add_argument(
        "--task",
        choices=("mixed", "shapes"),
        default="mixed",
        help="the K-shot task: mixed (new classes) or shapes (the bridge's classes, on new videos)",
    )
    parser.add_argument("--steps", type=int, default=200, help="steps of each K-shot run")
    parser.add_argument("--bridge-steps", type=int, default=800, help="steps of the bridge (vifi on shapes)")
    parser.add_argument("--bridge-run", type=Path, help="a ViFi-CLIP run to use as the bridge instead")
    parser.add_argument(
        "--prompt-lr",
        type=float,
        default=build_run_config(FEW_SHOT_RECIPE).train.lr,
        help="bridge + prompt learning rate (default: the few-shot recipe's)",
    )
    args = parser.parse_args(argv)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if args.bridge_run is not None:
        bridge = args.bridge_run
    else:
        bridge = make_bridge(out, write_clip(out / "clip_random_t16_112.safetensors"), args.bridge_steps)
    clip = bridge_clip(bridge, out)

    root = out / f"{args.task}_{args.shots}shot"
    data = make_dataset(
        root / "data",
        task=args.task,
        seed=args.data_seed,
        num_train_per_class=args.shots,
        num_val_per_class=args.val_per_class,
        num_frames=NUM_FRAMES,
        size=SIZE,
        workers=2,
        progress=False,
    )
    flip_map = write_flip_map(root / "data" / "flip_label_map.json", args.task)
    lrs = {"vifi": LEARNING_RATES["vifi"], "vifi_prompt": args.prompt_lr, "zeroshot_bridge": None}
    results = []
    for case, lr in lrs.items():
        result = run_case(case, root, data, flip_map, bridge, clip, args.steps, lr, args.text_tokens)
        print(json.dumps(result), file=sys.stderr)
        results.append(result)
    write_results(out, markdown(results, args.shots), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
