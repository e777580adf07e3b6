"""Training lists from a folder of one's own videos: check every file, split by class, write the lists.

``lists_from_folder(FOLDER, OUT)`` finds the videos (:mod:`evl.video.folders`), checks each in parallel
(:mod:`evl.video.checks`), leaves out the ones that cannot be trained on, and writes into ``OUT``:

* ``train.txt`` and ``val.txt``: ``relpath label`` lines, paths relative to ``FOLDER`` (the data root);
* ``classes.txt``: the class-folder names, sorted; a class's label is its line number from 0;
* ``skipped.txt``: ``path: reason`` for every video left out (unreadable, outside a class folder, or a path
  a list file cannot hold); empty when none was;
* ``summary.csv``: one row per video checked: path, class, split, frames, fps, seconds, width, height,
  codec, ok, reason.

In the one-folder-per-class layout the validation set is drawn per class (stratified) from a seed: a video's
rank within its class is the SHA-256 of ``"{seed}:{path}"``, so the split depends on nothing but the seed
and the paths (not on the listing order, the worker count or the other classes), and adding a video to
one class leaves the other classes' splits as they were. In the ``train/`` + ``val/`` layout that split is
kept as it is.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evl.io import atomic_write_text
from evl.video.checks import VideoCheck, check_videos
from evl.video.folders import FoundVideo, scan_folder
from evl.video.lists import VideoEntry, write_class_names, write_list

__all__ = [
    "OUTPUT_FILES",
    "ClassSummary",
    "FolderLists",
    "format_summary",
    "lists_from_folder",
    "stratified_split",
    "val_count",
]

PathLike = str | os.PathLike

OUTPUT_FILES = ("train.txt", "val.txt", "classes.txt", "skipped.txt", "summary.csv")
SUMMARY_COLUMNS = (
    "path", "class", "split", "frames", "fps", "seconds", "width", "height", "codec", "ok", "reason",
)  # fmt: skip


@dataclass(frozen=True)
class ClassSummary:
    """One class's videos in the lists (train + val), their length, and how many were left out."""

    name: str
    label: int
    train: int
    val: int
    seconds: float
    skipped: int

    @property
    def videos(self) -> int:
        return self.train + self.val

    @property
    def hours(self) -> float:
        return self.seconds / 3600


@dataclass(frozen=True)
class FolderLists:
    """Where :func:`lists_from_folder` wrote, and what. ``val_list`` is None when no video went there."""

    data_root: Path
    layout: str
    train_list: Path
    val_list: Path | None
    classes_file: Path
    skipped_file: Path
    summary_file: Path
    classes: list[str]
    summary: list[ClassSummary]
    skipped: list[tuple[str, str]]


def lists_from_folder(
    folder: PathLike,
    out_dir: PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> FolderLists:
    """Check the videos under ``folder`` and write its lists into ``out_dir`` (see the module docstring).

    ``val_fraction`` of each class goes to validation (see :func:`val_count`); it is not used when ``folder``
    holds its own ``train/`` and ``val/``. Files of :data:`OUTPUT_FILES` already in ``out_dir`` are an
    error unless ``overwrite``: a list someone wrote by hand is never replaced unasked.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    scan = scan_folder(folder)
    out = Path(out_dir)
    _check_outputs_free(out, overwrite)

    listable = [video for video in scan.videos if _fits_plain_list(video.path)]
    skipped = list(scan.unplaced)
    skipped += [(video.path, _UNLISTABLE) for video in scan.videos if not _fits_plain_list(video.path)]
    checks = check_videos([scan.root / video.path for video in listable], workers, progress)
    skipped += [
        (video.path, check.reason) for video, check in zip(listable, checks, strict=True) if not check.ok
    ]
    skipped.sort()

    labels = {name: label for label, name in enumerate(scan.classes)}
    good = [(video, check) for video, check in zip(listable, checks, strict=True) if check.ok]
    entries = [VideoEntry(video.path, labels[video.class_name], i + 1) for i, (video, _) in enumerate(good)]
    if scan.layout == "classes":
        train, val = stratified_split(entries, val_fraction, seed)
    else:
        split_of = {video.path: video.split for video, _ in good}
        train = [entry for entry in entries if split_of[entry.path] == "train"]
        val = [entry for entry in entries if split_of[entry.path] == "val"]

    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in OUTPUT_FILES}
    split_of_path = {entry.path: "train" for entry in train} | {entry.path: "val" for entry in val}
    _write_summary_csv(files["summary.csv"], listable, checks, split_of_path)
    text = "".join(f"{path}: {reason}\n" for path, reason in skipped)
    atomic_write_text(files["skipped.txt"], text, errors="surrogateescape")
    if not train:
        raise ValueError(
            f"{scan.root}: no readable video to train on "
            f"({len(skipped)} left out; see {files['skipped.txt']})"
        )
    write_list(files["train.txt"], train)
    if val:
        write_list(files["val.txt"], val)
    else:
        files["val.txt"].unlink(missing_ok=True)  # only there when overwriting: a stale one would mislead
    write_class_names(files["classes.txt"], scan.classes)
    return FolderLists(
        data_root=scan.root,
        layout=scan.layout,
        train_list=files["train.txt"],
        val_list=files["val.txt"] if val else None,
        classes_file=files["classes.txt"],
        skipped_file=files["skipped.txt"],
        summary_file=files["summary.csv"],
        classes=scan.classes,
        summary=_class_summaries(scan.classes, good, train, val, skipped, scan.videos),
        skipped=skipped,
    )


# ------------------------------------------------------------------------------------------- the split


def val_count(num_videos: int, val_fraction: float) -> int:
    """How many of a class's ``num_videos`` go to validation: ``val_fraction`` of them, rounded half up,
    and, when the fraction is above 0 and the class has two videos or more, at least one for validation
    and at least one kept for training (a class absent from either side cannot be learnt or measured)."""
    count = math.floor(num_videos * val_fraction + 0.5)
    if val_fraction > 0 and num_videos >= 2:
        count = min(max(count, 1), num_videos - 1)
    return min(count, num_videos)


def stratified_split(
    entries: Sequence[VideoEntry], val_fraction: float, seed: int
) -> tuple[list[VideoEntry], list[VideoEntry]]:
    """``(train, val)``: each class (label) gives :func:`val_count` videos to ``val``, chosen by seed.

    Within a class, videos are ranked by the SHA-256 of ``"{seed}:{path}"``, the first ones going to
    validation; both lists keep the order of ``entries``.
    """
    by_class: dict[int, list[int]] = {}
    for index, entry in enumerate(entries):
        by_class.setdefault(entry.label, []).append(index)
    to_val: set[int] = set()
    for indices in by_class.values():
        ranked = sorted(indices, key=lambda i: (_rank_key(seed, entries[i].path), i))
        to_val.update(ranked[: val_count(len(indices), val_fraction)])
    train = [entry for index, entry in enumerate(entries) if index not in to_val]
    val = [entry for index, entry in enumerate(entries) if index in to_val]
    return train, val


def _rank_key(seed: int, path: str) -> bytes:
    # The same seeded, platform-independent rank as evl.splits uses for few-shot draws.
    return hashlib.sha256(f"{seed}:{path}".encode("utf-8", "surrogateescape")).digest()


# ------------------------------------------------------------------------------------- the summary table


def format_summary(lists: FolderLists) -> str:
    """The per-class table (videos in the lists, train, val, hours, skipped) with a total row, as text.

    Videos left out from outside any class folder have a row of their own, so that the total adds up.
    """
    header = ("class", "videos", "train", "val", "hours", "skipped")
    summary = lists.summary
    rows = [(s.name, s.videos, s.train, s.val, f"{s.hours:.2f}", s.skipped) for s in summary]
    unplaced = len(lists.skipped) - sum(s.skipped for s in summary)
    if unplaced:
        rows.append(("(no class)", 0, 0, 0, "0.00", unplaced))
    counts = (sum(getattr(s, key) for s in summary) for key in ("videos", "train", "val"))
    rows.append(("total", *counts, f"{sum(s.hours for s in summary):.2f}", len(lists.skipped)))
    cells = [tuple(str(cell) for cell in row) for row in [header, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                  for column, (cell, width) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]  # fmt: skip
    return "\n".join(lines)


def _class_summaries(
    classes: Sequence[str],
    good: Sequence[tuple[FoundVideo, VideoCheck]],
    train: Sequence[VideoEntry],
    val: Sequence[VideoEntry],
    skipped: Sequence[tuple[str, str]],
    videos: Sequence[FoundVideo],
) -> list[ClassSummary]:
    class_of = {video.path: video.class_name for video in videos}
    seconds = {name: 0.0 for name in classes}
    for video, check in good:
        seconds[video.class_name] += check.seconds
    left_out = [class_of[path] for path, _ in skipped if path in class_of]
    return [
        ClassSummary(
            name=name,
            label=label,
            train=sum(entry.label == label for entry in train),
            val=sum(entry.label == label for entry in val),
            seconds=seconds[name],
            skipped=left_out.count(name),
        )
        for label, name in enumerate(classes)
    ]


# ---------------------------------------------------------------------------------------------- files

_UNLISTABLE = "its path cannot be written to a list file (a leading '#', a line break or surrounding spaces)"


def _fits_plain_list(path: str) -> bool:
    """Whether ``relpath label`` lines can hold ``path`` (see :func:`evl.video.lists.write_list`)."""
    return (
        bool(path)
        and path == path.strip()
        and not path.startswith("#")
        and not any(c in path for c in "\n\r")
    )


def _check_outputs_free(out: Path, overwrite: bool) -> None:
    if overwrite:
        return
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing:
        raise ValueError(
            f"{out / existing[0]}: already exists; the lists in {out} are replaced only when overwriting "
            "is asked for (evl lists --overwrite)"
        )


def _write_summary_csv(
    path: Path, videos: Sequence[FoundVideo], checks: Sequence[VideoCheck], split_of: dict[str, str]
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for video, check in zip(videos, checks, strict=True):
        writer.writerow((
            video.path, video.class_name, split_of.get(video.path, ""), check.frames, round(check.fps, 3),
            round(check.seconds, 3), check.width, check.height, check.codec, check.ok, check.reason,
        ))  # fmt: skip
    atomic_write_text(path, buffer.getvalue(), errors="surrogateescape")
