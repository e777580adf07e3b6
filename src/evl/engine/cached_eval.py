"""Evaluation on a feature cache: the decoder scored on every listed video's cached view, without decoding.

The cache's one view per video (the centre clip, the centre crop) goes through the same scoring loop as
:func:`evl.engine.evaluate.evaluate`; videos skipped at extraction are reported as failed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from evl.engine.cached_data import CachedRows, collate_cached, to_frame_features
from evl.engine.evaluate import Evaluation
from evl.engine.feature_cache import DONE, PENDING, SKIPPED, FeatureCache
from evl.engine.loading import loader_options
from evl.engine.scoring import score_batches
from evl.models.evl import EVL, FrameFeatures


@torch.no_grad()
def evaluate_cached(
    model: EVL,
    cache: FeatureCache,
    batch_size: int = 8,
    progress: bool = True,
    num_workers: int | None = None,
) -> Evaluation:
    """Single-view evaluation on a feature cache: every listed video once, skipped ones reported.

    ``num_workers``: data-loader processes reading the rows (None: from the CPU count).
    """
    model.eval()
    device = next(model.decoder.parameters()).device
    entries = cache.entries()
    status = np.asarray(cache.status())
    if (status == PENDING).any():
        cache.done_indices()  # raises the incomplete-extraction error
    done = np.flatnonzero(status == DONE)
    loader = DataLoader(
        CachedRows(cache, done, model.blocks),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_cached,
        **loader_options(device, num_workers),
    )
    scored = score_batches(
        model,
        loader,
        len(entries),
        model.config.decoder.num_classes,
        forward=model.forward_head,
        to_device=_cached_inputs,
        batch_size=batch_size,
        progress=progress,
        total=len(done),
    )
    labels = np.array([label for _, label in entries], dtype=np.int64)
    paths = [path for path, _ in entries]
    failed = [(paths[i], "skipped at extraction") for i in np.flatnonzero(status == SKIPPED)]
    return Evaluation.summarised(scored.scores, labels, paths, failed, status == DONE)


def _cached_inputs(batch: dict[str, Any], device: torch.device) -> tuple[list[FrameFeatures], int]:
    # A cache holds one view per video (the centre clip, the centre crop).
    return to_frame_features(batch["features"], device), 1
