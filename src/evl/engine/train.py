"""The step-based training loop: AdamW, half-period cosine, gradient accumulation, periodic validation,
atomic checkpoints and exact resumption."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from evl.config import RunConfig
from evl.engine.checkpoint import (
    find_resumable,
    load_checkpoint,
    save_checkpoint,
)
from evl.engine.evaluate import Evaluation, eval_sampling, evaluate
from evl.engine.features import BACKBONE_FILE as CACHE_BACKBONE_FILE
from evl.engine.features import (
    CachedClips,
    FeatureCache,
    collate_cached,
    evaluate_cached,
    to_frame_features,
)
from evl.engine.optim import build_optimizer, build_scheduler
from evl.engine.plots import plot_training_curves
from evl.engine.run import BACKBONE_FILE, build_backbone, model_config_for, pick_device, write_run_files
from evl.engine.train_state import make_train_state, restore_train_state
from evl.models.evl import EVL
from evl.video.dataset import StreamSampler, TrainClips, collate_train
from evl.video.lists import VideoEntry, read_class_names, read_list
from evl.video.transforms import TransformConfig, build_train_transform

_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_loss: float
    evaluation: Evaluation | None


def load_lists(run: RunConfig) -> tuple[list[str], list[VideoEntry], list[VideoEntry]]:
    """Class names, training entries and validation entries, validated against each other."""
    data = run.data
    if data.features:  # the cache carries the training list and the class names
        classes = FeatureCache.open(data.features).meta.classes
        val = read_list(data.val_list, len(classes), data.data_root) if data.val_list else []
        return classes, [], val
    if data.train_list is None:
        raise ValueError("no training list: pass --train-list (or data.train_list in the recipe)")
    classes = read_class_names(data.classes) if data.classes else None
    num_classes = len(classes) if classes else None
    train = read_list(data.train_list, num_classes=num_classes, data_root=data.data_root)
    val = read_list(data.val_list, num_classes=num_classes, data_root=data.data_root) if data.val_list else []
    if classes is None:
        classes = [str(i) for i in range(max(e.label for e in train + val) + 1)]
    return classes, train, val


def read_flip_label_map(run: RunConfig, classes: list[str]) -> dict[int, int] | None:
    """The run's name-based flip map (JSON) as label indices, or None when none is configured."""
    if not run.data.flip_label_map:
        return None
    pairs = json.loads(Path(run.data.flip_label_map).read_text())
    index = {name: i for i, name in enumerate(classes)}
    try:
        return {index[a]: index[b] for a, b in pairs.items()}
    except KeyError as err:
        raise ValueError(f"{run.data.flip_label_map}: unknown class name {err}") from None


def initialise_from(model: EVL, source: str | Path) -> None:
    """Copy another run's decoder (a run directory or checkpoint) into ``model``; a head whose number of
    classes differs stays freshly initialised. Any other mismatch is an error."""
    state = load_checkpoint(source).model_state
    own = model.trainable_state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = sorted(set(own) - set(kept))
    if any(not k.startswith("head.") for k in mismatched):
        raise ValueError(
            f"--init-from {source}: decoder does not match this model ({', '.join(mismatched[:4])}...): "
            "same backbone, decoder depth, temporal modules and frame count are needed"
        )
    model.load_state_dict(kept, strict=False)
    new_head = " (new classifier)" if mismatched else ""
    print(f"initialised {len(kept)} tensors from {source}{new_head}")


def training_data(
    run: RunConfig, model: EVL, classes: list[str], entries: list[VideoEntry]
) -> tuple[Dataset, Callable]:
    """The training stream: augmented clips decoded from videos, or rows of a feature cache."""
    data = run.data
    if data.features:
        return CachedClips(
            FeatureCache.open(data.features), model.blocks, seed=run.train.seed
        ), collate_cached
    transform = build_train_transform(
        TransformConfig.from_backbone(
            model.config.backbone,
            flip=data.flip,
            rand_augment=data.rand_augment,
            train_scale=tuple(data.train_scale),
        ),
        flip_label_map=read_flip_label_map(run, classes),
    )
    dataset = TrainClips(
        entries,
        data.data_root,
        eval_sampling(data),
        transform,
        seed=run.train.seed,
        on_bad_video=data.on_bad_video,
    )
    return dataset, collate_train


def adopt_cached_backbone(cache_dir: str, run_dir: Path) -> None:
    """A cache made with a random-init backbone carries its weights: the run must use the same ones."""
    cached, own = Path(cache_dir) / CACHE_BACKBONE_FILE, run_dir / BACKBONE_FILE
    if cached.is_file() and not own.exists():
        shutil.copyfile(cached, own)


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "auto":
        precision = "bfloat16" if device.type == "cuda" else "float32"
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST[precision])


def _append_metrics(path: Path, rows: list[tuple[int, str, str, float]]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "split", "name", "value"])
        writer.writerows(rows)


def train(
    run: RunConfig,
    run_dir: str | Path,
    resume: str | None = "auto",
    device: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) the run in ``run_dir``; returns the final step, loss and last validation."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    cfg, data = run.train, run.data
    torch.manual_seed(cfg.seed)

    classes, train_entries, val_entries = load_lists(run)
    if data.features:
        adopt_cached_backbone(data.features, run_dir)
    backbone, backbone_name = build_backbone(run, run_dir)
    model_config = model_config_for(run, backbone, len(classes), backbone_name)
    model = EVL(model_config, backbone).to(dev)
    val_cache = FeatureCache.open(data.val_features) if data.val_features else None
    for cache_dir in filter(None, (data.features, data.val_features)):
        FeatureCache.open(cache_dir).check_model(model)
    config_dict = write_run_files(run_dir, run, model_config, classes)

    lr_scale = {"head": cfg.head_lr_scale} if cfg.head_lr_scale != 1.0 else None
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, decay_all=cfg.decay_all, lr_scale=lr_scale)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
    start = 0
    checkpoint_path = find_resumable(run_dir) if resume == "auto" else resume
    if checkpoint_path:
        checkpoint = load_checkpoint(checkpoint_path, expected_config={"model": config_dict["model"]})
        model.load_trainable_state_dict(checkpoint.model_state, source=str(checkpoint.path))
        restore_train_state(checkpoint.train_state, optimizer, scheduler)
        start = checkpoint.step
        print(f"resumed from {checkpoint.path} at step {start}")
    elif cfg.init_from:
        initialise_from(model, cfg.init_from)
    if start >= cfg.steps:
        print(f"{run_dir}: already trained for {start} steps")
        return TrainResult(run_dir, start, float("nan"), None)

    dataset, collate = training_data(run, model, classes, train_entries)
    micro_batch = cfg.batch_size // cfg.batch_split
    loader = DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=StreamSampler(start * cfg.batch_size, (cfg.steps - start) * cfg.batch_size),
        num_workers=data.num_workers,
        collate_fn=collate,
        # Its own generator: creating the iterator must not draw from the global RNG, or a resumed run
        # (which creates it after restoring the RNG state) would see other dropout masks.
        generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=dev.type == "cuda",
        drop_last=False,
    )
    batches = iter(loader)
    metrics_csv = run_dir / "metrics.csv"
    writer = _tensorboard(run_dir)
    evaluation: Evaluation | None = None
    loss_value = float("nan")
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress)
    tic = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(cfg.batch_split):
            batch = next(batches)
            if batch["skipped"]:
                _record_skipped(run_dir, batch["skipped"])
            labels = batch["label"].to(dev, non_blocking=True)
            with autocast_for(cfg.precision, dev):
                if "features" in batch:
                    logits = model.forward_head(to_frame_features(batch["features"], dev))
                else:
                    logits = model(batch["video"].to(dev, non_blocking=True))
            loss = F.cross_entropy(logits.float(), labels) / cfg.batch_split
            loss.backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(
                f"loss became {loss_sum} at step {step}; "
                f"the last good checkpoint is kept in {run_dir}/checkpoints"
            )
        optimizer.step()
        scheduler.step()
        loss_value = loss_sum
        lr = optimizer.param_groups[0]["lr"]
        rows = [(step, "train", "loss", loss_value), (step, "train", "lr", lr)]
        if step % cfg.log_every == 0 or step == cfg.steps:
            clips_per_s = cfg.batch_size * (step - start) / (time.perf_counter() - tic)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", clips_s=f"{clips_per_s:.1f}")
            rows.append((step, "train", "clips_per_s", clips_per_s))
        if (val_entries or val_cache) and (step % cfg.eval_every == 0 or step == cfg.steps):
            if val_cache is not None:
                evaluation = evaluate_cached(model, val_cache, batch_size=micro_batch, progress=progress)
            else:
                evaluation = evaluate(
                    model, val_entries, data, batch_size=max(1, micro_batch // 2), progress=progress
                )
            result = evaluation.result
            rows += [(step, "val", k, v) for k, v in result.to_dict().items() if isinstance(v, float)]
            bar.write(
                f"step {step}: val top1 {result.top1:.2f} top5 {result.top5:.2f} ({result.num_videos} videos)"
            )
        _append_metrics(metrics_csv, rows)
        for _, split, name, value in rows:
            writer.add_scalar(f"{split}/{name}", value, step)
        if step % cfg.save_every == 0 or step == cfg.steps:
            train_state = make_train_state(optimizer, scheduler, data={"position": step * cfg.batch_size})
            save_checkpoint(
                run_dir, step, model.trainable_state_dict(), train_state, config_dict, cfg.keep_last
            )
        bar.update(1)
    bar.close()
    writer.close()
    plot_training_curves(metrics_csv, run_dir / "training_curves.png")
    return TrainResult(run_dir, cfg.steps, loss_value, evaluation)


def _record_skipped(run_dir: Path, skipped: list) -> None:
    with (run_dir / "skipped_videos.txt").open("a") as f:
        for s in skipped:
            f.write(f"{s.path}\t{s.reason}\n")
    for s in skipped:
        tqdm.write(f"warning: skipped undecodable video ({s.reason})")


class _NoWriter:
    def add_scalar(self, *args, **kwargs) -> None:
        return None

    def close(self) -> None:
        return None


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a trimmed install should still train
        print("tensorboard is not installed: logging to metrics.csv only")
        return _NoWriter()
    return SummaryWriter(str(run_dir / "tb"))
