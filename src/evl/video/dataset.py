"""Datasets that turn list entries into model-ready clips.

Training is step-based, as in the official EVL trainer: the sample stream is a concatenation of
permutations, permutation ``e`` seeded by ``(seed, e)``, and stream position ``p`` also seeds all the random
choices made for that sample (clip start, augmentation). A sample is thus a pure function of
``(seed, p)``: it does not depend on the worker that loads it, and a resumed run that restarts the stream at
``step * batch_size`` sees exactly the data it would have seen.

Videos that cannot be decoded are skipped with a record of why (policy ``skip``), or raise (``error``).
A skipped training sample is replaced by the next video in the list; a skipped evaluation video stays in the
output with its reason, so that it is counted, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from evl.config import DataConfig, VisionConfig
from evl.video.decode import VideoDecodeError, printable_path, probe, read_frames
from evl.video.lists import VideoEntry, resolve_path
from evl.video.sampling import SamplingConfig, temporal_views
from evl.video.transforms import EvalTransform, TrainTransform, TransformConfig, build_eval_transform

# How many other videos a training sample tries before giving up, when its own cannot be decoded.
MAX_REPLACEMENTS = 10


@dataclass(frozen=True)
class SkippedVideo:
    """A video left out, and why; ``path`` is printable (see :func:`evl.video.decode.printable_path`)."""

    path: str
    reason: str


def load_clips(path: Path, sampling: SamplingConfig, rng: np.random.Generator | None) -> np.ndarray:
    """Decode the temporal views of one video: uint8 [V, T, H, W, 3] (V = 1 in training)."""
    meta = probe(path)
    indices = temporal_views(sampling, meta.num_frames, rng)  # [V, T]
    frames = read_frames(path, indices.reshape(-1), meta)
    return frames.reshape(*indices.shape, *frames.shape[1:])


@dataclass(frozen=True)
class EvalViews:
    """What one video becomes for evaluation and prediction alike: ``Vt`` clips spread over its length
    (``sampling``), each resized, cut into ``Vs`` crops and normalised for the encoder (``transform``)."""

    sampling: SamplingConfig
    transform: EvalTransform

    @classmethod
    def for_encoder(cls, data: DataConfig, vision: VisionConfig) -> EvalViews:
        """The views a run's data settings ask for, in the image encoder's size, mean and std."""
        transform = TransformConfig.from_backbone(vision, num_spatial_views=data.num_spatial_views)
        return cls(SamplingConfig.from_data(data), build_eval_transform(transform))

    def load(self, path: Path) -> torch.Tensor:
        """Every view of the video in ``path``: float32 [Vt*Vs, T, 3, S, S], temporal-major."""
        return torch.cat([self.transform(clip) for clip in load_clips(path, self.sampling, rng=None)])


def _generators(seed: int, position: int) -> tuple[np.random.Generator, torch.Generator]:
    rng = np.random.default_rng([seed, position])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


class StreamOrder:
    """Stream position -> item index: epoch ``e`` is a permutation of the ``n`` items seeded by
    ``(seed, e)``, so the order depends on nothing but the seed (not on workers, processes or resumption)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch: tuple[int, np.ndarray] | None = None  # the current epoch's permutation

    def order(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch, 1]).permutation(self.n))
        return self._epoch[1]

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        return int(self.order(epoch)[offset])


class TrainClips(Dataset):
    """Stream position -> one augmented clip.

    Item: ``{"video": float32 [T, 3, S, S], "label": int, "index": int, "position": int,
    "skipped": [SkippedVideo]}``; ``position`` is the stream position, which keys the batch's mixing.
    """

    def __init__(
        self,
        entries: Sequence[VideoEntry],
        data_root: str | Path | None,
        sampling: SamplingConfig,
        transform: TrainTransform,
        seed: int = 0,
        on_bad_video: str = "skip",
    ) -> None:
        if not entries:
            raise ValueError("TrainClips: no videos")
        self.entries = list(entries)
        self.data_root = data_root
        self.sampling = sampling
        self.transform = transform
        self.seed = seed
        self.on_bad_video = on_bad_video
        self.stream = StreamOrder(len(self.entries), seed)

    def __len__(self) -> int:  # one epoch; the stream itself is unbounded
        return len(self.entries)

    def index_at(self, position: int) -> int:
        return self.stream.index_at(position)

    def __getitem__(self, position: int) -> dict[str, Any]:
        rng, generator = _generators(self.seed, position)
        index = self.index_at(position)
        skipped: list[SkippedVideo] = []
        attempts = min(MAX_REPLACEMENTS + 1, len(self.entries))  # a short list: each video once
        for attempt in range(attempts):
            entry = self.entries[(index + attempt) % len(self.entries)]
            path = resolve_path(entry, self.data_root)
            try:
                clips = load_clips(path, self.sampling, rng)
            except VideoDecodeError as err:
                if self.on_bad_video == "error":
                    raise
                skipped.append(SkippedVideo(printable_path(path), str(err)))
                continue
            video, label = self.transform(clips[0], entry.label, generator)
            return {
                "video": video,
                "label": label,
                "index": index,
                "position": position,
                "skipped": skipped,
            }
        raise VideoDecodeError(
            f"{attempts} videos in a row could not be decoded (is the data root right?); "
            f"the last: {skipped[-1].reason}"
        )


class EvalClips(Dataset):
    """Video index -> all its views.

    Item: ``{"video": float32 [V, T, 3, S, S] or None, "label": int, "index": int, "path": str,
    "error": str | None}`` with V = temporal views x spatial views, temporal-major.
    """

    def __init__(
        self,
        entries: Sequence[VideoEntry],
        data_root: str | Path | None,
        views: EvalViews,
        on_bad_video: str = "skip",
    ) -> None:
        self.entries = list(entries)
        self.data_root = data_root
        self.views = views
        self.on_bad_video = on_bad_video

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        path = resolve_path(entry, self.data_root)
        item: dict[str, Any] = {
            "label": entry.label,
            "index": index,
            "path": printable_path(path),  # goes into score files and reports, which are UTF-8
            "video": None,
            "error": None,
        }
        try:
            item["video"] = self.views.load(path)
        except VideoDecodeError as err:
            if self.on_bad_video == "error":
                raise
            item["error"] = str(err)
        return item


class StreamSampler(Sampler[int]):
    """Stream positions ``start, start+1, ...`` for ``num_samples`` samples, optionally one rank's share.

    With ``world_size`` ranks, rank r takes positions ``start + r, start + r + world_size, ...``, so the
    union over ranks is the single-process stream.
    """

    def __init__(self, start: int, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.start, self.num_samples, self.rank, self.world_size = start, num_samples, rank, world_size

    def __iter__(self):
        return iter(range(self.start + self.rank, self.start + self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.start + self.num_samples, self.world_size))


def collate_train(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "video": torch.stack([it["video"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "position": torch.tensor([it["position"] for it in items]),
        "skipped": [s for it in items for s in it["skipped"]],
    }


def collate_eval(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks decodable videos; undecodable ones travel as (index, path, error) for the report."""
    good = [it for it in items if it["video"] is not None]
    return {
        "video": torch.stack([it["video"] for it in good]) if good else None,
        "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
        "index": [it["index"] for it in good],
        "path": [it["path"] for it in good],
        "failed": [(it["index"], it["path"], it["error"]) for it in items if it["video"] is None],
    }
