"""Video list files (``relpath label`` per line, or a CSV with a header) and class-name files.

Every problem is reported as a :class:`ListFileError` whose message is one line naming ``file:line`` and
what is wrong, so a broken line in a 240k-entry list is found at once instead of deep inside training.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from evl.io import atomic_write_text

__all__ = [
    "ListFileError",
    "VideoEntry",
    "read_class_names",
    "read_list",
    "resolve_path",
    "write_class_names",
    "write_list",
]

PATH_COLUMNS = ("path", "video", "filename", "file")
LABEL_COLUMNS = ("label", "class", "label_id")
ID_COLUMNS = ("id", "index", "label_id")
NAME_COLUMNS = ("name", "class", "class_name", "label_name")

_INTEGER = re.compile(r"[+-]?\d+")

PathLike = str | os.PathLike


class ListFileError(ValueError):
    """A malformed list or class-names file; the message is one line starting with ``file:line``."""


@dataclass(frozen=True)
class VideoEntry:
    """One line of a list file.

    ``path`` is kept as written: relative to a data root unless absolute (see :func:`resolve_path`).
    ``line`` is the 1-based line number in the list file, for error messages further down the pipeline.
    """

    path: str
    label: int
    line: int


def resolve_path(entry: VideoEntry, data_root: PathLike | None) -> Path:
    """Where ``entry``'s video lives: its path joined to ``data_root`` unless it is absolute (or no root)."""
    path = Path(entry.path)
    if data_root is None or path.is_absolute():
        return path
    return Path(data_root) / path


# ----------------------------------------------------------------------------------------------- lists


def read_list(
    path: PathLike,
    num_classes: int | None = None,
    data_root: PathLike | None = None,
    check_files: bool = False,
) -> list[VideoEntry]:
    """Parse a video list file into entries, validating every line.

    Two formats are recognised:

    * the official EVL / mmaction2 form, ``relpath label`` per line. The label is split off at the last
      run of whitespace (spaces or tabs), so paths may contain spaces. Blank lines and ``#`` comments are
      skipped.
    * a CSV with a header row (chosen for a ``.csv`` suffix, or when the first line has a comma and does
      not end in an integer label), with a path column (one of ``PATH_COLUMNS``) and a label column (one
      of ``LABEL_COLUMNS``); other columns are ignored.

    The text is UTF-8 (a BOM is dropped; CRLF and CR line endings are accepted); bytes of a path that are
    not valid UTF-8 are kept as the raw file name, as ``os.fsdecode`` keeps them. A UTF-16 file is an error.

    Labels must be non-negative integers, below ``num_classes`` when it is given. The same path listed
    twice (after normalisation, e.g. ``./a.mp4`` and ``a.mp4``) is an error, even with the same label: in
    training it would silently double a video's weight, in evaluation count it twice. With
    ``check_files=True`` every video must exist under ``data_root``; otherwise a missing video is found,
    and skipped or refused, when it is loaded.
    """
    text = _read_text(path, "list file", raw_bytes=True)
    lines = text.split("\n")
    rows = _csv_rows(path, text) if _looks_like_csv(path, lines) else _plain_rows(path, lines)
    entries = [_make_entry(path, line, video, label, num_classes) for line, video, label in rows]
    if not entries:
        raise ListFileError(f"{path}: empty list file (no entries)")
    _check_unique(path, [(entry.line, os.path.normpath(entry.path)) for entry in entries], "entry")
    if check_files:
        _check_files_exist(path, entries, data_root)
    return entries


def write_list(path: PathLike, entries: Iterable[VideoEntry]) -> None:
    """Write ``entries`` as a list file that :func:`read_list` reads back unchanged (atomically).

    A ``.csv`` suffix gives a ``path,label`` CSV (any path can be written); otherwise the plain
    ``relpath label`` form, which cannot hold paths with line breaks, surrounding whitespace or a
    leading ``#``.
    """
    entries = list(entries)
    if Path(path).suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows((entry.path, entry.label) for entry in entries)
        text = buffer.getvalue()
    else:
        for entry in entries:
            _check_plain_path(entry.path)
        text = "".join(f"{entry.path} {entry.label}\n" for entry in entries)
    atomic_write_text(path, text, errors="surrogateescape")  # file names that are not UTF-8 round-trip


def _plain_rows(path: PathLike, lines: Sequence[str]) -> Iterator[tuple[int, str, str]]:
    """(line, path, label text) per entry of a ``relpath label`` file."""
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) < 2:
            raise ListFileError(f"{path}:{number}: no label (expected '<path> <label>', got {line!r})")
        yield number, parts[0], parts[1]


def _csv_rows(path: PathLike, text: str) -> Iterator[tuple[int, str, str]]:
    """(line, path, label text) per data row of a CSV list with a header."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return
    path_col = _find_column(path, header, PATH_COLUMNS, "path")
    label_col = _find_column(path, header, LABEL_COLUMNS, "label")
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        number = reader.line_num
        if len(row) <= max(path_col, label_col):
            raise ListFileError(f"{path}:{number}: row has {len(row)} fields, header has {len(header)}")
        if not row[label_col].strip():
            raise ListFileError(f"{path}:{number}: no label for {row[path_col].strip()!r}")
        yield number, row[path_col].strip(), row[label_col]


def _find_column(path: PathLike, header: Sequence[str], names: Sequence[str], what: str) -> int:
    """Position of the first of ``names`` in a CSV header (case and whitespace insensitive)."""
    cells = [cell.strip().lower() for cell in header]
    for name in names:
        if name in cells:
            return cells.index(name)
    raise ListFileError(
        f"{path}:1: CSV header {header!r} has no {what} column (expected one of {list(names)})"
    )


def _looks_like_csv(path: PathLike, lines: Sequence[str]) -> bool:
    # A plain line may contain a comma inside its path ("a,b.mp4 3"); it still ends in an integer label.
    if Path(path).suffix.lower() == ".csv":
        return True
    first = next((line.strip() for line in lines if line.strip() and not line.strip().startswith("#")), "")
    return "," in first and not _INTEGER.fullmatch(first.rsplit(maxsplit=1)[-1])


def _make_entry(path: PathLike, line: int, video: str, label: str, num_classes: int | None) -> VideoEntry:
    if "\0" in video:  # no file name can hold one; the OS would refuse it deep inside training
        raise ListFileError(f"{path}:{line}: path {video!r} contains a NUL byte")
    label = label.strip()
    if not _INTEGER.fullmatch(label):
        raise ListFileError(f"{path}:{line}: label {label!r} is not an integer")
    value = int(label)
    if value < 0:
        raise ListFileError(f"{path}:{line}: label {value} is negative")
    if num_classes is not None and value >= num_classes:
        raise ListFileError(
            f"{path}:{line}: label {value} out of range for num_classes={num_classes} "
            f"(valid labels are 0..{num_classes - 1})"
        )
    return VideoEntry(path=video, label=value, line=line)


def _check_files_exist(path: PathLike, entries: Iterable[VideoEntry], data_root: PathLike | None) -> None:
    for entry in entries:
        video = resolve_path(entry, data_root)
        if not video.is_file():
            raise ListFileError(f"{path}:{entry.line}: video file not found: {video}")


def _check_plain_path(video: str) -> None:
    if not video or video != video.strip() or video.startswith("#") or "\n" in video or "\r" in video:
        raise ValueError(f"path {video!r} cannot be written to a plain list file; use a .csv list instead")


# ----------------------------------------------------------------------------------------- class names


def read_class_names(path: PathLike) -> list[str]:
    """Class names in label order, from any of the formats the field uses.

    * ``classes.txt``: one name per line (blank lines at the end are ignored, blank lines in between are
      an error, since they would shift every following label);
    * a JSON list of names (the official EVL Kinetics-400 mapping);
    * a JSON dict ``{name: index}`` (mmaction2 / X-CLIP style) or ``{"index": name}`` (Hugging Face
      ``id2label``); indices must be exactly 0..N-1;
    * a CSV with an ``id,name`` header (X-CLIP's ``labels/*.csv``).

    Names must be unique and non-empty.
    """
    text = _read_text(path, "class-names file")
    suffix = Path(path).suffix.lower()
    if suffix == ".json" or _is_json(text):
        names = _names_from_json(path, text)
    elif suffix == ".csv" or _is_id_name_header(text.split("\n", 1)[0]):
        names = _names_from_csv(path, text)
    else:
        names = _names_from_lines(path, text)
    if not names:
        raise ListFileError(f"{path}: no class names")
    return names


def write_class_names(path: PathLike, names: Sequence[str]) -> None:
    """Write class names (atomically): a JSON list for a ``.json`` suffix, else one name per line."""
    names = [str(name) for name in names]
    for index, name in enumerate(names):
        if not name.strip() or name != name.strip() or "\n" in name or "\r" in name:
            raise ValueError(f"class {index}: name {name!r} is empty, spans lines or has surrounding spaces")
    if len(set(names)) != len(names):
        raise ValueError("class names are not unique")
    if Path(path).suffix.lower() == ".json":
        text = json.dumps(names, ensure_ascii=False, indent=0) + "\n"
    else:
        text = "".join(f"{name}\n" for name in names)
    atomic_write_text(path, text)


def _names_from_lines(path: PathLike, text: str) -> list[str]:
    lines = [line.strip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    for number, name in enumerate(lines, start=1):
        if not name:
            raise ListFileError(f"{path}:{number}: blank class name (it would shift every later label)")
    _check_unique(path, list(enumerate(lines, start=1)), "class name")
    return lines


def _names_from_json(path: PathLike, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ListFileError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if isinstance(data, list):
        names = data
    elif isinstance(data, dict):
        names = _names_from_mapping(path, data)
    else:
        raise ListFileError(
            f"{path}: expected a JSON list or object of class names, got {type(data).__name__}"
        )
    bad = next((name for name in names if not isinstance(name, str) or not name.strip()), None)
    if bad is not None:
        raise ListFileError(f"{path}: class name {bad!r} is not a non-empty string")
    names = [name.strip() for name in names]
    _check_unique(path, [(index, name) for index, name in enumerate(names)], "class name", where="index")
    return names


def _names_from_mapping(path: PathLike, mapping: dict) -> list:
    """Order a ``{name: index}`` or ``{"index": name}`` mapping by index."""
    if all(isinstance(value, str) for value in mapping.values()):
        pairs = [(key, value) for key, value in mapping.items()]  # id2label: index as the key
    else:
        pairs = [(value, key) for key, value in mapping.items()]
    by_index: dict[int, object] = {}
    for index, name in pairs:
        if isinstance(index, bool) or not _INTEGER.fullmatch(str(index).strip()):
            raise ListFileError(f"{path}: class {name!r} has a non-integer index {index!r}")
        by_index[int(str(index))] = name
    if sorted(by_index) != list(range(len(mapping))):
        raise ListFileError(
            f"{path}: class indices must be exactly 0..{len(mapping) - 1} "
            f"(got {len(by_index)} distinct, from {min(by_index, default=0)} to {max(by_index, default=0)})"
        )
    return [by_index[index] for index in range(len(mapping))]


def _is_json(text: str) -> bool:
    # Sniffed without a .json suffix; a text file whose first name starts with "[" is still text.
    if text.lstrip()[:1] not in ("[", "{"):
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _is_id_name_header(line: str) -> bool:
    # Names may contain commas (Something-Something templates), so a comma alone does not make a CSV.
    cells = {cell.strip().lower() for cell in next(csv.reader([line]), [])}
    return bool(cells & set(ID_COLUMNS)) and bool(cells & set(NAME_COLUMNS))


def _names_from_csv(path: PathLike, text: str) -> list[str]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None) or []
    id_col = _find_column(path, header, ID_COLUMNS, "id")
    name_col = _find_column(path, header, NAME_COLUMNS, "name")
    by_id: dict[int, tuple[int, str]] = {}
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        number = reader.line_num
        if len(row) <= max(id_col, name_col):
            raise ListFileError(f"{path}:{number}: row has {len(row)} fields, header has {len(header)}")
        raw_id, name = row[id_col].strip(), row[name_col].strip()
        if not _INTEGER.fullmatch(raw_id):
            raise ListFileError(f"{path}:{number}: class id {raw_id!r} is not an integer")
        if int(raw_id) in by_id:
            first = by_id[int(raw_id)][0]
            raise ListFileError(f"{path}:{number}: class id {raw_id} already given on line {first}")
        by_id[int(raw_id)] = (number, name)
    if sorted(by_id) != list(range(len(by_id))):
        raise ListFileError(f"{path}: class ids must be exactly 0..{len(by_id) - 1}")
    ordered = [by_id[index] for index in range(len(by_id))]
    for number, name in ordered:
        if not name:
            raise ListFileError(f"{path}:{number}: empty class name")
    _check_unique(path, ordered, "class name")
    return [name for _, name in ordered]


# -------------------------------------------------------------------------------------------- helpers


def _check_unique(path: PathLike, items: Sequence[tuple[int, str]], what: str, where: str = "line") -> None:
    """Raise on the first value seen twice, naming both places (``items`` holds (place, value) pairs)."""
    seen: dict[str, int] = {}
    for place, value in items:
        if value in seen:
            if where == "line":
                raise ListFileError(
                    f"{path}:{place}: duplicate {what} {value!r} (first on line {seen[value]})"
                )
            raise ListFileError(f"{path}: duplicate {what} {value!r} at {where} {seen[value]} and {place}")
        seen[value] = place


def _read_text(path: PathLike, what: str, raw_bytes: bool = False) -> str:
    """The file's text with any UTF-8 BOM removed and line endings (CRLF, CR) normalised to ``\\n``.

    The text must be UTF-8. With ``raw_bytes`` (list files, whose paths are file names), bytes that are not
    UTF-8 are kept as lone surrogates, as ``os.fsdecode`` keeps them, so a file whose name is not UTF-8
    can still be listed byte for byte.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ListFileError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ListFileError(f"{path}: {what} is a directory") from None
    except OSError as err:
        raise ListFileError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    for bom, encoding in _UTF16_32_BOMS:
        if data.startswith(bom):
            raise ListFileError(f"{path}: {what} is {encoding} text; save it as UTF-8")
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8", errors="surrogateescape" if raw_bytes else "strict")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ListFileError(
            f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[err.start]:02x} at column {column})"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


# Longest first: the UTF-32-LE mark starts with the UTF-16-LE one.
_UTF16_32_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
