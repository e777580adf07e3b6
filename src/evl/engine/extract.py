"""``evl extract``: the videos of a list -> a feature cache (:mod:`evl.engine.feature_cache`).

:func:`extract` runs a model's frozen backbone once per video and writes the rows; :func:`extract_list` is the
command as one engine call: it picks the list of a run config and builds the model whose frozen backbone fills
the cache (through the method registry).

Under ``torchrun --nproc_per_node N -m evl extract ...`` the pending videos are dealt out to the processes
(process r takes pending rows r, r + N, ...): every video is extracted once, each process writes only its
own rows of the shared arrays, and a killed extraction resumes from what every process had finished. The
processes share the cache's memory-mapped files, so they run on one machine (one node, any number of GPUs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from evl.config import RunConfig, SettingError, to_dict
from evl.devices import pick_device
from evl.engine.distributed import (
    DistEnv,
    all_gather_objects,
    barrier,
    device_for,
    init_distributed,
    shutdown,
)
from evl.engine.feature_cache import PENDING, SKIPPED, CacheMeta, FeatureCache, cache_bytes_per_clip
from evl.engine.loading import loader_options
from evl.engine.methods import build_feature_model
from evl.engine.train import load_lists
from evl.models.evl import EVL
from evl.video.dataset import EvalClips, EvalViews, collate_eval
from evl.video.lists import VideoEntry

SPLITS = ("train", "val")


@dataclass
class ExtractResult:
    root: Path
    num_videos: int
    num_extracted: int  # in this call (a resumed extraction skips finished rows)
    num_skipped: int
    bytes_per_clip: int


def extract(
    model: EVL,
    run: RunConfig,
    entries: Sequence[VideoEntry],
    classes: list[str],
    out_dir: str | Path,
    batch_size: int = 4,
    blocks: Sequence[int] | None = None,
    progress: bool = True,
    env: DistEnv | None = None,
) -> ExtractResult:
    """Run ``model``'s frozen backbone once per video (centre clip, centre crop) and store decoder inputs.

    ``blocks`` defaults to the blocks ``model``'s decoder reads; cache more to sweep decoder depth later.
    A random-init backbone is expected to be saved in ``out_dir`` already (``engine.run.build_backbone``).
    With ``env`` of several processes, each extracts its share of the pending videos (every process calls
    this with the same arguments); the result counts all of them.
    """
    env = env or DistEnv()
    if not model.frozen:
        raise ValueError("a feature cache needs a frozen backbone (backbone.freeze = true)")
    data = dataclasses.replace(run.data, num_temporal_views=1, num_spatial_views=1)
    blocks = tuple(model.blocks if blocks is None else blocks)
    meta = CacheMeta(
        backbone=to_dict(model.config.backbone),
        backbone_name=model.config.backbone_name,
        fingerprint=model.backbone_fingerprint(),
        blocks=blocks,
        num_frames=data.num_frames,
        sampling={
            "sampling": data.sampling,
            "frame_stride": data.frame_stride,
            "views": "centre clip, centre crop",
        },
        classes=list(classes),
        num_videos=len(entries),
    )
    # The first process creates the arrays; the others open them once they exist.
    if env.is_main:
        cache = FeatureCache.create_or_resume(out_dir, meta, entries)
    barrier(env)
    if not env.is_main:
        cache = FeatureCache.create_or_resume(out_dir, meta, entries)
    all_pending = np.flatnonzero(np.asarray(cache.status()) == PENDING)
    barrier(env)  # every process has read the same pending rows before any is written
    pending = all_pending[env.rank :: env.world_size]
    dataset = EvalClips(
        [entries[i] for i in pending],
        data.data_root,
        EvalViews.for_encoder(data, model.vision_config),
        on_bad_video=data.on_bad_video,
    )
    device = next(model.decoder.parameters()).device
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_eval,
        generator=torch.Generator(),  # leaves the global RNG alone
        **loader_options(device, data.num_workers),
    )
    model.eval()
    skipped = 0
    bar = tqdm(
        total=len(entries) - len(all_pending) + len(pending),
        initial=len(entries) - len(all_pending),
        desc="extract",
        unit="video",
        disable=not progress or not env.is_main,
    )
    with torch.no_grad():
        for batch in loader:
            if batch["failed"]:
                cache.mark([pending[i] for i, _, _ in batch["failed"]], SKIPPED)
                with (cache.root / "skipped_videos.txt").open("a") as f:
                    f.writelines(f"{path}\t{reason}\n" for _, path, reason in batch["failed"])
                skipped += len(batch["failed"])
            if batch["video"] is not None:
                # The pinned batch is copied whole, then its single view taken: [B, T, 3, S, S].
                video = batch["video"].to(device, non_blocking=True)[:, 0]
                block_features = model.extract_features(video, blocks, with_attention=True)
                cache.write([pending[i] for i in batch["index"]], block_features)
            bar.update(len(batch["failed"]) + len(batch["index"]))
    bar.close()
    barrier(env)  # no process reports before every row is written
    skipped = sum(all_gather_objects(env, skipped))
    return ExtractResult(cache.root, len(entries), len(all_pending), skipped, cache_bytes_per_clip(meta))


def extract_list(
    run: RunConfig,
    split: str,
    out_dir: str | Path,
    batch_size: int = 4,
    blocks: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Cache what the decoder reads from every video of the run's ``split`` list ("train" or "val") in
    ``out_dir`` (resumed when it holds a partial cache of the same list and model).

    ``blocks`` defaults to the blocks the run's decoder reads. A random-init backbone is saved in
    ``out_dir``, so that ``evl train --features`` builds the same one.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    classes, train_entries, val_entries = load_lists(run)
    entries = train_entries if split == "train" else val_entries
    if not entries:
        raise SettingError(f"data.{split}_list", f"no {split} list to extract: set data.{split}_list")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    requested = pick_device(device)
    env = init_distributed(requested)
    try:
        # The first process saves a random-init backbone; the others then load the same one.
        if not env.is_main:
            barrier(env)
        model = build_feature_model(run, out_dir, classes)
        if env.is_main:
            barrier(env)
        model = model.to(device_for(env, requested))
        return extract(model, run, entries, classes, out_dir, batch_size, blocks, progress=progress, env=env)
    finally:
        shutdown(env)
