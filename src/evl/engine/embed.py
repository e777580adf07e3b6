"""Video embeddings: one vector per video, or per window of a long video, from any method.

What an embedding is belongs to the method (:attr:`~evl.engine.methods.MethodSpec.embed`): EVL's is the
decoder's final query, what the classifier head reads ([C], the encoder's width); ViFi-CLIP's and zero-shot
CLIP's the L2-normalised mean of the frame embeddings, X-CLIP's its L2-normalised video embedding: in both
cases what the class texts are compared with ([D], the joint space). A video's embedding pools the views
the run evaluates with (one clip and one crop unless the run says otherwise); a window's is one clip, one
centre crop, as the timeline classifies it (:mod:`evl.engine.window_pass`).

:func:`embed_videos` writes one safetensors file:

* ``embeddings`` float32 [N, D]: one row per video, or per window;
* ``video`` int64 [N]: the row's video, an index into the ``paths`` metadata entry (a JSON list of the
  videos' paths, in input order); with windows also ``start`` and ``end`` float64 [N], in seconds;
* metadata (JSON texts): ``paths``, ``failed`` (``[path, reason]`` of videos that could not be decoded,
  which have no rows and are not in ``paths``), ``method``, ``source``, and with windows ``window`` (the
  lengths asked for: ``seconds``, ``stride_seconds``, ``frames``, ``stride_frames``; the rows' ``start``
  and ``end`` say what they came to at each video's frame rate). :func:`read_embeddings` reads it back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from evl.config import DataConfig, MethodConfig
from evl.engine.methods import inference_context, method_spec
from evl.engine.predict import VIDEO_SUFFIXES, Predictor, expand_video_paths
from evl.engine.run import CONFIG_FILE, load_source, zeroshot_run
from evl.engine.scoring import evaluation_out_of_memory, forward_or_none, model_device
from evl.engine.window_pass import forward_windows, plan_video_windows, window_transform
from evl.io import atomic_path
from evl.video.decode import VideoDecodeError, printable_path, probe
from evl.video.lists import ListFileError, read_list, resolve_path
from evl.video.windows import WindowPlan

__all__ = [
    "Embeddings",
    "embed_videos",
    "embedding_function",
    "load_embedder",
    "read_embeddings",
    "read_video_paths",
    "window_embeddings",
]

logger = logging.getLogger(__name__)


def embedding_function(predictor: Predictor):
    """The method's ``(model, views [B, V, T, 3, S, S]) -> [B, D]`` (:attr:`MethodSpec.embed`)."""
    spec = method_spec(predictor.run.run.method.name)
    if spec.embed is None:
        raise ValueError(f"the {spec.title} method defines no video embedding")
    return spec.embed


@torch.no_grad()
def embed_views(predictor: Predictor, views: torch.Tensor) -> torch.Tensor:
    """Embeddings [B, D] (float32, on the CPU) of videos' views [B, V, T, 3, S, S]."""
    embed, model = embedding_function(predictor), predictor.model
    with inference_context(model):
        inputs = views.to(model_device(model))
        embeddings = forward_or_none(lambda x: embed(model, x), inputs)
    if embeddings is None:
        del inputs
        raise evaluation_out_of_memory(len(views), views.shape[0] * views.shape[1])
    return embeddings.float().cpu()


def window_embeddings(
    predictor: Predictor,
    path: str | Path,
    window: float | None = 2.0,
    stride: float | None = None,
    *,
    window_frames: int | None = None,
    stride_frames: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[WindowPlan, torch.Tensor]:
    """The windows of one video (as :func:`~evl.engine.timeline.predict_timeline` cuts them) and their
    embeddings [W, D]."""
    plan = plan_video_windows(predictor.views, probe(path), window, stride, window_frames, stride_frames)
    embed, model = embedding_function(predictor), predictor.model
    rows = [
        embeddings
        for _, embeddings in forward_windows(
            model,
            path,
            plan,
            window_transform(predictor.views),
            lambda clips: embed(model, clips[:, None]),  # a window is one view
            batch_size=batch_size,
            progress=progress,
        )
    ]
    return plan, torch.cat(rows)


def load_embedder(
    source: str | Path,
    method: str | None = None,
    data: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> Predictor:
    """The model to take embeddings from: a run directory's, or, with ``method`` naming a method that
    trains nothing (zero-shot CLIP), CLIP weights with ``data`` (:class:`DataConfig` fields) setting frames
    and sampling. Unlike classification it needs no class list: an embedding does not depend on one."""
    if method is None or (Path(source) / CONFIG_FILE).is_file():
        return Predictor(load_source(source, device=device))
    if method_spec(method).trains:
        raise ValueError(f"method {method} is trained: {source} must be a run directory")
    data_config = DataConfig(**{k: v for k, v in (data or {}).items() if v is not None})
    # The text tower is built with one class prompt, which no embedding reads.
    return Predictor(zeroshot_run(source, ["video"], data_config, MethodConfig(name=method), device=device))


def read_video_paths(source: str | Path, data_root: str | Path | None = None) -> list[Path]:
    """The videos to embed: a folder's video files (recursively, sorted), a video file itself, or the
    paths of a list file: a labelled list as training reads (labels ignored) or one path per line (blank
    lines and ``#`` comments skipped). Listed paths are relative to ``data_root`` unless absolute."""
    source = Path(source)
    if source.is_dir() or source.suffix.lower() in VIDEO_SUFFIXES:
        return expand_video_paths([source])
    try:
        return [resolve_path(entry, data_root) for entry in read_list(source)]
    except ListFileError:
        pass
    lines = source.read_text(encoding="utf-8").splitlines()
    listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    root = Path(data_root) if data_root is not None else None
    return [root / p if root is not None and not Path(p).is_absolute() else Path(p) for p in listed]


def embed_videos(
    predictor: Predictor,
    paths: Sequence[str | Path],
    output: str | Path,
    *,
    window: float | None = None,
    stride: float | None = None,
    window_frames: int | None = None,
    stride_frames: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    source: str = "",
) -> Embeddings:
    """Embed ``paths`` (one row per video, or per window when ``window`` or ``window_frames`` is given)
    into the safetensors file ``output`` (module docstring); videos that cannot be decoded are logged,
    listed in ``failed`` and left out. Returns what was written."""
    windowed = window is not None or window_frames is not None
    rows: list[torch.Tensor] = []
    videos: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    kept: list[str] = []
    failed: list[tuple[str, str]] = []
    pending: list[tuple[str, torch.Tensor]] = []  # videos' views waiting for a full batch

    def flush() -> None:
        rows.append(embed_views(predictor, torch.stack([views for _, views in pending])))
        videos.append(np.arange(len(kept), len(kept) + len(pending)))
        kept.extend(path for path, _ in pending)
        pending.clear()

    for path in tqdm(paths, desc="embed", unit="video", disable=not progress):
        shown = printable_path(path)
        try:
            if windowed:
                plan, embeddings = window_embeddings(
                    predictor,
                    path,
                    window,
                    stride,
                    window_frames=window_frames,
                    stride_frames=stride_frames,
                    batch_size=batch_size,
                    progress=progress,
                )
                videos.append(np.full(len(plan), len(kept)))
                starts.append(plan.start_times)
                ends.append(plan.end_times)
                rows.append(embeddings)
                kept.append(shown)
            else:
                pending.append((shown, predictor.views.load(Path(path))))
                if len(pending) == batch_size:
                    flush()
        except VideoDecodeError as err:
            logger.warning("skipped %s", err)
            failed.append((shown, str(err)))
    if pending:
        flush()
    if not rows:
        reason = f" (the first: {failed[0][1]})" if failed else ""
        raise VideoDecodeError(f"no video could be embedded{reason}")

    tensors = {
        "embeddings": torch.cat(rows).contiguous(),
        "video": torch.from_numpy(np.concatenate(videos).astype(np.int64)),
    }
    metadata = {
        "paths": json.dumps(kept),
        "failed": json.dumps(failed),
        "method": predictor.run.run.method.name,
        "source": source or str(predictor.run.run_dir or predictor.run.run.backbone.name),
    }
    if windowed:
        tensors["start"] = torch.from_numpy(np.concatenate(starts))
        tensors["end"] = torch.from_numpy(np.concatenate(ends))
        asked = {
            "seconds": window,
            "stride_seconds": stride,
            "frames": window_frames,
            "stride_frames": stride_frames,
        }
        metadata["window"] = json.dumps(asked)
    with atomic_path(output) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return read_embeddings(output)


@dataclass(frozen=True)
class Embeddings:
    """An embeddings file read back: rows, the video of each row and the videos' paths."""

    embeddings: torch.Tensor  # float32 [N, D]
    video: torch.Tensor  # int64 [N], into ``paths``
    paths: list[str]
    failed: list[tuple[str, str]]
    start: torch.Tensor | None  # float64 [N] seconds, per-window files only
    end: torch.Tensor | None
    metadata: dict[str, Any]

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def read_embeddings(path: str | Path) -> Embeddings:
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        metadata = dict(f.metadata() or {})
    return Embeddings(
        embeddings=tensors["embeddings"],
        video=tensors["video"],
        paths=json.loads(metadata.get("paths", "[]")),
        failed=[tuple(item) for item in json.loads(metadata.get("failed", "[]"))],
        start=tensors.get("start"),
        end=tensors.get("end"),
        metadata=metadata,
    )
