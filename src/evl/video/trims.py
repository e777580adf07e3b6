"""Trimming files: which segment of which video to keep, one clip per row, as Kinetics annotations give them.

Two forms of CSV are read:

* with a header, columns found by name in any order; the Kinetics files
  (``label,youtube_id,time_start,time_end,split[,is_cc]``) read as they are distributed;
* without a header, ``video,start,end[,label]``, recognised by a first row whose second and third fields
  are numbers.

Times are seconds from the start of the video. ``video`` is a path (relative to the source folder) or a
bare name such as a YouTube id, which is looked up with each video suffix (see
:mod:`evl.video.prepare`). ``label`` is optional: an integer, or a class name. Problems are reported as
:class:`~evl.video.lists.ListFileError`, one line naming ``file:line``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

from evl.video.lists import ListFileError

__all__ = ["TrimRow", "read_trims"]

PathLike = str | os.PathLike

VIDEO_COLUMNS = ("youtube_id", "video", "video_id", "path", "filename", "file", "id")
START_COLUMNS = ("time_start", "start", "start_time", "start_sec", "start_seconds")
END_COLUMNS = ("time_end", "end", "end_time", "end_sec", "end_seconds")
LABEL_COLUMNS = ("label", "class", "label_name", "class_name", "label_id")


@dataclass(frozen=True)
class TrimRow:
    """One clip to cut: ``video`` from ``start`` to ``end`` seconds; ``line`` is its line in the file."""

    video: str
    start: float
    end: float
    label: str | None
    line: int


def read_trims(path: PathLike) -> list[TrimRow]:
    """Every row of a trimming CSV, validated: ``0 <= start < end``, finite, and no clip listed twice."""
    reader = csv.reader(io.StringIO(_read_text(path)))
    rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    if not rows:
        raise ListFileError(f"{path}: empty trimming file (no rows)")
    first_line, first = rows[0]
    if _is_data_row(first):
        columns = {"video": 0, "start": 1, "end": 2, "label": 3 if len(first) > 3 else None}
    else:
        columns = _columns_from_header(path, first_line, first)
        rows = rows[1:]
    trims = [_trim_row(path, line, row, columns) for line, row in rows]
    if not trims:
        raise ListFileError(f"{path}: no clips after the header")
    _check_unique(path, trims)
    return trims


def _is_data_row(row: list[str]) -> bool:
    return len(row) >= 3 and _number(row[1]) is not None and _number(row[2]) is not None


def _columns_from_header(path: PathLike, line: int, header: list[str]) -> dict[str, int | None]:
    cells = [cell.strip().lower() for cell in header]

    def find(names: tuple[str, ...], what: str, required: bool = True) -> int | None:
        for name in names:
            if name in cells:
                return cells.index(name)
        if required:
            raise ListFileError(
                f"{path}:{line}: trimming CSV header {header!r} has no {what} column "
                f"(expected one of {list(names)}; or no header and video,start,end[,label] rows)"
            )
        return None

    return {
        "video": find(VIDEO_COLUMNS, "video"),
        "start": find(START_COLUMNS, "start time"),
        "end": find(END_COLUMNS, "end time"),
        "label": find(LABEL_COLUMNS, "label", required=False),
    }


def _trim_row(path: PathLike, line: int, row: list[str], columns: dict[str, int | None]) -> TrimRow:
    needed = max(index for index in columns.values() if index is not None)
    if len(row) <= needed:
        raise ListFileError(f"{path}:{line}: row has {len(row)} fields, expected at least {needed + 1}")
    video = row[columns["video"]].strip()
    if not video:
        raise ListFileError(f"{path}:{line}: no video name")
    times = []
    for key in ("start", "end"):
        text = row[columns[key]].strip()
        value = _number(text)
        if value is None or not math.isfinite(value):
            raise ListFileError(f"{path}:{line}: {key} time {text!r} is not a number of seconds")
        times.append(value)
    start, end = times
    if start < 0:
        raise ListFileError(f"{path}:{line}: start time {start:g} is negative")
    if end <= start:
        raise ListFileError(f"{path}:{line}: end time {end:g} is not after the start time {start:g}")
    label_column = columns["label"]
    label = row[label_column].strip() if label_column is not None and label_column < len(row) else ""
    return TrimRow(video=video, start=start, end=end, label=label or None, line=line)


def _check_unique(path: PathLike, trims: list[TrimRow]) -> None:
    seen: dict[tuple[str, float, float], int] = {}
    for trim in trims:
        key = (trim.video, trim.start, trim.end)
        if key in seen:
            raise ListFileError(
                f"{path}:{trim.line}: clip {trim.video} {trim.start:g}-{trim.end:g} s listed twice "
                f"(first on line {seen[key]})"
            )
        seen[key] = trim.line


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _read_text(path: PathLike) -> str:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ListFileError(f"{path}: trimming file not found") from None
    except IsADirectoryError:
        raise ListFileError(f"{path}: trimming file is a directory") from None
    except OSError as err:
        raise ListFileError(f"{path}: cannot read the trimming file ({err.strerror or err})") from None
    try:
        return data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ListFileError(f"{path}:{line}: trimming file is not UTF-8 text") from None
