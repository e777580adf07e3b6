"""Preparing a dataset once for fast loading: each listed video, or each clip of a trimming CSV, re-encoded
under an output root (see :mod:`evl.video.reencode` for what an output is), with a list of the outputs.

``prepare_videos(SRC, LIST, DST)`` writes:

* ``DST/<path of the video under SRC, suffix .mp4>`` per list entry; per trimming-CSV row
  ``DST/<path of the video under SRC without suffix>_<start>_<end>.mp4`` (seconds, Kinetics-style:
  ``abc_000010_000020.mp4``);
* ``DST/<name of LIST>`` (for a CSV ``DST/<its stem>.txt``): the same labels, paths relative to ``DST``,
  in the input's order; a video that failed is left out of it;
* ``DST/<list stem>_failures.txt``: ``file:line: source: reason`` per video that failed (empty when none);
* ``DST/classes.txt`` when the CSV names its classes instead of numbering them (sorted names), unless a
  class-names file is given or an earlier CSV's ``classes.txt`` is already there (then that one numbers them).

Nothing is ever written under ``SRC``: an out-root inside it (or holding it) is refused. Runs resume: an
output already made with the same settings is kept, the temporary file a killed run left is removed and
that output made again, an output made with other settings is replaced, and a file at an output's path
that this module did not write is never touched (it is reported as a failure).

A video in a trimming CSV is found under ``SRC`` as written (a relative path), or with any video suffix
added (``abc`` -> ``abc.mp4``), or by its file name in any folder (Kinetics downloads kept in class
folders), preferring the folder named by the row's label.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from evl.io import atomic_write_text
from evl.video.decode import VideoDecodeError, printable_path
from evl.video.folders import list_videos
from evl.video.lists import (
    ListFileError,
    VideoEntry,
    read_class_names,
    read_list,
    write_class_names,
    write_list,
)
from evl.video.parallel import map_in_processes
from evl.video.reencode import (
    EncodeSettings,
    Segment,
    clear_interrupted_writes,
    output_state,
    pick_encoder,
    reencode,
)
from evl.video.trims import TrimRow, read_trims

__all__ = ["Failure", "PrepareResult", "prepare_videos"]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Failure:
    """A video that could not be prepared: where it was listed (``file:line``), its path, and why."""

    where: str
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.source}: {self.reason}"


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_videos` did. ``done``: outputs made now; ``existing``: outputs kept from an
    earlier run; both as paths relative to ``out_root``, as the written list holds them."""

    out_root: Path
    list_path: Path
    failures_path: Path
    classes_file: Path | None
    encoder: str
    done: list[str]
    existing: list[str]
    failed: list[Failure]


@dataclass(frozen=True)
class _Job:
    """One output to make; plain data, so it pickles into worker processes."""

    source: str
    output: str
    segment: Segment | None
    settings: EncodeSettings
    encoder: str
    threads: int
    src_root: str  # resolved: a last check that nothing lands under it
    not_found: str = ""  # why the source was not found, when it was not


@dataclass(frozen=True)
class _Planned:
    relpath: str  # the output, relative to the out-root
    label: int
    where: str
    job: _Job


def prepare_videos(
    src_root: PathLike,
    list_path: PathLike | None,
    out_root: PathLike,
    *,
    trim: PathLike | None = None,
    classes: PathLike | None = None,
    short_side: int = 256,
    keyframe_interval: int = 16,
    crf: int = 23,
    workers: int = 1,
    progress: bool = True,
) -> PrepareResult:
    """Re-encode the videos of ``list_path`` (or the clips of the trimming CSV ``trim``) from ``src_root``
    into ``out_root`` (see the module docstring) in ``workers`` processes.

    With ``trim``, labels come from the CSV's label column: integers, or class names numbered by their
    order in ``classes`` (a class-names file), else in the ``classes.txt`` an earlier CSV left in
    ``out_root`` (so that the validation CSV is numbered as the training one was), else sorted and written
    to ``out_root/classes.txt``. A CSV without labels takes them from ``list_path``, which must then list
    every clip's video.
    """
    src, out = Path(src_root), Path(out_root)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder not found")
    _check_out_root(src, out)
    if list_path is None and trim is None:
        raise ValueError("nothing to prepare: give a list file or a trimming CSV")
    settings = EncodeSettings(short_side=short_side, keyframe_interval=keyframe_interval, crf=crf)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    context = _Context(src, out, settings, pick_encoder(), threads=1 if workers > 1 else 0)
    class_names: list[str] | None = None
    if trim is not None:
        if classes is None and (out / "classes.txt").is_file():
            # Named as the clips of an earlier CSV into this out-root were: train and val labels agree.
            classes = out / "classes.txt"
        planned, class_names = _plan_trims(Path(trim), list_path, classes, context)
        list_name = f"{Path(trim).stem}.txt"
    else:
        planned = _plan_list(Path(list_path), context)
        list_name = Path(list_path).name
    _check_unique_outputs(planned)
    files = _output_files(
        out, list_name, [p for p in (list_path, trim, classes) if p is not None], class_names
    )

    statuses = map_in_processes(_prepare_one, [p.job for p in planned], workers, progress, "preparing videos")

    done, existing, failed, entries = [], [], [], []
    for plan, (status, reason) in zip(planned, statuses, strict=True):
        if status == "failed":
            failed.append(Failure(plan.where, printable_path(plan.job.source), reason))
            continue
        (done if status == "done" else existing).append(plan.relpath)
        entries.append(VideoEntry(plan.relpath, plan.label, len(entries) + 1))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        files["failures"], "".join(f"{failure}\n" for failure in failed), errors="surrogateescape"
    )
    if not entries:
        raise ValueError(f"none of the {len(planned)} videos could be prepared (see {files['failures']})")
    write_list(files["list"], entries)
    if class_names is not None:
        write_class_names(files["classes"], class_names)
    return PrepareResult(
        out_root=out,
        list_path=files["list"],
        failures_path=files["failures"],
        classes_file=files["classes"] if class_names is not None else (Path(classes) if classes else None),
        encoder=context.encoder,
        done=done,
        existing=existing,
        failed=failed,
    )


# ---------------------------------------------------------------------------------------- what to make


@dataclass(frozen=True)
class _Context:
    src: Path
    out: Path
    settings: EncodeSettings
    encoder: str
    threads: int

    def job(self, source: str, output: str, segment: Segment | None, not_found: str = "") -> _Job:
        """The job that makes ``out/output`` (a relative path) from ``src/source``."""
        return _Job(
            os.fspath(self.src / source), os.fspath(self.out / output), segment, self.settings, self.encoder,
            self.threads, os.fspath(self.src.resolve()), not_found,
        )  # fmt: skip


def _plan_list(list_path: Path, context: _Context) -> list[_Planned]:
    """One output per list entry, at the entry's path under the out-root, with the suffix ``.mp4``."""
    planned = []
    for entry in read_list(list_path):
        where = f"{list_path}:{entry.line}"
        relpath = _inside_source(entry.path, context.src, where)
        output = str(PurePosixPath(relpath).with_suffix(".mp4"))
        job = context.job(relpath, output, segment=None)
        planned.append(_Planned(output, entry.label, where, job))
    return planned


def _plan_trims(
    trim: Path, list_path: PathLike | None, classes: PathLike | None, context: _Context
) -> tuple[list[_Planned], list[str] | None]:
    """One output per CSV row, named after its video and times; the labels, and class names if the CSV
    named its classes (None when its labels are numbers or come from the list)."""
    rows = read_trims(trim)
    finder = _VideoFinder(context.src)
    found = {row.line: finder.find(row) for row in rows}
    labels, class_names = _trim_labels(trim, rows, found, list_path, classes, context.src)
    planned = []
    for row in rows:
        source, not_found = found[row.line]
        stem = str(PurePosixPath(source).with_suffix("")) if source else row.video
        output = f"{stem}_{_seconds_text(row.start)}_{_seconds_text(row.end)}.mp4"
        job = context.job(source or row.video, output, Segment(row.start, row.end), not_found)
        planned.append(_Planned(output, labels.get(row.line, -1), f"{trim}:{row.line}", job))
    return planned, class_names


def _trim_labels(
    trim: Path,
    rows: Sequence[TrimRow],
    found: dict[int, tuple[str, str]],
    list_path: PathLike | None,
    classes: PathLike | None,
    src: Path,
) -> tuple[dict[int, int], list[str] | None]:
    """Label per CSV line (rows whose video was not found may have none), and the class names to write."""
    unlabelled = [row for row in rows if row.label is None]
    if not unlabelled:
        if list_path is not None:
            raise ValueError(
                f"{trim}: the trimming CSV gives every clip a label, so the list {list_path} is not used; "
                "give one or the other"
            )
        return _labels_from_csv(trim, rows, classes)
    if len(unlabelled) < len(rows) or list_path is None:
        raise ListFileError(
            f"{trim}:{unlabelled[0].line}: no label (give every row a label, or give no row one and a list "
            "file that lists the videos with their labels)"
        )
    listed = {os.path.normpath(src / entry.path): entry.label for entry in read_list(list_path)}
    labels = {}
    for row in rows:
        source, not_found = found[row.line]
        if not_found:
            continue  # reported as a failure; it needs no label
        label = listed.get(os.path.normpath(src / source))
        if label is None:
            raise ListFileError(f"{trim}:{row.line}: {source} is not in {list_path}, which gives the labels")
        labels[row.line] = label
    return labels, None


def _labels_from_csv(
    trim: Path, rows: Sequence[TrimRow], classes: PathLike | None
) -> tuple[dict[int, int], list[str] | None]:
    texts = {row.line: row.label or "" for row in rows}
    if classes is not None:
        names = read_class_names(classes)
        index = {name: label for label, name in enumerate(names)}
        labels = {}
        for line, text in texts.items():
            if text in index:
                labels[line] = index[text]
            elif text.isdigit() and int(text) < len(names):
                labels[line] = int(text)
            else:
                raise ListFileError(f"{trim}:{line}: label {text!r} is not a class of {classes}")
        return labels, None
    if all(text.isdigit() for text in texts.values()):
        return {line: int(text) for line, text in texts.items()}, None
    names = sorted(set(texts.values()))
    index = {name: label for label, name in enumerate(names)}
    return {line: index[text] for line, text in texts.items()}, names


class _VideoFinder:
    """Finds a trimming row's video under the source folder (see the module docstring), listing the
    folder once instead of trying every suffix and folder for each of a dataset's rows."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.paths = set(list_videos(src))
        self.by_path_stem: dict[str, list[str]] = defaultdict(list)
        self.by_name_stem: dict[str, list[str]] = defaultdict(list)
        for path in sorted(self.paths):
            stem = PurePosixPath(path).with_suffix("")
            self.by_path_stem[str(stem)].append(path)
            self.by_name_stem[stem.name].append(path)

    def find(self, row: TrimRow) -> tuple[str, str]:
        """(path relative to the source folder, "") or ("", why it was not found)."""
        video = PurePosixPath(row.video).as_posix()
        if Path(video).is_absolute() or _leaves(Path(os.path.normpath(video)).as_posix()):
            return "", f"{video} is not under the source folder {self.src}"
        if video in self.paths or (self.src / video).is_file():
            return os.path.normpath(video), ""
        candidates = self.by_path_stem.get(video) or self.by_name_stem.get(PurePosixPath(video).name, [])
        if row.label and len(candidates) > 1:
            # Kinetics class folders are often the label with spaces as underscores ("air_drumming").
            folders = {row.label, row.label.replace(" ", "_")}
            in_label_folder = [path for path in candidates if folders & set(PurePosixPath(path).parent.parts)]
            candidates = in_label_folder or candidates
        if len(candidates) == 1:
            return candidates[0], ""
        if not candidates:
            return (
                "",
                f"video not found under {self.src} (as {video}, with a video suffix, or in a subfolder)",
            )
        shown = ", ".join(candidates[:3]) + (", ..." if len(candidates) > 3 else "")
        return "", f"{len(candidates)} videos match {video!r} ({shown}); write its path in the CSV"


def _seconds_text(seconds: float) -> str:
    """Kinetics' file-name form, ``000010`` for whole seconds; ``000010.500`` otherwise."""
    return f"{int(seconds):06d}" if float(seconds).is_integer() else f"{seconds:010.3f}"


# ---------------------------------------------------------------------------------------------- checks


def _check_out_root(src: Path, out: Path) -> None:
    src_real, out_real = src.resolve(), out.resolve()
    if out_real == src_real or src_real in out_real.parents:
        raise ValueError(
            f"{out}: the out-root is inside the source folder {src}; prepared videos are never written "
            "under the source, choose an out-root outside it"
        )
    if out_real in src_real.parents:
        raise ValueError(
            f"{out}: the out-root holds the source folder {src}; outputs could land among the sources, "
            "choose an out-root outside it"
        )


def _inside_source(path: str, src: Path, where: str) -> str:
    """``path`` relative to the source folder, ``/``-separated; an error for a path that leaves it, whose
    output would then leave the out-root."""
    pure = Path(path)
    if pure.is_absolute():
        try:
            pure = pure.relative_to(os.path.abspath(src))
        except ValueError:
            raise ListFileError(f"{where}: {path} is not under the source folder {src}") from None
    relative = Path(os.path.normpath(pure)).as_posix()
    if _leaves(relative):
        raise ListFileError(f"{where}: {path} is not under the source folder {src}")
    return relative


def _leaves(relative: str) -> bool:
    """Whether a normalised relative path is the folder itself or points out of it."""
    return relative in (".", "..") or relative.startswith("../")


def _check_unique_outputs(planned: Sequence[_Planned]) -> None:
    first: dict[str, str] = {}
    for plan in planned:
        if plan.relpath in first:
            raise ListFileError(
                f"{plan.where}: its output {plan.relpath} is also the output of {first[plan.relpath]} "
                "(videos differing only in their suffix?)"
            )
        first[plan.relpath] = plan.where


def _output_files(
    out: Path, list_name: str, inputs: Sequence[PathLike], class_names: list[str] | None
) -> dict[str, Path]:
    """The list, failure report and class-names paths; an error if one of them is an input file."""
    files = {
        "list": out / list_name,
        "failures": out / f"{Path(list_name).stem}_failures.txt",
        "classes": out / "classes.txt",
    }
    for name, path in files.items():
        if name == "classes" and class_names is None:
            continue
        for given in inputs:
            if path.exists() and Path(given).exists() and path.samefile(given):
                raise ValueError(f"{path}: would be written over the input {given}; choose another out-root")
    return files


# ------------------------------------------------------------------------------------------ one output


def _prepare_one(job: _Job) -> tuple[str, str]:
    """``("done" | "existing" | "failed", reason)`` for one output; never raises for a bad video."""
    if job.not_found:
        return "failed", job.not_found
    output = Path(job.output)
    try:
        parent = output.parent.resolve()
        if parent == Path(job.src_root) or Path(job.src_root) in parent.parents:
            return "failed", f"{output} would be under the source folder (through a link); not written"
        clear_interrupted_writes(output)
        state = output_state(output, job.settings.tag(job.encoder, job.segment))
        if state == "complete":
            return "existing", ""
        if state == "foreign":
            return (
                "failed",
                f"{printable_path(output)} exists and was not written by evl prepare; left as it is",
            )
        reencode(job.source, output, job.settings, job.segment, job.encoder, job.threads)
    except VideoDecodeError as err:
        return "failed", _without_path(str(err), job.source)
    except Exception as err:  # one odd video must not end the preparation of thousands
        return "failed", f"{type(err).__name__}: {err}"
    return "done", ""


def _without_path(message: str, path: str) -> str:
    prefix = f"{printable_path(path)}: "
    return message[len(prefix) :] if message.startswith(prefix) else message
