"""A feature cache: the frozen backbone run once, so decoders train without it.

With a frozen backbone, what the decoder reads from a clip is a constant of that clip: each feeding block's
output and the head-averaged attention maps between adjacent frames
(:class:`evl.models.frame_features.FrameFeatures`).
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
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from evl.config import RunConfig, VisionConfig, to_dict
from evl.engine.evaluate import Evaluation, eval_sampling, eval_transform
from evl.engine.loading import loader_options
from evl.engine.scoring import score_batches
from evl.io import atomic_write_text
from evl.models.evl import EVL, FrameFeatures
from evl.video.dataset import EvalClips, StreamOrder, collate_eval
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
    def num_tokens(self) -> int:
        return VisionConfig(**self.backbone).num_tokens

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
        patches = meta.num_tokens - 1
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
        if VisionConfig(**_tupled(meta.backbone)) != config.backbone:
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


# ------------------------------------------------------------------------------------------------ reading


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


# ---------------------------------------------------------------------------------------------- extraction


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
) -> ExtractResult:
    """Run ``model``'s frozen backbone once per video (centre clip, centre crop) and store decoder inputs.

    ``blocks`` defaults to the blocks ``model``'s decoder reads; cache more to sweep decoder depth later.
    A random-init backbone is expected to be saved in ``out_dir`` already (``engine.run.build_backbone``).
    """
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
    cache = FeatureCache.create_or_resume(out_dir, meta, entries)
    pending = np.flatnonzero(np.asarray(cache.status()) == PENDING)
    dataset = EvalClips(
        [entries[i] for i in pending],
        data.data_root,
        eval_sampling(data),
        eval_transform(model, data),
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
        total=len(entries),
        initial=len(entries) - len(pending),
        desc="extract",
        unit="video",
        disable=not progress,
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
    return ExtractResult(cache.root, len(entries), len(pending), skipped, cache_bytes_per_clip(meta))


def cache_bytes_per_clip(meta: CacheMeta) -> int:
    t, length, c = meta.num_frames, meta.num_tokens, meta.width
    attn = 2 * (t - 1) * (length - 1) ** 2 if t > 1 else 0
    return len(meta.blocks) * 2 * (t * length * c + attn)  # float16


class CachedRows(Dataset):
    """Given rows of a cache, in the order given: the items of :func:`collate_cached`."""

    def __init__(self, cache: FeatureCache, rows: Sequence[int], blocks: Sequence[int]) -> None:
        self.cache, self.rows, self.blocks = cache, [int(i) for i in rows], tuple(blocks)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.rows[position]
        return {"features": self.cache.read(index, self.blocks), "label": 0, "index": index}


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
