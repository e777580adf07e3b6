"""Score fusion across runs, as the EVL paper combines models (Tables 10, 11, 13, 14): a weighted average
of video-level scores, the weights searched on a grid (steps of 0.1 in the paper) on validation videos.

Members are score files (``scores.csv`` of ``evl eval``) of any method: EVL, ViFi-CLIP, X-CLIP and
zero-shot CLIP all write per-video class probabilities. The files must list the same videos in the same
order with the same labels and class count; the first difference is refused, naming file, line and what
differs. Nothing is reordered or dropped to make files agree, since then the members' own accuracies and
the ensemble's would be over different videos than the runs reported. A non-finite score row is refused
too: ``evl eval`` leaves a video it could not decode out of ``scores.csv`` (and lists it in
``skipped_videos.txt``), so such a row comes from elsewhere, and dropping it silently would shift the
denominator. A video skipped in one run but not in another shows as a video missing from one file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evl.engine.metrics import (
    EvalResult,
    ScoreFile,
    ensemble_scores,
    read_scores,
    search_ensemble_weights,
    write_scores,
)
from evl.io import atomic_write_text

log = logging.getLogger(__name__)

# A row of class probabilities sums to 1; further off than this, the file holds something else (logits,
# per-class sigmoids), and averaging it with probabilities mixes scales.
_PROBABILITY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Member:
    """One fused score file: its weight (the weights sum to 1) and its own accuracy on the same videos."""

    file: str
    weight: float
    result: EvalResult

    def to_dict(self) -> dict:
        return {"file": self.file, "weight": self.weight, **self.result.to_dict()}


@dataclass(frozen=True)
class WeightSearch:
    """How the weights were found: the grid step, the files searched on and the top-1 there.

    ``num_shared`` counts the searched videos that are also among the fused ones: when it is not 0, the
    ensemble's accuracy was partly chosen on the videos it is reported on, and is optimistic.
    """

    step: float
    files: tuple[str, ...]
    top1: float
    num_videos: int
    num_tied: int
    num_shared: int

    @property
    def optimistic(self) -> bool:
        return self.num_shared > 0

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "files": list(self.files),
            "top1": self.top1,
            "num_videos": self.num_videos,
            "num_tied": self.num_tied,
            "num_shared": self.num_shared,
            "optimistic": self.optimistic,
        }


@dataclass(frozen=True)
class Ensemble:
    """The fused scores (``fused``: same videos, labels and order as every member), their accuracy, the
    members with their weights and own accuracy, and the weight search (None for given weights)."""

    fused: ScoreFile
    result: EvalResult
    members: tuple[Member, ...]
    search: WeightSearch | None

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(m.weight for m in self.members)

    def to_dict(self) -> dict:
        return {
            **self.result.to_dict(),
            "weights": list(self.weights),
            "members": [m.to_dict() for m in self.members],
            "search": None if self.search is None else self.search.to_dict(),
        }


def score_file_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/scores.csv`` for a folder (the out dir of ``evl eval``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "scores.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such score file")
    return path


def load_aligned(paths: Sequence[str | Path]) -> list[ScoreFile]:
    """Read score files that must describe the same videos; raise ValueError at the first difference."""
    if len(paths) < 2:
        raise ValueError(f"an ensemble needs two or more score files, got {len(paths)}")
    files = [score_file_path(p) for p in paths]
    scores = [read_scores(p) for p in files]
    for path, score in zip(files, scores, strict=True):
        check_scores_finite(path, score)
    for path, score in zip(files[1:], scores[1:], strict=True):
        check_same_videos(files[0], scores[0], path, score)
    for path, score in zip(files, scores, strict=True):
        _warn_if_not_probabilities(path, score)
    return scores


def _line(row: int) -> int:
    """The file line of data row ``row`` (0-based; line 1 is the header), as ``read_scores`` counts."""
    return row + 2


def check_scores_finite(path: Path, score: ScoreFile) -> None:
    if len(score.paths) == 0:
        raise ValueError(f"{path}: no videos")
    bad = ~np.isfinite(score.scores).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"{path}:{_line(row)}: non-finite score for {score.paths[row]!r} ({int(bad.sum())} such rows); "
            "rows of videos that were not scored are refused, not dropped: leave them out of every file"
        )


def check_same_videos(ref_path: Path, ref: ScoreFile, path: Path, score: ScoreFile) -> None:
    """``score`` must have ``ref``'s class count and, row for row, its videos and labels."""
    if score.scores.shape[1] != ref.scores.shape[1]:
        raise ValueError(f"{path}: {score.scores.shape[1]} classes, but {ref_path} has {ref.scores.shape[1]}")
    for row, (mine, theirs) in enumerate(zip(score.paths, ref.paths, strict=False)):
        if mine != theirs:
            raise ValueError(f"{path}:{_line(row)}: {_video_difference(mine, theirs, ref_path, ref, score)}")
    if len(score.paths) != len(ref.paths):
        (longer, more), (shorter, fewer) = sorted(
            ((path, score), (ref_path, ref)), key=lambda f: -len(f[1].paths)
        )
        row = len(fewer.paths)
        raise ValueError(
            f"{longer}:{_line(row)}: video {more.paths[row]!r} is not in {shorter} "
            f"({len(more.paths)} videos against {len(fewer.paths)})"
        )
    differs = score.labels != ref.labels
    if differs.any():
        row = int(np.argmax(differs))
        raise ValueError(
            f"{path}:{_line(row)}: label {int(score.labels[row])} for {score.paths[row]!r}, "
            f"but {ref_path} has {int(ref.labels[row])}"
        )


def _video_difference(mine: str, theirs: str, ref_path: Path, ref: ScoreFile, score: ScoreFile) -> str:
    """What the first differing row says: another order, a video missing on one side, or other videos."""
    if sorted(score.paths) == sorted(ref.paths):
        return f"video {mine!r} where {ref_path} has {theirs!r}: the same videos in another order"
    if theirs not in score.paths:
        return (
            f"video {mine!r} where {ref_path} has {theirs!r}, which this file lacks "
            "(a video skipped when one run was evaluated?)"
        )
    return f"video {mine!r} where {ref_path} has {theirs!r}"


def _warn_if_not_probabilities(path: Path, score: ScoreFile) -> None:
    sums = score.scores.sum(axis=1)
    off = np.abs(sums - 1.0) > _PROBABILITY_TOLERANCE
    if off.any():
        row = int(np.argmax(off))
        log.warning(
            "%s:%d: scores sum to %.4g, not 1: not class probabilities, so averaging them with other "
            "files mixes scales",
            path,
            _line(row),
            sums[row],
        )


def ensemble_files(
    paths: Sequence[str | Path],
    weights: Sequence[float] | None = None,
    search_step: float | None = None,
    search_on: Sequence[str | Path] | None = None,
) -> Ensemble:
    """Fuse the score files ``paths`` (one per member, folders of ``evl eval`` allowed).

    Weights: ``weights`` as given (normalised to sum 1); or, with ``search_step``, searched on a grid of
    that step over the simplex maximising top-1 (see :func:`evl.engine.metrics.search_ensemble_weights`),
    on ``paths`` themselves or on ``search_on`` (one file per member, in the same order: e.g. the same runs
    scored on other videos); neither: equal weights. A search on the fused videos logs a warning that the
    accuracy is optimistic.
    """
    if weights is not None and (search_step is not None or search_on is not None):
        raise ValueError("give ensemble weights or search them, not both")
    if search_on is not None and search_step is None:
        raise ValueError("a search set needs a search step")
    members = load_aligned(paths)
    names = [str(score_file_path(p)) for p in paths]
    if weights is not None and len(weights) != len(paths):
        raise ValueError(f"{len(weights)} weights for {len(paths)} score files")
    search = None
    if search_step is not None:
        weights, search = _search(names, members, search_step, search_on)
    fused_scores = ensemble_scores([m.scores for m in members], weights)
    reference = members[0]
    num_classes = reference.scores.shape[1]
    total = sum(weights) if weights is not None else len(members)
    normalised = [1.0 / len(members)] * len(members) if weights is None else [w / total for w in weights]
    return Ensemble(
        fused=ScoreFile(list(reference.paths), reference.labels.copy(), fused_scores),
        result=EvalResult.from_scores(fused_scores, reference.labels, num_classes),
        members=tuple(
            Member(name, float(w), EvalResult.from_scores(m.scores, m.labels, num_classes))
            for name, w, m in zip(names, normalised, members, strict=True)
        ),
        search=search,
    )


def _search(
    names: list[str], members: list[ScoreFile], step: float, search_on: Sequence[str | Path] | None
) -> tuple[tuple[float, ...], WeightSearch]:
    if search_on is None:
        search_names, search_files = names, members
    else:
        if len(search_on) != len(members):
            raise ValueError(
                f"{len(search_on)} files to search the weights on for {len(members)} score files: "
                "give one per member, in the same order"
            )
        search_names = [str(score_file_path(p)) for p in search_on]
        search_files = load_aligned(search_on)
        if search_files[0].scores.shape[1] != members[0].scores.shape[1]:
            raise ValueError(
                f"{search_names[0]}: {search_files[0].scores.shape[1]} classes, but {names[0]} has "
                f"{members[0].scores.shape[1]}"
            )
    labels = search_files[0].labels
    found = search_ensemble_weights([f.scores for f in search_files], labels, step)
    shared = len(set(search_files[0].paths) & set(members[0].paths))
    search = WeightSearch(
        step=step,
        files=tuple(search_names),
        top1=found.top1,
        num_videos=len(labels),
        num_tied=found.num_tied,
        num_shared=shared,
    )
    if search.optimistic:
        log.warning(
            "the weights were searched on %d of the %d fused videos: the ensemble's accuracy is optimistic "
            "(search on other videos to report it)",
            shared,
            len(members[0].paths),
        )
    return found.weights, search


def write_ensemble(ensemble: Ensemble, out_dir: str | Path) -> Path:
    """``scores.csv`` (the fused scores, readable by ``read_scores``) and ``metrics.json`` in ``out_dir``;
    returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fused = ensemble.fused
    write_scores(out_dir / "scores.csv", fused.paths, fused.labels, fused.scores)
    atomic_write_text(out_dir / "metrics.json", json.dumps(ensemble.to_dict(), indent=2) + "\n")
    return out_dir
