"""Datasets over a feature cache: cached rows as data-loader items, batched and moved to the decoder's device.

:class:`CachedClips` streams the usable rows in training's seeded order, :class:`CachedRows` serves given rows
in the order given; both yield the items :func:`collate_cached` batches, and :func:`to_frame_features` turns a
batch into decoder inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from evl.engine.feature_cache import FeatureCache, FeatureCacheError
from evl.models.evl import FrameFeatures
from evl.video.dataset import StreamOrder


def to_frame_features(
    rows: list[tuple[torch.Tensor, torch.Tensor | None]], device: torch.device
) -> list[FrameFeatures]:
    """Batched cache rows (float16) -> float32 decoder inputs on ``device``.

    The rows travel in float16 (half the bytes) and are widened on ``device``; from pinned memory (a loader
    built with :func:`~evl.engine.loading.loader_options`) the copies overlap the work queued before them.
    """

    def moved(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, non_blocking=True).float()

    return [FrameFeatures(moved(out), None if attn is None else moved(attn)) for out, attn in rows]


class CachedClips(Dataset):
    """Stream position -> one cached clip, in the same seeded order scheme as :class:`TrainClips`.

    Item: ``{"features": [(out, attn) per block], "label": int, "index": int}``; skipped videos are not in
    the stream.
    """

    def __init__(self, cache: FeatureCache, blocks: Sequence[int], seed: int = 0) -> None:
        self.cache = cache
        self.blocks = tuple(blocks)
        self.seed = seed
        self.rows = cache.done_indices()
        if not len(self.rows):
            raise FeatureCacheError(f"{cache.root}: no usable videos")
        self.labels = [label for _, label in cache.entries()]
        self.stream = StreamOrder(len(self.rows), seed)

    def __len__(self) -> int:
        return len(self.rows)

    def index_at(self, position: int) -> int:
        return int(self.rows[self.stream.index_at(position)])

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.index_at(position)
        return {"features": self.cache.read(index, self.blocks), "label": self.labels[index], "index": index}


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    per_block = zip(*(it["features"] for it in items), strict=True)
    features = [
        (torch.stack([o for o, _ in rows]), None if rows[0][1] is None else torch.stack([a for _, a in rows]))
        for rows in per_block
    ]
    return {
        "features": features,
        "label": torch.tensor([it["label"] for it in items]),
        "index": [it["index"] for it in items],
        "skipped": [],
    }


class CachedRows(Dataset):
    """Given rows of a cache, in the order given: the items of :func:`collate_cached`."""

    def __init__(self, cache: FeatureCache, rows: Sequence[int], blocks: Sequence[int]) -> None:
        self.cache, self.rows, self.blocks = cache, [int(i) for i in rows], tuple(blocks)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.rows[position]
        return {"features": self.cache.read(index, self.blocks), "label": 0, "index": index}
