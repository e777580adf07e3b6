"""Multi-view evaluation: every video once, softmax averaged over its temporal x spatial views; and the
protocols over several lists (base-to-novel, cross-dataset splits).

A listed video that cannot be decoded (policy ``skip``) is never dropped silently: it is listed in
``skipped_videos.txt``, counted in ``num_skipped``, and the accuracies are given over both denominators
(see :class:`EvalSummary`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from evl.config import DataConfig, MethodConfig
from evl.engine.loading import loader_options
from evl.engine.methods import METHODS, method_spec, set_classes
from evl.engine.metrics import (
    EvalResult,
    confusion_matrix,
    harmonic_mean,
    label_ranks,
    write_scores,
)
from evl.engine.plots import plot_confusion_matrix
from evl.engine.scoring import evaluation_out_of_memory as evaluation_out_of_memory
from evl.engine.scoring import forward_or_none as forward_or_none
from evl.engine.scoring import model_device as model_device
from evl.engine.scoring import score_batches
from evl.io import atomic_write_text
from evl.splits import read_split_set
from evl.video.dataset import EvalClips, EvalViews, collate_eval
from evl.video.lists import VideoEntry, read_class_names, read_list


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

    @classmethod
    def summarised(
        cls,
        scores: np.ndarray,
        labels: np.ndarray,
        paths: list[str],
        failed: list[tuple[str, str]],
        decoded: np.ndarray | None = None,
    ) -> Evaluation:
        """The evaluation of all listed videos' ``scores`` [N, C]; ``decoded`` [N] marks the rows that were
        scored (default: the rows without NaN)."""
        if decoded is None:
            decoded = ~np.isnan(scores).any(axis=1)
        result = EvalSummary.from_listed(scores, labels, decoded, scores.shape[1])
        return cls(scores, labels, paths, result, failed)


def entry_labels(entries: Sequence[VideoEntry]) -> np.ndarray:
    return np.array([e.label for e in entries], dtype=np.int64)


def eval_loader(
    model: torch.nn.Module, entries: Sequence[VideoEntry], data: DataConfig, batch_size: int
) -> DataLoader:
    dataset = EvalClips(
        entries,
        data.data_root,
        EvalViews.for_encoder(data, model.vision_config),
        on_bad_video=data.on_bad_video,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_eval,
        **loader_options(model_device(model), data.num_workers),
    )


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
    scored = score_batches(
        model,
        eval_loader(model, entries, data, batch_size),
        len(entries),
        model.num_classes,
        batch_size=batch_size,
        progress=progress,
    )
    if not scored.seen.all():  # a guard on the loader contract: each video exactly once
        raise RuntimeError(f"evaluation missed {int((~scored.seen).sum())} videos")
    return Evaluation.summarised(
        scored.scores, entry_labels(entries), scored.paths, scored.failed, scored.scored
    )


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


# ----------------------------------------------------------------------------------------- cross-dataset

# X-CLIP and ViFi-CLIP report "mean ± std" over three splits without saying which standard deviation, and
# neither's released code computes it; the multi-split zero-shot code of the field takes np.std of the
# split accuracies, the population one, so this does too (the sample one is reported beside it).
SPLIT_STD_DDOF = 0


def mean_std(values: Sequence[float], ddof: int = SPLIT_STD_DDOF) -> tuple[float, float]:
    """Mean and standard deviation of per-split accuracies; ``ddof`` 0 is the population standard
    deviation, 1 the sample one (NaN with no more than ``ddof`` values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    mean = float(x.mean())
    if x.size <= ddof:
        return mean, float("nan")
    return mean, float(np.sqrt(np.sum((x - mean) ** 2) / (x.size - ddof)))


@dataclass(frozen=True)
class CrossDatasetResult:
    """Every split of a cross-dataset set (each classified among its own classes), and mean ± std.

    The mean and std are over the splits' ``top1_listed`` / ``top5_listed``: a video that cannot be decoded
    counts as wrong in its split, so a split none of whose videos decode counts 0 (its ``top1`` is NaN).
    The protocol's figure then stays a mean over all its splits and never gains from missing videos;
    without skipped videos these are the splits' plain top-1 / top-5, the papers' figures.
    """

    names: tuple[str, ...]
    num_classes: tuple[int, ...]
    results: tuple[EvalSummary, ...]
    kind: str  # "drawn" or "published", from protocol.json

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in ("top1", "top5"):
            values = [getattr(result, f"{k}_listed") for result in self.results]
            out[f"{k}_mean"], out[f"{k}_std"] = mean_std(values)
            out[f"{k}_std_sample"] = mean_std(values, ddof=1)[1]
        return out

    def to_dict(self) -> dict:
        return {
            **self.summary(),
            "std": "population" if SPLIT_STD_DDOF == 0 else "sample",
            "kind": self.kind,
            "num_splits": len(self.results),
            "num_listed": sum(result.num_listed for result in self.results),
            "num_skipped": sum(result.num_skipped for result in self.results),
            "splits": [
                {"name": name, "num_classes": count, **result.to_dict()}
                for name, count, result in zip(self.names, self.num_classes, self.results, strict=True)
            ],
        }


def evaluate_cross_dataset(
    model: torch.nn.Module,
    method: MethodConfig,
    split_dir: Path,
    data: DataConfig,
    batch_size: int = 4,
    progress: bool = True,
    out_dir: Path | None = None,
) -> CrossDatasetResult:
    """Evaluate a text-matching model on every split of a set written by ``evl splits cross-dataset``
    (:func:`evl.splits.read_split_set`), each split's videos among that split's classes.

    The model's class list is changed for each split (and left on the last). ``data.data_root`` is where the
    lists' paths are relative to. With ``out_dir``, each split's scores, confusion matrix and metrics go to
    ``out_dir/<split name>``.
    """
    if not method_spec(method.name).reads_text:
        text_methods = ", ".join(s.name for s in METHODS.values() if s.reads_text)
        raise ValueError(
            "cross-dataset evaluation: another dataset's classes can only be predicted by a text-matching "
            f"method ({text_methods}), not by {method.name}'s fixed classifier"
        )
    split_set = read_split_set(split_dir)
    names, counts, results = [], [], []
    for split in split_set.splits:
        classes = read_class_names(split.classes)
        set_classes(model, method, classes)
        entries = read_list(split.val_list, num_classes=len(classes), data_root=data.data_root)
        evaluation = evaluate(model, entries, data, batch_size=batch_size, progress=progress)
        if out_dir is not None:
            folder = out_dir / split.name
            write_evaluation(evaluation, folder, classes, folder / "metrics.json")
        names.append(split.name)
        counts.append(len(classes))
        results.append(evaluation.result)
    kind = str(split_set.meta.get("kind", "unknown"))
    return CrossDatasetResult(tuple(names), tuple(counts), tuple(results), kind)
