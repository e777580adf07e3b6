"""Video-level metrics, score files and score ensembling.

Pure functions over numpy arrays (torch tensors are accepted and converted). Scores are ``[N, C]``: one
row per video, one column per class; labels are ``[N]`` integers. Accuracies are in percent.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from evl.io import atomic_write_text


def _numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """A numpy view of an array-like or (CPU or GPU) tensor."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _check_scores(scores: np.ndarray, labels: np.ndarray, name: str) -> None:
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"{name}: expected scores [N, C] and labels [N], got {scores.shape}, {labels.shape}")


def average_views(logits: Any, mode: str = "prob") -> np.ndarray:
    """Merge the views of each video: ``[N, V, C]`` -> ``[N, C]``.

    ``"prob"``: softmax over classes, then mean over views (official EVL and mmaction2 behaviour);
    ``"sigmoid"``: each class's sigmoid, then mean over views (SigLIP's scores: classes scored apart);
    ``"logit"``: mean of the raw logits.
    """
    x = _numpy(logits, np.float64)
    if x.ndim != 3:
        raise ValueError(f"average_views: expected [N, V, C], got shape {x.shape}")
    if mode == "logit":
        return x.mean(axis=1)
    if mode == "sigmoid":
        return (1.0 / (1.0 + np.exp(-x))).mean(axis=1)
    if mode != "prob":
        raise ValueError(f"average_views: mode must be 'prob', 'sigmoid' or 'logit', got {mode!r}")
    x = np.exp(x - x.max(axis=-1, keepdims=True))  # shifted for numerical stability
    return (x / x.sum(axis=-1, keepdims=True)).mean(axis=1)


def label_ranks(scores: Any, labels: Any) -> np.ndarray:
    """0-based rank of each true label among the classes, ``[N, C]`` x ``[N]`` -> ``[N]``.

    Ties are broken towards the lower class index, as ``argmax`` does, so rank 0 means "the argmax
    prediction is right" and top-k and the confusion matrix agree on tied scores.
    """
    scores, labels = _numpy(scores, np.float64), _numpy(labels, np.int64)
    _check_scores(scores, labels, "label_ranks")
    rows = np.arange(len(labels))
    target = scores[rows, labels][:, None]  # [N, 1]
    lower_index = np.arange(scores.shape[1])[None, :] < labels[:, None]  # [N, C]
    return ((scores > target) | ((scores == target) & lower_index)).sum(axis=1)


def topk_accuracy(scores: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` in percent; a k larger than the class count counts every video right.

    NaN when there are no videos.
    """
    ranks = label_ranks(scores, labels)
    if len(ranks) == 0:
        return {f"top{k}": float("nan") for k in ks}
    return {f"top{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def mean_class_accuracy(scores: Any, labels: Any, num_classes: int) -> float:
    """Mean over the classes present in ``labels`` of the per-class recall, in percent."""
    scores, labels = _numpy(scores, np.float64), _numpy(labels, np.int64)
    _check_scores(scores, labels, "mean_class_accuracy")
    if len(labels) == 0:
        return float("nan")
    cm = confusion_matrix(scores.argmax(axis=1), labels, num_classes)
    support = cm.sum(axis=1)
    present = support > 0  # a class with no video has no recall; averaging a 0 in would be wrong
    return float(100.0 * np.mean(np.diag(cm)[present] / support[present]))


def confusion_matrix(preds: Any, labels: Any, num_classes: int) -> np.ndarray:
    """int64 ``[C, C]`` counts; rows are true classes, columns predicted ones."""
    preds, labels = _numpy(preds, np.int64).ravel(), _numpy(labels, np.int64).ravel()
    if preds.shape != labels.shape:
        raise ValueError(f"confusion_matrix: {preds.shape[0]} predictions for {labels.shape[0]} labels")
    for name, values in (("preds", preds), ("labels", labels)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"confusion_matrix: {name} outside [0, {num_classes}): {values.min()}, {values.max()}"
            )
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


@dataclass(frozen=True)
class EvalResult:
    """Summary of one evaluation; accuracies in percent."""

    top1: float
    top5: float
    mean_class_accuracy: float
    num_videos: int
    num_skipped: int = 0

    @classmethod
    def from_scores(cls, scores: Any, labels: Any, num_classes: int, num_skipped: int = 0) -> EvalResult:
        """Compute every field from video-level ``scores`` [N, C] and ``labels`` [N]."""
        topk = topk_accuracy(scores, labels, ks=(1, 5))
        return cls(
            top1=topk["top1"],
            top5=topk["top5"],
            mean_class_accuracy=mean_class_accuracy(scores, labels, num_classes),
            num_videos=len(_numpy(labels)),
            num_skipped=num_skipped,
        )

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# Base-to-novel (the ViFi-CLIP protocol)


def harmonic_mean(base_acc: float, novel_acc: float) -> float:
    """HM = 2ab / (a + b), the base-to-novel summary; 0 when both are 0. Any unit (percent or fraction)."""
    if base_acc < 0 or novel_acc < 0:
        raise ValueError(f"accuracies must be non-negative, got {base_acc} and {novel_acc}")
    total = base_acc + novel_acc
    return 0.0 if total == 0 else 2.0 * base_acc * novel_acc / total


def _subset_accuracy(scores: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> float:
    """Top-1 in percent of the videos of classes ``ids``, choosing among ``ids`` only (NaN if none)."""
    rows = np.isin(labels, ids)
    if not rows.any():
        return float("nan")
    preds = ids[scores[rows][:, ids].argmax(axis=1)]  # [n]
    return float(100.0 * np.mean(preds == labels[rows]))


def base_novel_accuracy(
    scores: Any, labels: Any, base_ids: Sequence[int], novel_ids: Sequence[int]
) -> dict[str, float]:
    """Base, novel and harmonic-mean top-1 (percent) from scores over all classes.

    ``scores`` [N, K] and ``labels`` [N] use global class ids. As in ViFi-CLIP, base videos are classified
    among the base classes only and novel videos among the novel classes only (videos of other classes
    are ignored). For CLIP-style models, whose per-class logits do not depend on the other classes, this
    equals evaluating the base and novel subsets separately.
    """
    scores, labels = _numpy(scores, np.float64), _numpy(labels, np.int64)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"expected scores [N, K] and labels [N], got {scores.shape} and {labels.shape}")
    # Sorted, so that a tie goes to the lower class id whatever order the ids come in (as top-k does).
    base, novel = np.unique(np.asarray(base_ids, np.int64)), np.unique(np.asarray(novel_ids, np.int64))
    if len(base) == 0 or len(novel) == 0:
        raise ValueError("base_ids and novel_ids must both be non-empty")
    if np.intersect1d(base, novel).size:
        raise ValueError(f"classes {np.intersect1d(base, novel).tolist()[:5]} are both base and novel")
    both = np.concatenate([base, novel])
    if both.min() < 0 or both.max() >= scores.shape[1]:
        raise ValueError(f"class ids must be in 0..{scores.shape[1] - 1} for scores with that many columns")
    base_acc = _subset_accuracy(scores, labels, base)
    novel_acc = _subset_accuracy(scores, labels, novel)
    hm = float("nan") if math.isnan(base_acc) or math.isnan(novel_acc) else harmonic_mean(base_acc, novel_acc)
    return {"base": base_acc, "novel": novel_acc, "hm": hm}


# ----------------------------------------------------------------------------------------------------------
# Score files and ensembling


class ScoreFile(NamedTuple):
    """Contents of a score file: video paths, labels ``[N]`` and scores ``[N, C]``."""

    paths: list[str]
    labels: np.ndarray
    scores: np.ndarray


def write_scores(path: str | Path, video_paths: Sequence[str], labels: Any, scores: Any) -> Path:
    """Write per-video scores as CSV ``path,label,score_0..score_{C-1}`` (atomically).

    Floats are written with ``repr``, which reads back bit-exact.
    """
    labels, scores = _numpy(labels, np.int64), _numpy(scores, np.float64)
    _check_scores(scores, labels, "write_scores")
    if len(video_paths) != len(labels):
        raise ValueError(f"write_scores: {len(video_paths)} paths for {len(labels)} labels")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", *(f"score_{c}" for c in range(scores.shape[1]))])
    for video, label, row in zip(video_paths, labels, scores, strict=True):
        writer.writerow([str(video), int(label), *(repr(float(s)) for s in row)])
    return atomic_write_text(path, buffer.getvalue())


def read_scores(path: str | Path) -> ScoreFile:
    """Read a file written by :func:`write_scores`."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["path", "label"]:
        raise ValueError(f"{path}: not a score file (expected a header 'path,label,score_0,...')")
    num_classes = len(rows[0]) - 2
    body = rows[1:]
    for line, row in enumerate(body, start=2):
        if len(row) != num_classes + 2:
            raise ValueError(f"{path}:{line}: expected {num_classes + 2} fields, got {len(row)}")
    labels = np.array([int(row[1]) for row in body], dtype=np.int64)
    scores = np.array([[float(v) for v in row[2:]] for row in body], dtype=np.float64)
    return ScoreFile([row[0] for row in body], labels, scores.reshape(len(body), num_classes))


def ensemble_scores(scores: Sequence[Any], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted average of several ``[N, C]`` score arrays (equal weights by default).

    Weights must be non-negative with a positive sum; they are divided by their sum, so ``(3, 1)`` means
    ``(0.75, 0.25)``. A negative weight would subtract one model's belief from another's, which is not a
    fusion the paper's search ever returns.
    """
    arrays = [_numpy(s, np.float64) for s in scores]
    if not arrays or any(a.ndim != 2 or a.shape != arrays[0].shape for a in arrays):
        shapes = [a.shape for a in arrays]
        raise ValueError(f"ensemble_scores: need one or more [N, C] arrays of one shape, got {shapes}")
    return _fuse(np.stack(arrays), _normalised_weights(weights, len(arrays)))


def _normalised_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
    w = np.ones(count) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (count,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"ensemble weights: need {count} non-negative numbers with a positive sum, got {weights}"
        )
    return w / w.sum()


def _fuse(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[M, N, C]`` x ``[M]`` -> ``[N, C]``; the one place fused scores are computed, so a weight search and
    the final fusion at the weights it found give bit-identical scores (and argmax ties)."""
    return np.tensordot(weights, stacked, axes=1)


# A grid larger than this is a typo (a step of 0.001 over 5 models is 8e12 points), not a search.
MAX_GRID_POINTS = 200_000


def simplex_grid(num_members: int, step: float) -> np.ndarray:
    """Every weight vector on a grid of ``step`` whose entries sum to 1, ``[G, num_members]``, in order of
    preference: the most even first (smallest sum of squares), then more weight on earlier members.

    Two members give ``(w, 1 - w)`` for w = 0, step, ..., 1. ``step`` must divide 1 (0.1, 0.05, 0.25, ...),
    or the grid could not reach the sums it is meant to search.
    """
    if num_members < 1:
        raise ValueError(f"simplex_grid: need one or more members, got {num_members}")
    if not 0 < step <= 1:
        raise ValueError(f"weight search step must be in (0, 1], got {step}")
    parts = round(1.0 / step)
    if abs(parts * step - 1.0) > 1e-9:
        raise ValueError(f"weight search step must divide 1 (0.1, 0.05, 0.2, 0.25, ...), got {step}")
    size = math.comb(parts + num_members - 1, num_members - 1)
    if size > MAX_GRID_POINTS:
        raise ValueError(
            f"a weight search at step {step} over {num_members} members has {size} grid points "
            f"(at most {MAX_GRID_POINTS}): use a coarser step"
        )
    counts = np.array(list(_compositions(parts, num_members)), dtype=np.int64)  # [G, M], rows sum to parts
    # Integer keys, so that the order (and with it the tie rule) does not depend on rounding.
    evenness = (counts**2).sum(axis=1).tolist()
    order = sorted(range(len(counts)), key=lambda g: (evenness[g], *(-counts[g]).tolist()))
    # linspace-style division, not accumulated steps: 3 * 0.1 would be 0.30000000000000004.
    return counts[order] / parts


def _compositions(total: int, parts: int):
    """Tuples of ``parts`` non-negative integers summing to ``total``."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


class WeightSearchResult(NamedTuple):
    """The best grid point: its weights (summing to 1), its top-1 in percent, and how many grid points
    reached that top-1 (more than one: the tie rule of :func:`simplex_grid` chose among them)."""

    weights: tuple[float, ...]
    top1: float
    num_tied: int


def search_ensemble_weights(scores: Sequence[Any], labels: Any, step: float = 0.1) -> WeightSearchResult:
    """Grid-search the weights of :func:`ensemble_scores` over the simplex, maximising top-1.

    The paper searches steps of 0.1 on the validation set for two models (``w`` and ``1 - w``); more
    members search every combination summing to 1. Of the weights with the best top-1 the most even one
    wins, then the one with more weight on earlier members (see :func:`simplex_grid`): deterministic, and
    on a plateau the least committed choice. The top-1 found is optimistic on the videos searched on;
    report it on others.
    """
    arrays = [_numpy(s, np.float64) for s in scores]
    labels = _numpy(labels, np.int64)
    for a in arrays:
        _check_scores(a, labels, "search_ensemble_weights")
    if len({a.shape for a in arrays}) != 1 or len(labels) == 0:
        raise ValueError("search_ensemble_weights: need score arrays of one shape [N, C] with N > 0")
    stacked = np.stack(arrays)
    grid = simplex_grid(len(arrays), step)
    # Normalised as ensemble_scores normalises, so that fusing at the weights returned reproduces these
    # scores. argmax, as label_ranks: a tie between classes goes to the lower index. Right answers are
    # counted in integers, so that an equal top-1 compares equal.
    fused = (_fuse(stacked, _normalised_weights(w, len(arrays))) for w in grid)
    correct = np.array([int((f.argmax(axis=1) == labels).sum()) for f in fused])
    best = int(np.argmax(correct))  # the first maximum: the grid is in order of preference
    top1 = float(100.0 * correct[best] / len(labels))
    return WeightSearchResult(
        tuple(float(x) for x in grid[best]), top1, int((correct == correct[best]).sum())
    )
