"""Multi-view evaluation: every video once, softmax averaged over its temporal x spatial views."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from evl.config import DataConfig
from evl.engine.checkpoint import atomic_write_text
from evl.engine.metrics import EvalResult, average_views, confusion_matrix, write_scores
from evl.engine.plots import plot_confusion_matrix
from evl.models.evl import EVL
from evl.video.dataset import EvalClips, collate_eval
from evl.video.lists import VideoEntry
from evl.video.sampling import SamplingConfig
from evl.video.transforms import EvalTransform, TransformConfig, build_eval_transform


@dataclass
class Evaluation:
    """Per-video scores (rows in list order) and the summary; undecodable videos are listed, not dropped."""

    scores: np.ndarray  # [N, C] softmax averaged over views; NaN rows for failed videos
    labels: np.ndarray  # [N]
    paths: list[str]
    result: EvalResult
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


def eval_transform(model: EVL, data: DataConfig) -> EvalTransform:
    return build_eval_transform(
        TransformConfig.from_backbone(model.config.backbone, num_spatial_views=data.num_spatial_views)
    )


def eval_loader(model: EVL, entries: Sequence[VideoEntry], data: DataConfig, batch_size: int) -> DataLoader:
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
        num_workers=data.num_workers,
        collate_fn=collate_eval,
        persistent_workers=False,
    )


@torch.no_grad()
def evaluate(
    model: EVL,
    entries: Sequence[VideoEntry],
    data: DataConfig,
    batch_size: int = 4,
    progress: bool = True,
) -> Evaluation:
    """Scores for every entry: [N, C], one row per list entry, in list order."""
    model.eval()
    device = next(model.decoder.parameters()).device
    num_classes = model.config.decoder.num_classes
    scores = np.full((len(entries), num_classes), np.nan, dtype=np.float64)
    failed: list[tuple[str, str]] = []
    paths = [""] * len(entries)
    seen = np.zeros(len(entries), dtype=bool)
    bar = tqdm(total=len(entries), desc="eval", unit="video", disable=not progress, leave=False)
    for batch in eval_loader(model, entries, data, batch_size):
        for index, path, reason in batch["failed"]:
            failed.append((path, reason))
            paths[index] = path
            seen[index] = True
        if batch["video"] is not None:
            video = batch["video"].to(device, non_blocking=True)  # [B, V, T, 3, S, S]
            b, v = video.shape[:2]
            logits = model(video.flatten(0, 1)).float().view(b, v, -1)
            scores[batch["index"]] = average_views(logits.cpu(), mode="prob")
            for index, path in zip(batch["index"], batch["path"], strict=True):
                paths[index] = path
                seen[index] = True
        bar.update(len(batch["failed"]) + len(batch["index"]))
    bar.close()
    if not seen.all():  # a guard on the loader contract: each video exactly once
        raise RuntimeError(f"evaluation missed {int((~seen).sum())} videos")
    labels = np.array([e.label for e in entries], dtype=np.int64)
    decoded = ~np.isnan(scores).any(axis=1)
    result = EvalResult.from_scores(scores[decoded], labels[decoded], num_classes, num_skipped=len(failed))
    return Evaluation(scores, labels, paths, result, failed)


def write_evaluation(
    evaluation: Evaluation, out_dir: Path, class_names: list[str], metrics_path: Path | None
) -> None:
    """Score file, confusion matrix PNG, skipped-video list and metrics JSON of one evaluation."""
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
    if evaluation.failed:
        atomic_write_text(
            out_dir / "skipped_videos.txt", "".join(f"{p}\t{r}\n" for p, r in evaluation.failed)
        )
    if metrics_path is not None:
        atomic_write_text(metrics_path, json.dumps(evaluation.result.to_dict(), indent=2) + "\n")
