"""Tests for evl.video.lists: list and class-name formats, and one-line errors that name file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evl.video.lists import (
    ListFileError,
    VideoEntry,
    read_class_names,
    read_list,
    resolve_path,
    write_class_names,
    write_list,
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def check_error(info: pytest.ExceptionInfo, path: Path, line: int | None, *fragments: str) -> None:
    """The error is one line, starts with ``path:line:`` (or ``path:``) and mentions every fragment."""
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}:{line}:" if line is not None else f"{path}:"), message
    for fragment in fragments:
        assert fragment in message, message


# ----------------------------------------------------------------------------------------------- lists


def test_plain_list_with_spaces_tabs_comments_and_blank_lines(tmp_path):
    text = "# K400 val\nabseiling/a b c.mp4 0\n\n  air drumming/x.mp4\t\t3  \nclips/tab\tname.mp4\t12\n"
    entries = read_list(write(tmp_path / "val.txt", text))
    assert entries == [
        VideoEntry("abseiling/a b c.mp4", 0, 2),
        VideoEntry("air drumming/x.mp4", 3, 4),
        VideoEntry("clips/tab\tname.mp4", 12, 5),
    ]


def test_crlf_and_bom_are_handled(tmp_path):
    path = write(tmp_path / "train.txt", "\ufeffa.mp4 1\r\nb.mp4 2\r\n", encoding="utf-8")
    assert [(e.path, e.label, e.line) for e in read_list(path)] == [("a.mp4", 1, 1), ("b.mp4", 2, 2)]


def test_plain_path_with_a_comma_is_not_mistaken_for_csv(tmp_path):
    path = write(tmp_path / "list.txt", "clips/a,b.mp4 3\n")
    assert read_list(path) == [VideoEntry("clips/a,b.mp4", 3, 1)]


def test_csv_list_by_suffix_with_quoted_commas_and_extra_columns(tmp_path):
    text = 'youtube_id,Video,split,Label\nx1,"clips/a, b.mp4",val,4\n\nx2,c.mp4,val,0\n'
    entries = read_list(write(tmp_path / "val.csv", text))
    assert entries == [VideoEntry("clips/a, b.mp4", 4, 2), VideoEntry("c.mp4", 0, 4)]


def test_csv_list_detected_from_header_without_suffix(tmp_path):
    path = write(tmp_path / "val.list", "filename,label_id\r\na.mp4,1\r\n")
    assert read_list(path) == [VideoEntry("a.mp4", 1, 2)]


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [
        ("a.mp4 1\nb.mp4\n", 2, ["no label", "'b.mp4'"]),
        ("a.mp4 1.5\n", 1, ["'1.5'", "not an integer"]),
        ("# header\na.mp4 abc\n", 2, ["'abc'", "not an integer"]),
        ("a.mp4 -2\n", 1, ["negative"]),
        ("a.mp4 0\nb.mp4 10\n", 2, ["label 10", "num_classes=10", "0..9"]),
        ("a.mp4 0\nb.mp4 1\n./a.mp4 2\n", 3, ["duplicate", "first on line 1"]),
    ],
    ids=["no-label", "float-label", "text-label", "negative", "out-of-range", "duplicate"],
)
def test_plain_list_errors_name_file_and_line(tmp_path, text, line, fragments):
    path = write(tmp_path / "bad.txt", text)
    with pytest.raises(ListFileError) as info:
        read_list(path, num_classes=10)
    check_error(info, path, line, *fragments)


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [
        ("name,label\na.mp4,1\n", 1, ["no path column", "'path'"]),
        ("path,target\na.mp4,1\n", 1, ["no label column"]),
        ("path,label\na.mp4,1\nb.mp4\n", 3, ["1 fields"]),
        ("path,label\na.mp4,\n", 2, ["no label"]),
        ("path,label\na.mp4,x\n", 2, ["'x'", "not an integer"]),
    ],
    ids=["no-path-column", "no-label-column", "short-row", "empty-label", "bad-label"],
)
def test_csv_list_errors_name_file_and_line(tmp_path, text, line, fragments):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(ListFileError) as info:
        read_list(path)
    check_error(info, path, line, *fragments)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "path,label\n"])
def test_empty_list_is_an_error(tmp_path, text):
    path = write(tmp_path / ("empty.csv" if "," in text else "empty.txt"), text)
    with pytest.raises(ListFileError) as info:
        read_list(path)
    check_error(info, path, None, "empty list file")


def test_missing_list_file_is_a_list_file_error(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(ListFileError) as info:
        read_list(path)
    check_error(info, path, None, "not found")


def test_check_files_reports_the_resolved_path(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"x")
    path = write(tmp_path / "list.txt", "a.mp4 0\nmissing clip.mp4 1\n")
    with pytest.raises(ListFileError) as info:
        read_list(path, data_root=tmp_path / "videos", check_files=True)
    check_error(info, path, 2, "video file not found", str(tmp_path / "videos" / "missing clip.mp4"))
    assert len(read_list(path, data_root=tmp_path / "videos")) == 2  # not checked by default


def test_resolve_path_joins_relative_paths_only(tmp_path):
    assert resolve_path(VideoEntry("a/b.mp4", 0, 1), tmp_path) == tmp_path / "a" / "b.mp4"
    assert resolve_path(VideoEntry("/abs/b.mp4", 0, 1), tmp_path) == Path("/abs/b.mp4")
    assert resolve_path(VideoEntry("a/b.mp4", 0, 1), None) == Path("a/b.mp4")


@pytest.mark.parametrize("name", ["list.txt", "list.csv"])
def test_write_list_round_trips(tmp_path, name):
    entries = [VideoEntry("dir with space/a.mp4", 3, 1), VideoEntry("b.mp4", 0, 2)]
    if name.endswith(".csv"):
        entries.append(VideoEntry("c, quoted.mp4", 7, 3))
    path = tmp_path / "out" / name
    write_list(path, entries)
    back = read_list(path)
    assert [(e.path, e.label) for e in back] == [(e.path, e.label) for e in entries]
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no temporary file left behind


def test_write_list_refuses_paths_the_plain_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"use a \.csv list"):
        write_list(tmp_path / "l.txt", [VideoEntry("#hidden.mp4", 0, 1)])
    assert not (tmp_path / "l.txt").exists()


# ----------------------------------------------------------------------------------------- class names


def test_class_names_from_text_with_trailing_blank_lines(tmp_path):
    path = write(
        tmp_path / "classes.txt", "\ufeffabseiling\r\nair drumming\r\nPutting something, then more\n\n\n"
    )
    assert read_class_names(path) == ["abseiling", "air drumming", "Putting something, then more"]


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [
        ("a\n\nb\n", 2, ["blank class name"]),
        ("a\nb\na\n", 3, ["duplicate class name 'a'", "first on line 1"]),
    ],
)
def test_class_names_text_errors(tmp_path, text, line, fragments):
    path = write(tmp_path / "classes.txt", text)
    with pytest.raises(ListFileError) as info:
        read_class_names(path)
    check_error(info, path, line, *fragments)


def test_class_names_text_starting_with_a_bracket_is_not_json(tmp_path):
    path = write(tmp_path / "classes.txt", "[something] falls\nother\n")
    assert read_class_names(path) == ["[something] falls", "other"]


def test_class_names_from_json_list_and_dicts(tmp_path):
    names = ["abseiling", "air drumming", "answering questions"]
    assert read_class_names(write(tmp_path / "k400.json", json.dumps(names))) == names
    by_name = {"air drumming": 1, "answering questions": 2, "abseiling": 0}
    assert read_class_names(write(tmp_path / "map.json", json.dumps(by_name))) == names
    id2label = {"2": "answering questions", "0": "abseiling", "1": "air drumming"}
    assert read_class_names(write(tmp_path / "id2label.json", json.dumps(id2label))) == names


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"a": 0, "b": 2}, "exactly 0..1"),
        ({"a": 0, "b": 0}, "exactly 0..1"),
        ({"a": 0, "b": "x"}, "non-integer index"),
        (["a", "b", "a"], "duplicate class name 'a' at index 0 and 2"),
        (["a", 3], "not a non-empty string"),
        ({"a": [0]}, "non-integer index"),
    ],
)
def test_class_names_json_errors(tmp_path, data, fragment):
    path = write(tmp_path / "bad.json", json.dumps(data))
    with pytest.raises(ListFileError) as info:
        read_class_names(path)
    check_error(info, path, None, fragment)


def test_class_names_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path / "bad.json", '[\n"a",\n"b"\n,]')
    with pytest.raises(ListFileError) as info:
        read_class_names(path)
    check_error(info, path, 4, "invalid JSON")


def test_class_names_from_xclip_csv(tmp_path):
    path = write(
        tmp_path / "kinetics_400_labels.csv", 'id,name\n1,"tying knot (not on a tie), loose"\n0,abseiling\n'
    )
    assert read_class_names(path) == ["abseiling", "tying knot (not on a tie), loose"]


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [
        ("id,name\n0,a\n2,b\n", None, ["exactly 0..1"]),
        ("id,name\n0,a\n0,b\n", 3, ["already given on line 2"]),
        ("id,name\n0,a\nx,b\n", 3, ["'x'"]),
        ("id,name\n0,a\n1,a\n", 3, ["duplicate class name 'a'"]),
        ("idx,label_text\n0,a\n", 1, ["no id column"]),
    ],
)
def test_class_names_csv_errors(tmp_path, text, line, fragments):
    path = write(tmp_path / "labels.csv", text)
    with pytest.raises(ListFileError) as info:
        read_class_names(path)
    check_error(info, path, line, *fragments)


@pytest.mark.parametrize("name", ["classes.txt", "classes.json"])
def test_write_class_names_round_trips(tmp_path, name):
    names = ["abseiling", "tying knot (not on a tie)", "Putting something, then more", "ünïcode"]
    path = tmp_path / name
    write_class_names(path, names)
    assert read_class_names(path) == names
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_write_class_names_rejects_duplicates_and_blank_names(tmp_path):
    with pytest.raises(ValueError, match="not unique"):
        write_class_names(tmp_path / "c.txt", ["a", "a"])
    with pytest.raises(ValueError, match="empty"):
        write_class_names(tmp_path / "c.txt", ["a", " "])


def test_empty_and_missing_class_files(tmp_path):
    empty = write(tmp_path / "classes.txt", "\n\n")
    with pytest.raises(ListFileError) as info:
        read_class_names(empty)
    check_error(info, empty, None, "no class names")
    with pytest.raises(ListFileError) as info:
        read_class_names(tmp_path / "none.txt")
    check_error(info, tmp_path / "none.txt", None, "not found")
