"""Multi-view evaluation: every video once, softmax averaged over its temporal x spatial views.

A listed video that cannot be decoded (policy ``skip``) is never dropped silently: it is listed in
``skipped_videos.txt``, counted in ``num_skipped``, and the accuracies are given over both denominators
(see :class:`EvalSummary`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from evl.config import DataConfig, MethodConfig
from evl.devices import DeviceOutOfMemory
from evl.engine.loading import loader_options
from evl.engine.methods import METHODS, inference_context, method_spec, set_classes
from evl.engine.metrics import (
    EvalResult,
    average_views,
    confusion_matrix,
    harmonic_mean,
    label_ranks,
    write_scores,
)
from evl.engine.plots import plot_confusion_matrix
from evl.io import atomic_write_text
from evl.video.dataset import EvalClips, collate_eval
from evl.video.lists import VideoEntry, read_class_names, read_list
from evl.video.sampling import SamplingConfig
from evl.video.transforms import EvalTransform, TransformConfig, build_eval_transform


@dataclass(frozen=True)
class EvalSummary(EvalResult):
    """An :class:`EvalResult` whose denominators are explicit, for lists with undecodable videos.

    * ``top1``, ``top5``, ``mean_class_accuracy``: over the ``num_videos`` videos that were decoded;
    * ``top1_listed``, ``top5_listed``: over all ``num_listed = num_videos + num_skipped`` listed videos,
      a skipped video counting as wrong (so ``top1_listed = top1 * num_videos / num_listed``).

    Without skipped videos each pair is equal. When no video decodes, ``top1`` is NaN and ``top1_listed``
    is 0. Accuracies are in percent.
    """

    num_listed: int = 0
    top1_listed: float = float("nan")
    top5_listed: float = float("nan")

    @classmethod
    def from_listed(
        cls, scores: np.ndarray, labels: np.ndarray, decoded: np.ndarray, num_classes: int
    ) -> EvalSummary:
        """From ``scores`` [N, C], ``labels`` [N] and the ``decoded`` mask [N] of all N listed videos
        (the rows of skipped videos are ignored)."""
        base = EvalResult.from_scores(
            scores[decoded], labels[decoded], num_classes, num_skipped=int((~decoded).sum())
        )
        ranks = label_ranks(scores[decoded], labels[decoded])
        listed = len(labels)

        def over_listed(k: int) -> float:
            return float(100.0 * (ranks < k).sum() / listed) if listed else float("nan")

        top1, top5 = over_listed(1), over_listed(5)
        return cls(**base.to_dict(), num_listed=listed, top1_listed=top1, top5_listed=top5)


@dataclass
class Evaluation:
    """Per-video scores (rows in list order) and the summary; undecodable videos are listed, not dropped."""

    scores: np.ndarray  # [N, C] softmax averaged over views; NaN rows for failed videos
    labels: np.ndarray  # [N]
    paths: list[str]
    result: EvalSummary
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def decoded(self) -> np.ndarray:
        return ~np.isnan(self.scores).any(axis=1)


def eval_sampling(data: DataConfig) -> SamplingConfig:
    return SamplingConfig(
        kind=data.sampling,
        num_frames=data.num_frames,
        stride=data.frame_stride,
        num_temporal_views=data.num_temporal_views,
    )


def eval_transform(model: torch.nn.Module, data: DataConfig) -> EvalTransform:
    return build_eval_transform(
        TransformConfig.from_backbone(model.vision_config, num_spatial_views=data.num_spatial_views)
    )


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def eval_loader(
    model: torch.nn.Module, entries: Sequence[VideoEntry], data: DataConfig, batch_size: int
) -> DataLoader:
    dataset = EvalClips(
        entries,
        data.data_root,
        eval_sampling(data),
        eval_transform(model, data),
        on_bad_video=data.on_bad_video,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_eval,
        **loader_options(model_device(model), data.num_workers),
    )


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


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    entries: Sequence[VideoEntry],
    data: DataConfig,
    batch_size: int = 4,
    progress: bool = True,
) -> Evaluation:
    """Scores for every entry: [N, C], one row per list entry, in list order.

    With ``data.on_bad_video == "skip"`` an undecodable video gets a NaN row and a ``failed`` record, and
    counts as wrong in ``result.top1_listed``/``top5_listed`` (see :class:`EvalSummary`); with ``"error"``
    the first one raises :class:`~evl.video.decode.VideoDecodeError`.
    """
    model.eval()
    device = model_device(model)
    num_classes = model.num_classes
    scores = np.full((len(entries), num_classes), np.nan, dtype=np.float64)
    failed: list[tuple[str, str]] = []
    paths = [""] * len(entries)
    seen = np.zeros(len(entries), dtype=bool)
    decoded = np.zeros(len(entries), dtype=bool)
    bar = tqdm(total=len(entries), desc="eval", unit="video", disable=not progress, leave=False)
    # Text methods encode their class prompts once for the whole evaluation.
    with inference_context(model):
        for batch in eval_loader(model, entries, data, batch_size):
            for index, path, reason in batch["failed"]:
                failed.append((path, reason))
                paths[index] = path
                seen[index] = True
            if batch["video"] is not None:
                video = batch["video"].to(device, non_blocking=True)  # [B, V, T, 3, S, S]
                b, v = video.shape[:2]
                logits = forward_or_none(model, video.flatten(0, 1))
                if logits is None:
                    del video
                    bar.close()
                    raise evaluation_out_of_memory(batch_size, b * v) from None
                logits = logits.float().view(b, v, -1)
                scores[batch["index"]] = average_views(logits.cpu(), mode="prob")
                for index, path in zip(batch["index"], batch["path"], strict=True):
                    paths[index] = path
                    seen[index] = decoded[index] = True
            bar.update(len(batch["failed"]) + len(batch["index"]))
    bar.close()
    if not seen.all():  # a guard on the loader contract: each video exactly once
        raise RuntimeError(f"evaluation missed {int((~seen).sum())} videos")
    labels = np.array([e.label for e in entries], dtype=np.int64)
    result = EvalSummary.from_listed(scores, labels, decoded, num_classes)
    return Evaluation(scores, labels, paths, result, failed)


def write_evaluation(
    evaluation: Evaluation, out_dir: Path, class_names: list[str], metrics_path: Path | None
) -> None:
    """Score file, confusion matrix PNG, skipped-video list and metrics JSON of one evaluation.

    ``skipped_videos.txt`` (``path<TAB>reason`` per line) is written only when a video was skipped; one left
    from an earlier evaluation into the same folder is removed, so it always describes this one.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = evaluation.decoded
    write_scores(
        out_dir / "scores.csv",
        [p for p, keep in zip(evaluation.paths, ok, strict=True) if keep],
        evaluation.labels[ok],
        evaluation.scores[ok],
    )
    preds = evaluation.scores[ok].argmax(axis=1)
    cm = confusion_matrix(preds, evaluation.labels[ok], len(class_names))
    plot_confusion_matrix(cm, class_names, out_dir / "confusion_matrix.png")
    skipped = out_dir / "skipped_videos.txt"
    if evaluation.failed:
        atomic_write_text(skipped, "".join(f"{p}\t{r}\n" for p, r in evaluation.failed))
    else:
        skipped.unlink(missing_ok=True)
    if metrics_path is not None:
        atomic_write_text(metrics_path, json.dumps(evaluation.result.to_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------------------- base-to-novel


@dataclass(frozen=True)
class BaseNovelResult:
    """The base-to-novel protocol: base videos classified among the base classes, novel videos among the
    novel classes (the model never saw them), and the harmonic mean of the two top-1 accuracies."""

    base: EvalSummary
    novel: EvalSummary
    harmonic_mean: float

    def to_dict(self) -> dict:
        return {
            "base_top1": self.base.top1,
            "novel_top1": self.novel.top1,
            "harmonic_mean": self.harmonic_mean,
            "base": self.base.to_dict(),
            "novel": self.novel.to_dict(),
        }


def evaluate_base_novel(
    model: torch.nn.Module,
    method: MethodConfig,
    split_dir: Path,
    data: DataConfig,
    batch_size: int = 4,
    progress: bool = True,
    out_dir: Path | None = None,
) -> BaseNovelResult:
    """Evaluate a text-matching model on a split written by :func:`evl.splits.write_base_novel_lists`
    (``base_val.txt`` + ``base_classes.txt``, ``novel_val.txt`` + ``novel_classes.txt``).

    The model's class list is changed for each half (and left on the novel classes). With ``out_dir``,
    each half's scores and confusion matrix go to ``out_dir/base`` and ``out_dir/novel``.
    """
    if not method_spec(method.name).reads_text:
        text_methods = ", ".join(s.name for s in METHODS.values() if s.reads_text)
        raise ValueError(
            "base-to-novel evaluation: novel classes can only be predicted by a text-matching method "
            f"({text_methods}), not by {method.name}'s fixed classifier"
        )
    results = {}
    for half in ("base", "novel"):
        val_list, classes_file = split_dir / f"{half}_val.txt", split_dir / f"{half}_classes.txt"
        for path in (val_list, classes_file):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: not found (write the split with 'evl splits base-novel')")
        classes = read_class_names(classes_file)
        set_classes(model, method, classes)
        entries = read_list(val_list, num_classes=len(classes), data_root=data.data_root)
        evaluation = evaluate(model, entries, data, batch_size=batch_size, progress=progress)
        if out_dir is not None:
            write_evaluation(evaluation, out_dir / half, classes, out_dir / half / "metrics.json")
        results[half] = evaluation.result
    base, novel = results["base"], results["novel"]
    return BaseNovelResult(base, novel, harmonic_mean(base.top1, novel.top1))
