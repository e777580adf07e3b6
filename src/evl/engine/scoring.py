"""The one loop that turns batches into per-video class probabilities.

Evaluation on videos, evaluation on a feature cache and prediction of single files differ only in where
their batches come from and which forward they call; copying to the device, the model's inference context,
the out-of-memory error, the averaging over views and the bookkeeping by video index live here, so that the
three cannot drift apart.

A batch is a dict with ``index`` (the list positions of its decoded videos), optionally ``path`` (their
paths) and ``failed`` (``(index, path, reason)`` of videos that could not be decoded), and the inputs that
``to_device`` takes out of it (by default ``video`` [B, V, T, 3, S, S], or None when no video decoded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from evl.devices import DeviceOutOfMemory
from evl.engine.methods import inference_context
from evl.engine.metrics import average_views


class ScoredVideos(NamedTuple):
    scores: np.ndarray  # [N, C] softmax averaged over views; NaN rows for videos not scored
    paths: list[str]  # "" for videos no batch named
    failed: list[tuple[str, str]]  # (path, reason), in the order the batches reported them
    scored: np.ndarray  # [N] bool: rows a forward pass wrote (a model's NaN logits still count)
    seen: np.ndarray  # [N] bool: scored or reported as failed


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward_or_none(forward: Callable[..., torch.Tensor], *inputs: Any) -> torch.Tensor | None:
    """``forward(*inputs)``, or None when the device ran out of memory during it.

    The caller raises its error after this returns, outside the handler: the traceback of the failed
    forward pass, whose frames hold its activations, is gone by then and the memory is free again.
    """
    try:
        return forward(*inputs)
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from torch 2.5 on: the same class
        return None


def evaluation_out_of_memory(batch_size: int, clips_per_forward: int) -> DeviceOutOfMemory:
    """The error of an evaluation forward pass that ran out of memory, once the memory the allocator
    still caches is handed back (the caller may go on, e.g. training after a failed validation)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return DeviceOutOfMemory("evaluation", batch_size, clips_per_forward)


def video_inputs(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, int] | None:
    """A video batch's clips on ``device``, views flattened into the batch: ([B*V, T, 3, S, S], V).

    From pinned memory (a loader built with :func:`~evl.engine.loading.loader_options`) the copy overlaps
    the work queued before it; from pageable memory it is one plain copy, as good as a synchronous one.
    """
    if batch["video"] is None:
        return None
    video = batch["video"].to(device, non_blocking=True)  # [B, V, T, 3, S, S]
    return video.flatten(0, 1), video.shape[1]


@torch.no_grad()
def view_averaging(model: torch.nn.Module) -> str:
    """How a model's logits become class scores before the views are averaged (``average_views`` mode)."""
    return "sigmoid" if getattr(model, "score_activation", "softmax") == "sigmoid" else "prob"


def class_scores(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Logits [..., C] -> the model's class scores: softmax, or per-class sigmoids (SigLIP's towers)."""
    logits = logits.float()
    return logits.sigmoid() if view_averaging(model) == "sigmoid" else logits.softmax(dim=-1)


def score_batches(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    num_videos: int,
    num_classes: int,
    *,
    forward: Callable[[Any], torch.Tensor] | None = None,
    to_device: Callable[[dict[str, Any], torch.device], tuple[Any, int] | None] = video_inputs,
    batch_size: int = 1,
    progress: bool = True,
    total: int | None = None,
) -> ScoredVideos:
    """Per-video probabilities of ``batches``: softmax over classes (per-class sigmoids for a model whose
    ``score_activation`` says so: SigLIP's towers), averaged over each video's views.

    ``forward`` (default: ``model``) maps the inputs ``to_device`` returns to logits [B*V, C];
    ``batch_size`` is reported in the :class:`~evl.devices.DeviceOutOfMemory` raised when the device runs
    out of memory; ``total`` is the progress bar's length in videos (default ``num_videos``).
    """
    forward = model if forward is None else forward
    device = model_device(model)
    scores = np.full((num_videos, num_classes), np.nan, dtype=np.float64)
    paths = [""] * num_videos
    failed: list[tuple[str, str]] = []
    scored = np.zeros(num_videos, dtype=bool)
    seen = np.zeros(num_videos, dtype=bool)
    bar = tqdm(
        total=num_videos if total is None else total,
        desc="eval",
        unit="video",
        disable=not progress,
        leave=False,
    )
    # Text methods encode their class prompts once for the whole pass, not once per batch.
    with inference_context(model):
        for batch in batches:
            for index, path, reason in batch.get("failed", ()):
                failed.append((path, reason))
                paths[index] = path
                seen[index] = True
            indices = batch["index"]
            moved = to_device(batch, device) if len(indices) else None
            if moved is not None:
                inputs, views = moved
                del moved
                logits = forward_or_none(forward, inputs)
                if logits is None:
                    del inputs
                    bar.close()
                    raise evaluation_out_of_memory(batch_size, len(indices) * views) from None
                logits = logits.float().view(len(indices), views, -1)
                scores[indices] = average_views(logits.cpu(), mode=view_averaging(model))
                scored[indices] = seen[indices] = True
                if "path" in batch:
                    for index, path in zip(indices, batch["path"], strict=True):
                        paths[index] = path
            bar.update(len(batch.get("failed", ())) + len(indices))
    bar.close()
    return ScoredVideos(scores, paths, failed, scored, seen)
