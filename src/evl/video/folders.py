"""Finding the videos of a dataset kept as folders: one folder per class, or ``train/`` and ``val/`` of them.

Two layouts are recognised, the ones people build by hand and torchvision's ``ImageFolder`` reads:

* ``FOLDER/<class>/**/<video>``: the class is the top folder a video sits under (at any depth below it);
* ``FOLDER/train/<class>/**/<video>`` and ``FOLDER/val/<class>/**/<video>``: a split already made.
  Chosen whenever ``FOLDER`` holds both ``train/`` and ``val/`` folders.

A video is a file with one of :data:`VIDEO_SUFFIXES` (any case). Hidden files and folders (a leading dot:
``.DS_Store``, ``.git``, the temporary files of an interrupted write) are passed over, as are files with
other suffixes (notes, annotations, thumbnails). Videos that sit where no class can be read from their
place (directly in ``FOLDER``, or beside ``train/`` and ``val/``) are returned apart, so that they can be
reported instead of silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SPLIT_FOLDERS", "VIDEO_SUFFIXES", "FolderScan", "FoundVideo", "list_videos", "scan_folder"]

PathLike = str | os.PathLike

# The containers FFmpeg reads that datasets ship in (the same set `evl predict` expands folders with).
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"}
)
SPLIT_FOLDERS = ("train", "val")


@dataclass(frozen=True)
class FoundVideo:
    """A video file and the class (and split, in the ``train/`` + ``val/`` layout) its place gives it.

    ``path`` is relative to the scanned folder, with ``/`` separators, as list files hold paths.
    """

    path: str
    class_name: str
    split: str | None = None


@dataclass(frozen=True)
class FolderScan:
    """What a dataset folder holds.

    ``layout`` is ``"classes"`` (one folder per class; the split is still to be drawn) or ``"train/val"``.
    ``classes`` are the class-folder names, sorted: a class's label is its position. ``videos`` are sorted by
    path; ``unplaced`` are the paths of videos outside any class folder, with the reason they are.
    """

    root: Path
    layout: str
    classes: list[str]
    videos: list[FoundVideo]
    unplaced: list[tuple[str, str]]


def scan_folder(folder: PathLike) -> FolderScan:
    """Find every video under ``folder`` and the class of each (see the module docstring)."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"{root}: folder not found")
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder (expected a folder with one subfolder of videos per class)")
    tops = _visible_dirs(root)
    if all(split in tops for split in SPLIT_FOLDERS):
        return _scan_split_layout(root, tops)
    if not tops:
        raise ValueError(
            f"{root}: no class subfolders (expected one folder of videos per class, "
            "or train/ and val/ folders each holding class folders)"
        )
    videos = [video for name in tops for video in _videos_of_class(root, name, split=None)]
    unplaced = [(path, "not in a class folder") for path in _loose_videos(root, root)]
    return FolderScan(root, "classes", _checked_class_names(root, tops), videos, unplaced)


def list_videos(folder: PathLike) -> list[str]:
    """Paths of every video under ``folder`` (at any depth; hidden ones left out), relative to it, sorted."""
    return _all_videos(Path(folder), Path(folder))


def _scan_split_layout(root: Path, tops: list[str]) -> FolderScan:
    videos: list[FoundVideo] = []
    unplaced: list[tuple[str, str]] = []
    classes: set[str] = set()
    for split in SPLIT_FOLDERS:
        names = _visible_dirs(root / split)
        classes.update(names)
        videos += [video for name in names for video in _videos_of_class(root, name, split)]
        unplaced += [
            (path, f"not in a class folder of {split}/") for path in _loose_videos(root, root / split)
        ]
    for other in sorted(set(tops) - set(SPLIT_FOLDERS)):
        unplaced += [(path, "outside train/ and val/") for path in _all_videos(root, root / other)]
    unplaced += [(path, "outside train/ and val/") for path in _loose_videos(root, root)]
    if not classes:
        raise ValueError(f"{root}: train/ and val/ hold no class folders (expected train/<class>/<video>)")
    videos.sort(key=lambda video: video.path)
    return FolderScan(
        root, "train/val", _checked_class_names(root, sorted(classes)), videos, sorted(unplaced)
    )


def _videos_of_class(root: Path, name: str, split: str | None) -> list[FoundVideo]:
    folder = root / split / name if split else root / name
    return [FoundVideo(path, name, split) for path in _all_videos(root, folder)]


def _all_videos(root: Path, folder: Path) -> list[str]:
    """Paths (relative to ``root``) of the videos anywhere under ``folder``, sorted; hidden ones left out.

    Symbolic links to files count; links to folders are not followed (they could loop).
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if _is_video_name(f)]
    return sorted(path.relative_to(root).as_posix() for path in found)


def _loose_videos(root: Path, folder: Path) -> list[str]:
    """Videos directly in ``folder`` (not in a subfolder), relative to ``root``."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if _is_video_name(e.name) and e.is_file()]
    return sorted((folder / name).relative_to(root).as_posix() for name in names)


def _visible_dirs(folder: Path) -> list[str]:
    """Names of the non-hidden subfolders of ``folder`` (links to folders included), sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _is_video_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in VIDEO_SUFFIXES


def _checked_class_names(root: Path, names: list[str]) -> list[str]:
    # classes.txt holds one name per line, stripped: a folder name it cannot hold would shift the labels.
    for name in names:
        if name != name.strip() or "\n" in name or "\r" in name:
            raise ValueError(
                f"{root}: class folder {name!r} has surrounding spaces or a line break in its name, "
                "which a class-names file cannot hold; rename it"
            )
    return names
