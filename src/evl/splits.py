"""Few-shot and base-to-novel splits (the ViFi-CLIP / X-CLIP protocols) of video lists.

Every draw is a pure function of a seed and the video paths (or class names): an item's rank is the SHA-256
of ``"{seed}:{path}"``, so a split is the same on every platform and NumPy version, does not depend on the
order of the list file, and one class's draw does not depend on the other classes. Because the ranking
does not depend on K either, few-shot draws nest: with the same seed the 2-shot set is inside the 4-shot
set, which is inside the 8- and 16-shot sets.

Subset lists are written with labels re-indexed to the subset (base labels 0..B-1, novel labels
0..N-1), each with its own class-names file, exactly as the reference's ``fs_base_s*_train.txt``,
``base_val.txt``, ``novel_val.txt`` and ``*_base_labels.csv`` / ``*_novel_labels.csv`` pairs: a list and
its class file then train and evaluate like any other dataset. ``split.json`` keeps the global ids.

This module only reads and writes lists (it sits with :mod:`evl.video`); the base-to-novel accuracies and
their harmonic mean are metrics, in :mod:`evl.engine.metrics`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from evl.video.lists import VideoEntry, read_class_names, read_list, write_class_names, write_list

__all__ = [
    "base_novel",
    "base_novel_from_names",
    "few_shot",
    "write_base_novel_lists",
    "write_few_shot_lists",
]

PathLike = str | os.PathLike


def _rank_key(seed: int, item: str) -> bytes:
    """A seeded, platform-independent sort key (SHA-256 of ``"{seed}:{item}"``)."""
    return hashlib.sha256(f"{seed}:{item}".encode()).digest()


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return f"{class_names[label]!r} (label {label})"
    return f"label {label}"


# ------------------------------------------------------------------------------------------- few-shot


def few_shot(
    entries: Sequence[VideoEntry],
    k: int,
    seed: int,
    allow_fewer: bool = False,
    class_names: Sequence[str] | None = None,
) -> list[VideoEntry]:
    """K videos per class, drawn without replacement; the result keeps the input's order.

    Within a class, videos are ranked by the SHA-256 of ``"{seed}:{path}"`` and the first ``k`` are
    kept, so for one seed the draws nest (the 2-shot set is a subset of the 4-shot set, and so on) and
    do not depend on the order of ``entries``.

    A class with fewer than ``k`` videos is an error naming it; with ``allow_fewer=True`` all its videos
    are taken and a warning lists such classes. With ``class_names``, classes that have no video at all
    count too, and errors use the names.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"few_shot: k must be a positive integer, got {k!r}")
    by_class: dict[int, list[int]] = {label: [] for label in range(len(class_names or ()))}
    for index, entry in enumerate(entries):
        by_class.setdefault(entry.label, []).append(index)
    short = sorted((label, len(indices)) for label, indices in by_class.items() if len(indices) < k)
    if short and not allow_fewer:
        label, count = short[0]
        more = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
        raise ValueError(
            f"class {_class_name(label, class_names)} has {count} videos, fewer than k={k} shots{more}; "
            "pass allow_fewer=True to take all videos of such classes"
        )
    if short:
        listed = ", ".join(f"{_class_name(label, class_names)}: {count}" for label, count in short[:5])
        warnings.warn(
            f"{len(short)} classes have fewer than k={k} videos, all of them taken ({listed}"
            f"{', ...' if len(short) > 5 else ''})",
            stacklevel=2,
        )
    kept: list[int] = []
    for indices in by_class.values():
        # The index breaks ties between identical paths, which read_list would have rejected anyway.
        ranked = sorted(indices, key=lambda i: (_rank_key(seed, entries[i].path), i))
        kept.extend(ranked[:k])
    return [entries[i] for i in sorted(kept)]


# -------------------------------------------------------------------------------------- base / novel


def base_novel(
    class_names: Sequence[str], seed: int | None = None, num_base: int | None = None
) -> tuple[list[int], list[int]]:
    """Split the classes into base and novel: ``(base_ids, novel_ids)``, each ascending.

    ``num_base`` defaults to ceil(K/2), the ViFi-CLIP sizes (K400 200/200, HMDB 26/25, UCF 51/50, SSv2
    87/87). ``seed=None`` takes the first ``num_base`` classes in label order; a seed takes the
    ``num_base`` classes whose names rank first under the seeded hash (independent of the label order).

    The reference's published splits are fixed class lists (neither of these rules); to reproduce them
    use :func:`base_novel_from_names` with its ``*_base_labels.csv``.
    """
    names = list(class_names)
    total = len(names)
    if len(set(names)) != total:
        raise ValueError("base_novel: class names are not unique")
    if total < 2:
        raise ValueError(f"base_novel needs at least 2 classes, got {total}")
    num_base = math.ceil(total / 2) if num_base is None else num_base
    if not 1 <= num_base < total:
        raise ValueError(f"num_base must be in 1..{total - 1} for {total} classes, got {num_base}")
    if seed is None:
        base = list(range(num_base))
    else:
        base = sorted(sorted(range(total), key=lambda i: _rank_key(seed, names[i]))[:num_base])
    chosen = set(base)
    return base, [i for i in range(total) if i not in chosen]


def _normalise_name(name: str) -> str:
    # "ride_bike", "Ride Bike" and "ride  bike" are one class; label files differ in exactly these ways.
    return " ".join(name.replace("_", " ").lower().split())


def base_novel_from_names(
    class_names: Sequence[str], base_names: Sequence[str]
) -> tuple[list[int], list[int]]:
    """``(base_ids, novel_ids)`` for a given list of base class names (e.g. the reference's base labels).

    ``base_ids`` follows the order of ``base_names`` (so base label i is ``class_names[base_ids[i]]``, as
    in the reference's label files); ``novel_ids`` is ascending. Names match ignoring case, underscores
    versus spaces and repeated spaces.
    """
    lookup: dict[str, int] = {}
    for index, name in enumerate(class_names):
        key = _normalise_name(name)
        if key in lookup:
            raise ValueError(f"class names {class_names[lookup[key]]!r} and {name!r} are the same class")
        lookup[key] = index
    unknown = [name for name in base_names if _normalise_name(name) not in lookup]
    if unknown:
        raise ValueError(f"{len(unknown)} base classes are not in the class list: {unknown[:5]}")
    base = [lookup[_normalise_name(name)] for name in base_names]
    if len(set(base)) != len(base):
        raise ValueError("base class names list the same class twice")
    if not 1 <= len(base) < len(class_names):
        raise ValueError(f"need 1..{len(class_names) - 1} base classes, got {len(base)}")
    chosen = set(base)
    return base, [i for i in range(len(class_names)) if i not in chosen]


# ----------------------------------------------------------------------------------------------- files


def _relabel(entries: Sequence[VideoEntry], ids: Sequence[int]) -> list[VideoEntry]:
    """The entries of classes ``ids``, with label ``ids[i]`` renamed to i."""
    new = {old: i for i, old in enumerate(ids)}
    return [dataclasses.replace(e, label=new[e.label]) for e in entries if e.label in new]


def write_few_shot_lists(
    list_path: PathLike,
    out_dir: PathLike,
    ks: Sequence[int] = (2, 4, 8, 16),
    seed: int = 0,
    data_root: PathLike | None = None,
    allow_fewer: bool = False,
) -> list[Path]:
    """Write ``{stem}_few_shot_{k}{suffix}`` for each k (``train1.txt`` -> ``train1_few_shot_2.txt``, the
    reference's names) into ``out_dir``, in the input's format and labels; returns the paths.

    With ``data_root`` every listed video must exist under it. The draws nest across ``ks``.
    """
    entries = read_list(list_path, data_root=data_root, check_files=data_root is not None)
    source = Path(list_path)
    paths = []
    for k in ks:
        path = Path(out_dir) / f"{source.stem}_few_shot_{k}{source.suffix}"
        write_list(path, few_shot(entries, k, seed, allow_fewer=allow_fewer))
        paths.append(path)
    return paths


def write_base_novel_lists(
    list_path: PathLike,
    classes_path: PathLike,
    out_dir: PathLike,
    shots: int = 16,
    seeds: Sequence[int] = (1, 2, 3),
    val_list: PathLike | None = None,
    split_seed: int | None = None,
    num_base: int | None = None,
    base_classes: PathLike | Sequence[str] | None = None,
    allow_fewer: bool = False,
) -> list[Path]:
    """Write a base-to-novel benchmark into ``out_dir``; returns the paths written.

    * ``fs_base_s{s}_train.txt`` for each seed s: ``shots`` videos per base class from ``list_path``;
    * ``base_val.txt`` and ``novel_val.txt`` (with ``val_list``): its videos of base / novel classes;
    * ``base_classes.txt`` and ``novel_classes.txt``; ``split.json`` with the global ids and settings.

    Labels are re-indexed within each subset (see the module docstring). The split is
    :func:`base_novel` (``split_seed``, ``num_base``), or the classes named by ``base_classes`` (a
    class-names file such as the reference's ``hmdb_51_base_labels.csv``, or a list of names), whose
    order then defines the base labels.
    """
    class_names = read_class_names(classes_path)
    entries = read_list(list_path, num_classes=len(class_names))
    if base_classes is None:
        base_ids, novel_ids = base_novel(class_names, seed=split_seed, num_base=num_base)
    else:
        if split_seed is not None or num_base is not None:
            raise ValueError("give either base_classes or split_seed/num_base, not both")
        names = (
            read_class_names(base_classes) if isinstance(base_classes, str | os.PathLike) else base_classes
        )
        base_ids, novel_ids = base_novel_from_names(class_names, names)
    base_names = [class_names[i] for i in base_ids]
    novel_names = [class_names[i] for i in novel_ids]
    out = Path(out_dir)
    paths = []

    base_train = _relabel(entries, base_ids)
    for seed in seeds:
        path = out / f"fs_base_s{seed}_train.txt"
        write_list(path, few_shot(base_train, shots, seed, allow_fewer=allow_fewer, class_names=base_names))
        paths.append(path)
    if val_list is not None:
        val = read_list(val_list, num_classes=len(class_names))
        for name, ids in (("base_val.txt", base_ids), ("novel_val.txt", novel_ids)):
            write_list(out / name, _relabel(val, ids))
            paths.append(out / name)
    for name, names in (("base_classes.txt", base_names), ("novel_classes.txt", novel_names)):
        write_class_names(out / name, names)
        paths.append(out / name)
    meta = {
        "num_classes": len(class_names),
        "base_ids": base_ids,
        "novel_ids": novel_ids,
        "shots": shots,
        "seeds": list(seeds),
        "split_seed": split_seed,
        "source_list": str(list_path),
        "val_list": None if val_list is None else str(val_list),
    }
    (out / "split.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    paths.append(out / "split.json")
    return paths
