"""The step-based training loop: AdamW, half-period cosine, gradient accumulation, periodic validation,
atomic checkpoints and exact resumption."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from evl.config import DataConfig, RunConfig, SettingError
from evl.devices import configure_device, pick_device, resolve_precision
from evl.engine.cached_data import CachedClips, collate_cached, to_frame_features
from evl.engine.cached_eval import evaluate_cached
from evl.engine.checkpoint import find_resumable, load_checkpoint, save_checkpoint
from evl.engine.distributed import (
    DistEnv,
    all_gather_objects,
    barrier,
    device_for,
    init_distributed,
    mean_over_processes,
    rank_seed,
    shutdown,
    wrap_ddp,
)
from evl.engine.evaluate import Evaluation, entry_labels, evaluate
from evl.engine.feature_cache import BACKBONE_FILE as CACHE_BACKBONE_FILE
from evl.engine.feature_cache import FeatureCache
from evl.engine.loading import loader_options
from evl.engine.methods import (
    BACKBONE_FILE,
    build_method_optimizer,
    build_model,
    has_trainable_parameters,
    method_spec,
)
from evl.engine.optim import allocate_adamw_state, build_scheduler
from evl.engine.plots import plot_training_curves
from evl.engine.run import write_run_files
from evl.engine.step import TrainStep
from evl.engine.train_state import make_train_state, restore_train_state
from evl.io import atomic_write_text
from evl.video.dataset import StreamSampler, TrainClips, collate_train
from evl.video.lists import VideoEntry, read_class_names, read_list
from evl.video.mixing import BatchMixing
from evl.video.sampling import SamplingConfig
from evl.video.transforms import TransformConfig, build_train_transform

# Without data.classes, labels 0..max are the classes; a larger maximum is almost surely a malformed list.
MAX_UNNAMED_CLASSES = 100_000

# The engine reports through logging and never prints: the CLI decides where messages go (see
# ``evl.cli``); a library user without a handler still sees warnings (Python's last-resort handler).
log = logging.getLogger(__name__)


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
    spec = method_spec(run.method.name)
    if data.train_list is None and spec.trains:
        raise SettingError("data.train_list", "no training list: set data.train_list")
    if spec.reads_text and not data.classes:
        raise SettingError(
            "data.classes",
            f"method {run.method.name} matches videos against class names: set data.classes "
            "(a classes.txt with one name per line, or a JSON list)",
        )
    if data.train_list is None:  # zero-shot: the class file and an optional validation list
        classes = read_class_names(data.classes)
        val = read_list(data.val_list, len(classes), data.data_root) if data.val_list else []
        return classes, [], val
    classes = read_class_names(data.classes) if data.classes else None
    num_classes = len(classes) if classes else None
    train = read_list(data.train_list, num_classes=num_classes, data_root=data.data_root)
    val = read_list(data.val_list, num_classes=num_classes, data_root=data.data_root) if data.val_list else []
    if classes is None:
        top = max(train + val, key=lambda e: e.label)
        if top.label >= MAX_UNNAMED_CLASSES:
            source = data.train_list if top in train else data.val_list
            raise SettingError(
                "data.classes",
                f"{source}:{top.line}: label {top.label} without a class list; "
                "set data.classes (labels are read as 0..num_classes-1)",
            )
        classes = [str(i) for i in range(top.label + 1)]
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


def initialise_from(model: torch.nn.Module, source: str | Path) -> None:
    """Copy another run's trained weights (a run directory or checkpoint) into ``model``; an EVL head whose
    number of classes differs stays freshly initialised. Any other mismatch is an error."""
    state = load_checkpoint(source).model_state
    own = model.trainable_state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = sorted(set(own) - set(kept))
    if any(not k.startswith("head.") for k in mismatched):
        raise SettingError(
            "train.init_from",
            f"train.init_from {source}: its weights do not match this model "
            f"({', '.join(mismatched[:4])}...): "
            "the same method, backbone, decoder depth, temporal modules and frame count are needed",
        )
    model.load_state_dict(kept, strict=False)
    new_head = " (new classifier)" if mismatched else ""
    log.info("initialised %d tensors from %s%s", len(kept), source, new_head)


def training_data(
    run: RunConfig,
    model: torch.nn.Module,
    classes: list[str],
    entries: list[VideoEntry],
    cache: FeatureCache | None = None,
) -> tuple[Dataset, Callable]:
    """The training stream: augmented clips decoded from videos, or rows of a feature ``cache``."""
    data = run.data
    if cache is not None:
        return CachedClips(cache, model.blocks, seed=run.train.seed), collate_cached
    transform = build_train_transform(
        TransformConfig.from_backbone(
            model.vision_config,
            flip=data.flip,
            rand_augment=data.rand_augment,
            train_scale=tuple(data.train_scale),
            multi_scale_crop=data.multi_scale_crop,
            color_jitter=data.color_jitter,
            color_jitter_strength=data.color_jitter_strength,
            grayscale=data.grayscale,
        ),
        flip_label_map=read_flip_label_map(run, classes),
    )
    dataset = TrainClips(
        entries,
        data.data_root,
        SamplingConfig.from_data(data),
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
    method_spec(run.method.name)  # an unknown method fails before anything is created
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    requested = pick_device(device)
    env = init_distributed(requested)
    try:
        return _train(run, run_dir, resume, device_for(env, requested), progress and env.is_main, env)
    finally:
        shutdown(env)


def _train(
    run: RunConfig, run_dir: Path, resume: str | None, dev: torch.device, progress: bool, env: DistEnv
) -> TrainResult:
    cfg, data = run.train, run.data
    if cfg.batch_size % (cfg.batch_split * env.world_size):
        raise ValueError(
            f"train.batch_size {cfg.batch_size} is not divisible by batch_split x processes "
            f"({cfg.batch_split} x {env.world_size})"
        )
    torch.manual_seed(cfg.seed)

    spec = method_spec(run.method.name)
    if data.features and not spec.trains_from_features:
        raise SettingError(
            "data.features",
            f"data.features: feature caches hold what EVL's decoder reads; method {run.method.name} "
            "trains on videos",
        )
    mixing = BatchMixing.from_config(cfg)
    if mixing is not None and data.features:
        raise SettingError(
            "train.mixup",
            "train.mixup and train.cutmix mix the pixels of clips, which a feature cache (data.features) "
            "does not hold: set both to 0 to train from features",
        )
    classes, train_entries, val_entries = load_lists(run)
    if data.features and env.is_main:
        adopt_cached_backbone(data.features, run_dir)
    # Rank 0 first: random-init CLIP weights are saved by it and loaded by the others.
    if not env.is_main:
        barrier(env)
    built = build_model(run, run_dir, classes, seed=cfg.seed)
    if env.is_main:
        barrier(env)
    if not env.is_main:  # the model is built alike everywhere; dropout masks differ between processes
        torch.manual_seed(rank_seed(cfg.seed, env))
    configure_device(dev, tf32=cfg.tf32)
    model = built.model.to(dev)
    train_cache = FeatureCache.open(data.features) if data.features else None
    val_cache = FeatureCache.open(data.val_features) if data.val_features else None
    recompute = cfg.recompute_memory
    if recompute is None and train_cache is not None:  # no backbone activations to make room for
        recompute = False
    if recompute is not None:
        if spec.set_recompute_memory is None:
            raise ValueError(
                f"train.recompute_memory applies to EVL's decoder, not to method {run.method.name}"
            )
        spec.set_recompute_memory(model, recompute)
    caches = [c for c in (train_cache, val_cache) if c is not None]
    if caches:
        fingerprint = model.backbone_fingerprint()  # hashes every backbone weight: once
        for cache in caches:
            cache.check_model(model, fingerprint)
    config_dict = write_run_files(run_dir, run, built.payload, classes, write=env.is_main)
    if not has_trainable_parameters(model):  # zero-shot: nothing to train, only to evaluate
        return _evaluate_untrained(run, run_dir, model, val_entries, env, progress)

    optimizer = build_method_optimizer(model, run)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
    compute_dtype = resolve_precision(cfg.precision, dev)
    trainer = TrainStep(
        model,
        optimizer,
        compute_dtype=compute_dtype,
        label_smoothing=cfg.label_smoothing,
        # Each process mixes its own micro-batches, keyed by their first stream positions: a resumed run
        # mixes as the uninterrupted one did (see evl.video.mixing for what torchrun changes).
        mixing=mixing,
        batch_split=cfg.batch_split,
        distributed=env.enabled,
        batch_size=cfg.batch_size,
    )
    scaler = trainer.scaler  # restored from and saved with the checkpoints
    start = 0
    checkpoint_path = find_resumable(run_dir) if resume == "auto" else resume
    if checkpoint_path:
        checkpoint = load_checkpoint(checkpoint_path, expected_config={"model": config_dict["model"]})
        model.load_trainable_state_dict(checkpoint.model_state, source=str(checkpoint.path))
        restore_train_state(checkpoint.train_state, optimizer, scheduler, scaler)
        start = checkpoint.step
        if not env.is_main:
            # Every process restored rank 0's saved random state: the others start their own stream again.
            torch.manual_seed(rank_seed(cfg.seed + start, env))
        log.info("resumed from %s at step %d", checkpoint.path, start)
    elif cfg.init_from:
        initialise_from(model, cfg.init_from)
    allocate_adamw_state(optimizer)  # before the first activations (peak memory); a resumed one has it
    if start >= cfg.steps:
        log.info("%s: already trained for %d steps", run_dir, start)
        return TrainResult(run_dir, start, float("nan"), None)
    # Gradients are averaged over processes for the trainable parameters only (DDP skips frozen ones).
    step_model = wrap_ddp(model, env)
    if cfg.compile:
        step_model = torch.compile(step_model)  # checkpoints keep saving ``model`` itself
    trainer.step_model = step_model

    dataset, collate = training_data(run, model, classes, train_entries, train_cache)
    micro_batch = cfg.batch_size // (cfg.batch_split * env.world_size)
    loader = DataLoader(
        dataset,
        batch_size=micro_batch,
        # Rank r reads stream positions r, r + N, ...: together, the one-process stream, step for step.
        sampler=StreamSampler(
            start * cfg.batch_size, (cfg.steps - start) * cfg.batch_size, env.rank, env.world_size
        ),
        collate_fn=collate,
        # Its own generator: creating the iterator must not draw from the global RNG, or a resumed run
        # (which creates it after restoring the RNG state) would see other dropout masks.
        generator=torch.Generator().manual_seed(cfg.seed),
        drop_last=False,
        **loader_options(dev, data.num_workers),
    )
    batches = iter(loader)
    metrics_csv = run_dir / "metrics.csv"
    writer = _tensorboard(run_dir) if env.is_main else _NoWriter()
    evaluation: Evaluation | None = None
    loss_value = float("nan")
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress)
    tic = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        model.train()
        # The step's loss stays on the device (no copy to the host per micro-batch): one read per step.
        loss_value = mean_over_processes(
            env, trainer.run(_micro_batches(batches, cfg.batch_split, dev, run_dir))
        )
        if not math.isfinite(loss_value):
            if cfg.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"loss became {loss_value} at step {step}; "
                    f"the last good checkpoint is kept in {run_dir}/checkpoints"
                )
            log.warning("loss %s at step %d: update skipped", loss_value, step)
            trainer.skip()
        else:
            trainer.apply()  # optimizer.step(), unless float16 gradients overflowed
        scheduler.step()
        lr = optimizer.param_groups[0]["lr"]
        rows = [(step, "train", "loss", loss_value), (step, "train", "lr", lr)]
        if step % cfg.log_every == 0 or step == cfg.steps:
            clips_per_s = cfg.batch_size * (step - start) / (time.perf_counter() - tic)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", clips_s=f"{clips_per_s:.1f}")
            rows.append((step, "train", "clips_per_s", clips_per_s))
        if (val_entries or val_cache) and (step % cfg.eval_every == 0 or step == cfg.steps):
            if val_cache is not None:
                evaluation = evaluate_cached(
                    model, val_cache, batch_size=micro_batch, progress=progress, num_workers=data.num_workers
                )
            else:
                evaluation = evaluate_sharded(
                    env, model, val_entries, data, batch_size=max(1, micro_batch // 2), progress=progress
                )
            if evaluation.failed and env.is_main:
                atomic_write_text(
                    run_dir / "skipped_val_videos.txt", "".join(f"{p}\t{r}\n" for p, r in evaluation.failed)
                )
            result = evaluation.result
            rows += [(step, "val", k, v) for k, v in result.to_dict().items() if isinstance(v, float)]
            log.info(
                "step %d: val top1 %.2f top5 %.2f (%d videos)",
                step,
                result.top1,
                result.top5,
                result.num_videos,
            )
        if env.is_main:
            _append_metrics(metrics_csv, rows)
        for _, split, name, value in rows:
            writer.add_scalar(f"{split}/{name}", value, step)
        if env.is_main and (step % cfg.save_every == 0 or step == cfg.steps):
            train_state = make_train_state(
                optimizer,
                scheduler,
                scaler if scaler.is_enabled() else None,
                {"position": step * cfg.batch_size},
            )
            save_checkpoint(
                run_dir, step, model.trainable_state_dict(), train_state, config_dict, cfg.keep_last
            )
        bar.update(1)
    bar.close()
    writer.close()
    if env.is_main:
        plot_training_curves(metrics_csv, run_dir / "training_curves.png")
    barrier(env)  # no process returns before the last checkpoint exists
    return TrainResult(run_dir, cfg.steps, loss_value, evaluation)


def _evaluate_untrained(
    run: RunConfig,
    run_dir: Path,
    model: torch.nn.Module,
    val_entries: list[VideoEntry],
    env: DistEnv,
    progress: bool,
) -> TrainResult:
    """A model with nothing to train (zero-shot CLIP): the run directory is written and, with a validation
    list, the model evaluated once, as step 0."""
    log.info("%s: method %s has no trainable parameters: no training step", run_dir, run.method.name)
    evaluation = None
    if val_entries:
        batch = max(1, run.train.batch_size // (run.train.batch_split * env.world_size * 2))
        evaluation = evaluate_sharded(env, model, val_entries, run.data, batch_size=batch, progress=progress)
        if env.is_main:
            rows = [(0, "val", k, v) for k, v in evaluation.result.to_dict().items() if isinstance(v, float)]
            _append_metrics(run_dir / "metrics.csv", rows)
            if evaluation.failed:
                atomic_write_text(
                    run_dir / "skipped_val_videos.txt", "".join(f"{p}\t{r}\n" for p, r in evaluation.failed)
                )
    barrier(env)
    return TrainResult(run_dir, 0, float("nan"), evaluation)


def evaluate_sharded(
    env: DistEnv,
    model: torch.nn.Module,
    entries: list[VideoEntry],
    data: DataConfig,
    batch_size: int,
    progress: bool,
) -> Evaluation:
    """Each process scores every N-th video; the per-video scores are gathered so that every video counts
    exactly once (no padding, no dropped remainder), then summarised as in one process."""
    if not env.enabled:
        return evaluate(model, entries, data, batch_size=batch_size, progress=progress)
    shard = list(range(env.rank, len(entries), env.world_size))
    part = evaluate(model, [entries[i] for i in shard], data, batch_size=batch_size, progress=progress)
    pieces = all_gather_objects(env, (shard, part.scores, part.paths, part.failed))
    scores = np.full((len(entries), model.num_classes), np.nan)
    paths = [""] * len(entries)
    failed: list[tuple[str, str]] = []
    for indices, part_scores, part_paths, part_failed in pieces:
        scores[indices] = part_scores
        for i, path in zip(indices, part_paths, strict=True):
            paths[i] = path
        failed += part_failed
    return Evaluation.summarised(scores, entry_labels(entries), paths, failed)


def _micro_batches(
    batches: Iterator[dict], count: int, dev: torch.device, run_dir: Path
) -> Iterator[tuple[Any, torch.Tensor, int | None]]:
    """The next ``count`` loader batches as (inputs, labels, stream position of the first clip) on ``dev``,
    drawn one at a time; the position keys the batch's mixing (None for cached features, never mixed)."""
    for _ in range(count):
        batch = next(batches)
        if batch["skipped"]:
            _record_skipped(run_dir, batch["skipped"])
        labels = batch["label"].to(dev, non_blocking=True)
        inputs = (
            to_frame_features(batch["features"], dev)
            if "features" in batch
            else batch["video"].to(dev, non_blocking=True)
        )
        position = int(batch["position"][0]) if "position" in batch else None
        del batch
        yield inputs, labels, position
        del inputs, labels  # released before the next batch is drawn


def _record_skipped(run_dir: Path, skipped: list) -> None:
    with (run_dir / "skipped_videos.txt").open("a") as f:
        for s in skipped:
            f.write(f"{s.path}\t{s.reason}\n")
    for s in skipped:
        log.warning("skipped undecodable video (%s)", s.reason)


class _NoWriter:
    def add_scalar(self, *args, **kwargs) -> None:
        return None

    def close(self) -> None:
        return None


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a trimmed install should still train
        log.info("tensorboard is not installed: logging to metrics.csv only")
        return _NoWriter()
    return SummaryWriter(str(run_dir / "tb"))
