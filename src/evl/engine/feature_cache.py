"""The feature cache on disk: its layout and description, and row access checked against a model.

A feature cache is the frozen backbone run once, so decoders train without it. With a frozen backbone, what
the decoder reads from a clip is a constant of that clip: each feeding block's output and the head-averaged
attention maps between adjacent frames (:class:`evl.models.frame_features.FrameFeatures`).
``evl extract`` runs the backbone once over one fixed, non-augmented view per video (the centre clip, the
centre crop) and stores exactly that, in float16, memory-mapped:

```
CACHE/
  meta.json             backbone (config, name, weight fingerprint), blocks, frames, sampling, classes
  entries.tsv           path <TAB> label, one line per video of the list, in list order
  status.npy            uint8 [N]: 0 pending, 1 done, 2 skipped (undecodable; see skipped_videos.txt)
  block{b}.out.npy      float16 [N, T, L, C]
  block{b}.attn.npy     float16 [N, 2, T-1, P, P] (absent for one-frame clips)
  backbone.safetensors  only for random-init backbones, which nothing else could restore
```
Rows are written batch by batch and marked done after their data is flushed, so a killed extraction resumes
where it stopped. ``evl train --features CACHE`` then reads rows instead of decoding videos (no
augmentation: the view is fixed), and sweeping decoder hyper-parameters never runs the backbone again.

:mod:`evl.engine.extract` fills a cache, :mod:`evl.engine.cached_data` serves its rows to data loaders and
:mod:`evl.engine.cached_eval` scores a model on it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evl.config import VisionConfig
from evl.io import atomic_write_text
from evl.models.evl import EVL, FrameFeatures
from evl.video.lists import VideoEntry

FORMAT_VERSION = 1
META_FILE = "meta.json"
ENTRIES_FILE = "entries.tsv"
STATUS_FILE = "status.npy"
BACKBONE_FILE = "backbone.safetensors"
PENDING, DONE, SKIPPED = 0, 1, 2


class FeatureCacheError(ValueError):
    """A feature cache that is missing, incomplete, damaged or made for another model."""


@dataclass(frozen=True)
class CacheMeta:
    backbone: dict[str, Any]  # VisionConfig fields
    backbone_name: str
    fingerprint: str
    blocks: tuple[int, ...]
    num_frames: int
    sampling: dict[str, Any]  # the run's DataConfig sampling fields, for the record
    classes: list[str]
    num_videos: int
    format_version: int = FORMAT_VERSION

    @property
    def vision(self) -> VisionConfig:
        return VisionConfig(**_tupled(self.backbone))

    @property
    def num_tokens(self) -> int:
        return self.vision.num_tokens

    @property
    def width(self) -> int:
        return self.backbone["width"]


class FeatureCache:
    """Read and write access to a cache folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path, meta: CacheMeta, mode: str = "r") -> None:
        self.root = Path(root)
        self.meta = meta
        self.mode = mode
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        # A data-loader worker started by spawn (not fork) receives the cache pickled: without this, the
        # arrays mapped so far would travel as full copies instead of being mapped again in the worker.
        return {**self.__dict__, "_arrays": {}}

    # ------------------------------------------------------------------------------------------ creation
    @classmethod
    def create_or_resume(
        cls, root: str | Path, meta: CacheMeta, entries: Sequence[VideoEntry]
    ) -> FeatureCache:
        """A new cache, or the existing one at ``root`` when it was started for the same model and list."""
        root = Path(root)
        if (root / META_FILE).is_file():
            cache = cls.open(root, mode="r+")
            if _as_json(cache.meta) != _as_json(meta) or cache.entries() != [
                (e.path, e.label) for e in entries
            ]:
                raise FeatureCacheError(
                    f"{root}: holds features of another backbone, block set or list; choose a new folder"
                )
            return cache
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / ENTRIES_FILE, "".join(f"{e.path}\t{e.label}\n" for e in entries))
        n, t, c = meta.num_videos, meta.num_frames, meta.width
        patches = meta.vision.num_patches
        for block in meta.blocks:
            np.lib.format.open_memmap(
                root / f"block{block}.out.npy", "w+", np.float16, (n, t, meta.num_tokens, c)
            ).flush()
            if t > 1:
                np.lib.format.open_memmap(
                    root / f"block{block}.attn.npy", "w+", np.float16, (n, 2, t - 1, patches, patches)
                ).flush()
        np.save(root / STATUS_FILE, np.zeros(n, dtype=np.uint8))
        # meta.json last: its presence means the arrays exist.
        atomic_write_text(root / META_FILE, json.dumps(dataclasses.asdict(meta), indent=2) + "\n")
        return cls(root, meta, mode="r+")

    @classmethod
    def open(cls, root: str | Path, mode: str = "r") -> FeatureCache:
        root = Path(root)
        path = root / META_FILE
        if not path.is_file():
            raise FeatureCacheError(
                f"{root}: not a feature cache (no {META_FILE}); make one with 'evl extract'"
            )
        try:
            data = json.loads(path.read_text())
            data["blocks"] = tuple(data["blocks"])
            meta = CacheMeta(**data)
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise FeatureCacheError(f"{path}: damaged cache description ({err})") from None
        if meta.format_version != FORMAT_VERSION:
            raise FeatureCacheError(f"{root}: cache format {meta.format_version}, expected {FORMAT_VERSION}")
        return cls(root, meta, mode)

    # ---------------------------------------------------------------------------------------------- rows
    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:  # opened lazily: each data-loader worker maps its own view
            path = self.root / name
            if not path.is_file():
                raise FeatureCacheError(f"{path}: missing from the feature cache")
            self._arrays[name] = np.load(path, mmap_mode=self._mmap_mode)
        return self._arrays[name]

    @property
    def _mmap_mode(self) -> str:
        # Readers map copy-on-write: rows can then be handed out as tensors without a copy (torch refuses
        # read-only memory), and nothing a reader does reaches the file.
        return "c" if self.mode == "r" else self.mode

    def status(self) -> np.ndarray:
        return self._array(STATUS_FILE)

    def entries(self) -> list[tuple[str, int]]:
        rows = (self.root / ENTRIES_FILE).read_text().splitlines()
        return [(path, int(label)) for path, label in (row.rsplit("\t", 1) for row in rows)]

    def write(self, indices: Sequence[int], features: list[FrameFeatures]) -> None:
        """Store one batch (features ordered as ``meta.blocks``) and mark its rows done."""
        rows = np.asarray(indices)
        for block, f in zip(self.meta.blocks, features, strict=True):
            out = self._array(f"block{block}.out.npy")
            out[rows] = f.out.detach().to("cpu", torch.float16).numpy()
            out.flush()
            if f.attn is not None:
                attn = self._array(f"block{block}.attn.npy")
                attn[rows] = f.attn.detach().to("cpu", torch.float16).numpy()
                attn.flush()
        self.mark(indices, DONE)

    def mark(self, indices: Sequence[int], state: int) -> None:
        status = self.status()
        status[np.asarray(indices, dtype=np.int64)] = state
        status.flush()

    def read(self, index: int, blocks: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Row ``index``: per requested block (out [T, L, C], attn [2, T-1, P, P] or None), float16 (for a
        cache opened to read, copy-on-write views of the mapped files: batching copies them once)."""
        t = self.meta.num_frames
        rows = []
        for block in blocks:
            out = self._row(f"block{block}.out.npy", index)
            attn = self._row(f"block{block}.attn.npy", index) if t > 1 else None
            rows.append((out, attn))
        return rows

    def _row(self, name: str, index: int) -> torch.Tensor:
        row = self._array(name)[index]
        # A writer's mapping reaches the file: hand out a copy there, a view of the private mapping otherwise.
        return torch.from_numpy(row if self._mmap_mode == "c" else np.array(row))

    # ------------------------------------------------------------------------------------------- checks
    def check_model(self, model: EVL, fingerprint: str | None = None) -> None:
        """One-line error unless ``model`` reads exactly what this cache holds (``fingerprint``: the
        model's :meth:`EVL.backbone_fingerprint`, when already computed)."""
        meta, config = self.meta, model.config
        if meta.vision != config.backbone:
            raise FeatureCacheError(
                f"{self.root}: made with another backbone configuration than this model's"
            )
        if (fingerprint or model.backbone_fingerprint()) != meta.fingerprint:
            raise FeatureCacheError(f"{self.root}: made with other backbone weights than this model's")
        missing = sorted(set(model.blocks) - set(meta.blocks))
        if missing:
            raise FeatureCacheError(
                f"{self.root}: the decoder reads blocks {list(model.blocks)}, "
                f"the cache holds {list(meta.blocks)}"
            )
        if config.decoder.num_frames != meta.num_frames:
            raise FeatureCacheError(
                f"{self.root}: {meta.num_frames}-frame clips, the model takes {config.decoder.num_frames}"
            )

    def done_indices(self) -> np.ndarray:
        status = np.asarray(self.status())
        if (status == PENDING).any():
            raise FeatureCacheError(
                f"{self.root}: extraction is incomplete ({int((status == PENDING).sum())} videos pending); "
                "run the same 'evl extract' command again to finish it"
            )
        return np.flatnonzero(status == DONE)


def _as_json(meta: CacheMeta) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(meta)))


def _tupled(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def cache_bytes_per_clip(meta: CacheMeta) -> int:
    t, length, c = meta.num_frames, meta.num_tokens, meta.width
    attn = 2 * (t - 1) * meta.vision.num_patches**2 if t > 1 else 0
    return len(meta.blocks) * 2 * (t * length * c + attn)  # float16
