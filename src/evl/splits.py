"""Few-shot, base-to-novel and cross-dataset splits (the ViFi-CLIP / X-CLIP protocols) of video lists.

Every draw is a pure function of a seed and the video paths (or class names): an item's rank is the SHA-256
of ``"{seed}:{path}"``, so a split is the same on every platform and NumPy version, does not depend on the
order of the list file, and one class's draw does not depend on the other classes. Because the ranking
does not depend on K either, few-shot draws nest: with the same seed the 2-shot set is inside the 4-shot
set, which is inside the 8- and 16-shot sets.

Subset lists are written with labels re-indexed to the subset (base labels 0..B-1, novel labels
0..N-1), each with its own class-names file, exactly as the reference's ``fs_base_s*_train.txt``,
``base_val.txt``, ``novel_val.txt`` and ``*_base_labels.csv`` / ``*_novel_labels.csv`` pairs: a list and
its class file then train and evaluate like any other dataset. ``split.json`` keeps the global ids.

A cross-dataset set (a model trained on one label set, evaluated on several splits of another) is a
folder of ``split_N_val.txt`` + ``split_N_classes.txt`` pairs and a ``protocol.json`` naming them: drawn
here the Kinetics-600 way (the classes new to it, then seeded subsets), or copied from published lists
(HMDB-51 and UCF-101's three test splits).

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

from evl.io import atomic_write_text
from evl.video.lists import VideoEntry, read_class_names, read_list, write_class_names, write_list

__all__ = [
    "CrossDatasetSplit",
    "SplitSet",
    "base_novel",
    "base_novel_from_names",
    "cross_dataset_splits",
    "few_shot",
    "new_classes",
    "read_split_set",
    "write_base_novel_lists",
    "write_cross_dataset_lists",
    "write_few_shot_lists",
    "write_published_splits",
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


# ---------------------------------------------------------------------------------------- cross-dataset

PROTOCOL_FILE = "protocol.json"

# The papers' Kinetics-600 setting (X-CLIP and ViFi-CLIP, after ER-ZSAR): three splits of 160 of the 220
# classes new to Kinetics-600. The draw is this module's own: the papers publish class lists, not a seed
# (ViFi-CLIP's three lists can be taken as they are, with write_published_splits).
K600_SPLITS = {"num_splits": 3, "classes_per_split": 160}

# One class under two spellings in two label sets, as normalised names: excluding the left one excludes
# the right one too. Kinetics-600 spells Kinetics-400's "dying hair" "dyeing hair"; it is not a new class
# (none of ViFi-CLIP's three published Kinetics-600 zero-shot class lists names it).
SAME_CLASS = {"dying hair": "dyeing hair"}


def new_classes(class_names: Sequence[str], excluded_names: Sequence[str]) -> list[int]:
    """Ids (ascending) of the classes not named in ``excluded_names`` (e.g. Kinetics-600's classes not in
    Kinetics-400). Names match as in :func:`base_novel_from_names` and through :data:`SAME_CLASS`."""
    excluded = {_normalise_name(name) for name in excluded_names}
    excluded |= {SAME_CLASS[name] for name in excluded if name in SAME_CLASS}
    return [i for i, name in enumerate(class_names) if _normalise_name(name) not in excluded]


def cross_dataset_splits(
    class_names: Sequence[str],
    candidates: Sequence[int],
    num_splits: int = K600_SPLITS["num_splits"],
    classes_per_split: int = K600_SPLITS["classes_per_split"],
    seed: int = 0,
) -> list[list[int]]:
    """``num_splits`` draws of ``classes_per_split`` class ids from ``candidates``, each ascending.

    Split n (from 1) keeps the candidates whose names rank first under the SHA-256 of
    ``"{seed}:{n}:{name}"``: a pure function of the seed, the split's position and the names, so a split
    does not depend on the label order, on the other splits or on how many are drawn. Splits overlap
    when they must (three of 160 from 220 classes).
    """
    for name, value in (("num_splits", num_splits), ("classes_per_split", classes_per_split)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if classes_per_split > len(candidates):
        raise ValueError(
            f"classes_per_split={classes_per_split} is more than the {len(candidates)} classes to draw from"
        )
    return [
        sorted(sorted(candidates, key=lambda i: _rank_key(seed, f"{n}:{class_names[i]}"))[:classes_per_split])
        for n in range(1, num_splits + 1)
    ]


@dataclasses.dataclass(frozen=True)
class CrossDatasetSplit:
    """One split of a set: its videos (labels index its classes) and its class-names file."""

    name: str
    val_list: Path
    classes: Path


@dataclasses.dataclass(frozen=True)
class SplitSet:
    """A folder written by :func:`write_cross_dataset_lists` or :func:`write_published_splits`."""

    directory: Path
    splits: list[CrossDatasetSplit]
    meta: dict  # protocol.json as written

    @property
    def data_root(self) -> Path | None:
        """The folder the lists' paths are relative to, when one was given as the set was written."""
        root = self.meta.get("data_root")
        return None if root is None else Path(root)


def read_split_set(directory: PathLike) -> SplitSet:
    """The splits named by ``directory/protocol.json``; errors name the file (and line) at fault."""
    folder = Path(directory)
    path = folder / PROTOCOL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (write the set with 'evl splits cross-dataset')")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    listed = meta.get("splits") if isinstance(meta, dict) else None
    if not isinstance(listed, list) or not listed:
        raise ValueError(f"{path}: no 'splits' list (write the set with 'evl splits cross-dataset')")
    splits = []
    for index, item in enumerate(listed):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in _SPLIT_KEYS):
            raise ValueError(f"{path}: split {index} needs the strings {', '.join(_SPLIT_KEYS)}")
        split = CrossDatasetSplit(item["name"], folder / item["val_list"], folder / item["classes"])
        for file in (split.val_list, split.classes):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: not found (split {split.name} of {path})")
        splits.append(split)
    return SplitSet(folder, splits, meta)


_SPLIT_KEYS = ("name", "val_list", "classes")


def _split_files(out: Path, n: int, names: Sequence[str], entries: Sequence[VideoEntry]) -> dict:
    """Write split n's list and class names; its record for protocol.json."""
    name = f"split_{n}"
    write_list(out / f"{name}_val.txt", entries)
    write_class_names(out / f"{name}_classes.txt", names)
    present = {e.label for e in entries}
    return {
        "name": name,
        "val_list": f"{name}_val.txt",
        "classes": f"{name}_classes.txt",
        "num_classes": len(names),
        "num_videos": len(entries),
        "num_classes_without_videos": len(names) - len(present),
    }


def _write_protocol(out: Path, meta: dict) -> Path:
    path = out / PROTOCOL_FILE
    atomic_write_text(path, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return path


def _absolute(path: PathLike | None) -> str | None:
    return None if path is None else str(Path(path).absolute())


def write_cross_dataset_lists(
    list_path: PathLike,
    classes_path: PathLike,
    out_dir: PathLike,
    exclude_classes: PathLike | None = None,
    num_splits: int = K600_SPLITS["num_splits"],
    classes_per_split: int = K600_SPLITS["classes_per_split"],
    seed: int = 0,
    data_root: PathLike | None = None,
) -> list[Path]:
    """Draw a cross-dataset set, the Kinetics-600 way, into ``out_dir``; returns the paths written.

    The classes of ``classes_path`` not named in ``exclude_classes`` (all of them without it) are the
    candidates (``candidate_classes.txt``); each split is :func:`cross_dataset_splits`'s draw from them:
    ``split_N_classes.txt`` and ``split_N_val.txt``, the videos of ``list_path`` of those classes with
    labels renumbered 0..classes_per_split-1 in class-file order. ``protocol.json`` records the settings,
    the global class ids of each split and the excluded names that matched no class. ``data_root``
    (recorded, not checked: a Kinetics copy lacks some videos, and evaluation counts them) is where
    ``evl eval --splits`` finds the videos unless told otherwise.
    """
    class_names = read_class_names(classes_path)
    entries = read_list(list_path, num_classes=len(class_names))
    unmatched: list[str] = []
    candidates = list(range(len(class_names)))
    if exclude_classes is not None:
        excluded = read_class_names(exclude_classes)
        candidates = new_classes(class_names, excluded)
        if len(candidates) == len(class_names):
            raise ValueError(
                f"{exclude_classes}: none of its {len(excluded)} classes is in {classes_path}; is it the "
                "label set the model was trained on?"
            )
        known = {_normalise_name(name) for name in class_names}
        unmatched = [
            name
            for name in excluded
            if _normalise_name(name) not in known and SAME_CLASS.get(_normalise_name(name)) not in known
        ]
    if classes_per_split > len(candidates):
        raise ValueError(
            f"{classes_path}: {len(candidates)} classes to draw from (after {exclude_classes}), fewer than "
            f"classes_per_split={classes_per_split}"
        )
    splits = cross_dataset_splits(class_names, candidates, num_splits, classes_per_split, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    write_class_names(out / "candidate_classes.txt", [class_names[i] for i in candidates])
    paths.append(out / "candidate_classes.txt")
    records = []
    for n, ids in enumerate(splits, start=1):
        val = _relabel(entries, ids)
        if not val:
            raise ValueError(f"{list_path}: no video of any of split_{n}'s {len(ids)} classes")
        record = _split_files(out, n, [class_names[i] for i in ids], val)
        records.append({**record, "class_ids": ids})
        paths += [out / record["val_list"], out / record["classes"]]
    meta = {
        "protocol": "cross-dataset",
        "kind": "drawn",
        "seed": seed,
        "num_splits": num_splits,
        "classes_per_split": classes_per_split,
        "source_list": str(list_path),
        "source_classes": str(classes_path),
        "exclude_classes": None if exclude_classes is None else str(exclude_classes),
        "num_source_classes": len(class_names),
        "num_candidates": len(candidates),
        "excluded_names_not_found": unmatched,
        "data_root": _absolute(data_root),
        "splits": records,
    }
    paths.append(_write_protocol(out, meta))
    return paths


def write_published_splits(
    split_lists: Sequence[PathLike],
    out_dir: PathLike,
    classes: PathLike | None = None,
    split_classes: Sequence[PathLike] | None = None,
    data_root: PathLike | None = None,
) -> list[Path]:
    """Copy published splits into the layout of :func:`write_cross_dataset_lists`; returns the paths.

    ``split_lists`` are the splits' video lists, labels indexing ``classes`` (one file for all: HMDB-51's
    or UCF-101's three test lists over their 51 / 101 classes) or each its own of ``split_classes``
    (ViFi-CLIP's ``ZS_split{1,2,3}_K600.csv``). Lists and labels are kept as they are: every class of the
    class file is a candidate answer, as in the papers, whether or not a split has videos of it.
    """
    if not split_lists:
        raise ValueError("no split lists given")
    if (classes is None) == (split_classes is None):
        raise ValueError("give one class file for every split (classes) or one per split (split_classes)")
    if split_classes is not None and len(split_classes) != len(split_lists):
        raise ValueError(f"{len(split_lists)} split lists but {len(split_classes)} class files")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, records = [], []
    for n, list_path in enumerate(split_lists, start=1):
        class_path = classes if split_classes is None else split_classes[n - 1]
        names = read_class_names(class_path)
        record = _split_files(out, n, names, read_list(list_path, num_classes=len(names)))
        records.append({**record, "source_list": str(list_path), "source_classes": str(class_path)})
        paths += [out / record["val_list"], out / record["classes"]]
    meta = {
        "protocol": "cross-dataset",
        "kind": "published",
        "seed": None,
        "num_splits": len(split_lists),
        "classes_per_split": None,
        "data_root": _absolute(data_root),
        "splits": records,
    }
    paths.append(_write_protocol(out, meta))
    return paths
