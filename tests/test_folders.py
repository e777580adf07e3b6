"""Lists from a folder of videos: layouts, the seeded stratified split, unreadable files, output files."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from evl.video.checks import check_video
from evl.video.folder_lists import format_summary, lists_from_folder, stratified_split, val_count
from evl.video.folders import scan_folder
from evl.video.lists import VideoEntry, read_class_names, read_list
from factories import tiny_dataset

CLASSES = ["down", "left", "right", "up"]  # the motion task's class folders, sorted


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """videos/train/<class>/ holds 3 videos per class, videos/val/<class>/ 1; in videos/train also an empty
    file, a truncated one, a video outside any class folder and a file that is no video."""
    data = tiny_dataset(tmp_path_factory.mktemp("folders"), train_per_class=3, val_per_class=1)
    classes = data.root / "videos" / "train"
    whole = (classes / "left" / "0000.mp4").read_bytes()
    (classes / "left" / "empty.mp4").write_bytes(b"")
    (classes / "up" / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    (classes / "loose.mp4").write_bytes(whole)
    (classes / "up" / "notes.txt").write_text("not a video\n")
    return data


def lists_of(folder: Path, out: Path, **kwargs):
    return lists_from_folder(folder, out, progress=False, **kwargs)


def entries(path: Path) -> list[tuple[str, int]]:
    return [(entry.path, entry.label) for entry in read_list(path)]


# ----------------------------------------------------------------------------------------------- the split


def fake_entries(per_class: int, classes: int = 4) -> list[VideoEntry]:
    paths = [(f"c{label}/v{index:02d}.mp4", label) for label in range(classes) for index in range(per_class)]
    return [VideoEntry(path, label, line) for line, (path, label) in enumerate(paths, start=1)]


def test_each_class_gives_its_fraction_to_validation():
    train, val = stratified_split(fake_entries(10), val_fraction=0.2, seed=0)
    assert Counter(entry.label for entry in val) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert Counter(entry.label for entry in train) == {0: 8, 1: 8, 2: 8, 3: 8}
    assert {e.path for e in train} | {e.path for e in val} == {e.path for e in fake_entries(10)}


def test_the_split_is_a_function_of_the_seed_and_the_paths():
    items = fake_entries(10)
    first = stratified_split(items, 0.3, seed=5)
    assert stratified_split(items, 0.3, seed=5) == first
    shuffled = stratified_split(items[::-1], 0.3, seed=5)
    assert {e.path for e in shuffled[1]} == {e.path for e in first[1]}  # not the listing order
    assert {e.path for e in stratified_split(items, 0.3, seed=6)[1]} != {e.path for e in first[1]}
    # One class's draw does not depend on the other classes.
    alone = stratified_split([e for e in items if e.label == 2], 0.3, seed=5)
    assert alone[1] == [e for e in first[1] if e.label == 2]


def test_val_count_rounds_and_keeps_both_sides():
    assert [val_count(n, 0.2) for n in (1, 2, 3, 5, 10, 12)] == [0, 1, 1, 1, 2, 2]
    assert val_count(2, 0.9) == 1  # one video stays for training
    assert val_count(7, 0.0) == 0


# ------------------------------------------------------------------------------------------------ layouts


def test_class_folders_give_a_seeded_stratified_split(dataset, tmp_path):
    folder = dataset.root / "videos" / "train"
    result = lists_of(folder, tmp_path / "a", val_fraction=0.34, seed=3, workers=2)
    again = lists_of(folder, tmp_path / "b", val_fraction=0.34, seed=3, workers=1)
    assert result.layout == "classes" and result.data_root == folder
    for name in ("train.txt", "val.txt", "classes.txt"):  # same seed, same files, whatever the workers
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert again.summary == result.summary

    train, val = entries(result.train_list), entries(result.val_list)
    assert read_class_names(result.classes_file) == CLASSES
    assert Counter(label for _, label in val) == {0: 1, 1: 1, 2: 1, 3: 1}  # one of each class's three
    assert Counter(label for _, label in train) == {0: 2, 1: 2, 2: 2, 3: 2}
    for path, label in train + val:  # relative to the folder, labelled by their class folder
        assert (folder / path).is_file() and path.split("/")[0] == CLASSES[label]
    assert not {path for path, _ in train} & {path for path, _ in val}

    other = lists_of(folder, tmp_path / "c", val_fraction=0.34, seed=4)
    assert entries(other.val_list) != val  # three candidates per class: another seed draws others


def test_train_and_val_folders_are_kept_as_they_are(dataset, tmp_path):
    folder = dataset.root / "videos"  # train/<class>/ and val/<class>/
    result = lists_of(folder, tmp_path, val_fraction=0.5, workers=2)
    assert result.layout == "train/val"
    by_name = dict(enumerate(read_class_names(dataset.classes_file)))  # synth's own label order

    def expected(list_path: Path) -> set[tuple[str, int]]:
        return {
            (path.removeprefix("videos/"), CLASSES.index(by_name[label]))
            for path, label in entries(list_path)
        }

    assert set(entries(result.val_list)) == expected(dataset.val_list)
    assert set(entries(result.train_list)) == expected(dataset.train_list)
    assert [(s.name, s.train, s.val) for s in result.summary] == [(name, 3, 1) for name in CLASSES]


def test_unreadable_files_are_left_out_and_reported(dataset, tmp_path):
    folder = dataset.root / "videos" / "train"
    result = lists_of(folder, tmp_path, workers=2)
    listed = {path for path, _ in entries(result.train_list) + entries(result.val_list)}
    assert len(listed) == 12 and not {"left/empty.mp4", "up/cut.mp4", "loose.mp4"} & listed

    reasons = dict(line.split(": ", 1) for line in result.skipped_file.read_text().splitlines())
    assert set(reasons) == {"left/empty.mp4", "up/cut.mp4", "loose.mp4"}
    assert "empty file" in reasons["left/empty.mp4"]
    assert "not a readable video" in reasons["up/cut.mp4"]
    assert "not in a class folder" in reasons["loose.mp4"]
    assert dict(result.skipped) == reasons

    with result.summary_file.open(newline="") as file:
        rows = {row["path"]: row for row in csv.DictReader(file)}
    assert set(rows) == listed | {"left/empty.mp4", "up/cut.mp4"}  # every file checked, "notes.txt" not
    good = rows["down/0000.mp4"]
    assert (good["class"], good["frames"], good["width"], good["height"]) == ("down", "10", "48", "48")
    assert (good["codec"], good["ok"], float(good["seconds"])) == ("h264", "True", pytest.approx(0.4))
    assert rows["up/cut.mp4"]["ok"] == "False" and rows["up/cut.mp4"]["reason"] == reasons["up/cut.mp4"]

    table = format_summary(result)
    assert [line.rsplit(maxsplit=5)[0] for line in table.splitlines()] == [
        "class",
        *CLASSES,
        "(no class)",
        "total",
    ]
    assert table.splitlines()[-1].split() == ["total", "12", "8", "4", "0.00", "3"]
    skipped = {s.name: s.skipped for s in result.summary}
    assert skipped == {"down": 0, "left": 1, "right": 0, "up": 1}


def test_a_truncated_video_whose_index_survives_is_caught(tmp_path, dataset):
    # Cut the media data but keep the header and index: opens fine, its last frames cannot be decoded.
    source = dataset.root / dataset.train_list.read_text().split()[0]
    data = source.read_bytes()
    mdat = data.index(b"mdat")
    moov = data.index(b"moov") - 4
    assert mdat < moov  # x264 through PyAV: media first, index last
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: mdat + 200] + bytes(moov - mdat - 200) + data[moov:])  # frames zeroed
    check = check_video(cut)
    assert not check.ok and check.reason


def test_existing_lists_are_not_replaced_unasked(dataset, tmp_path):
    folder = dataset.root / "videos" / "train"
    (tmp_path / "train.txt").write_text("mine.mp4 0\n")
    with pytest.raises(ValueError, match=r"train\.txt: already exists") as info:
        lists_of(folder, tmp_path)
    assert "\n" not in str(info.value)
    assert (tmp_path / "train.txt").read_text() == "mine.mp4 0\n"
    result = lists_of(folder, tmp_path, overwrite=True, val_fraction=0.0)
    assert result.val_list is None and not (tmp_path / "val.txt").exists()
    assert len(entries(result.train_list)) == 12


def test_bad_folders_and_settings_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        scan_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="no class subfolders"):
        scan_folder(tmp_path / "flat")
    with pytest.raises(ValueError, match="val_fraction"):
        lists_from_folder(tmp_path / "flat", tmp_path / "out", val_fraction=1.0)
    (tmp_path / "flat" / "cls").mkdir()
    (tmp_path / "flat" / "cls" / "b.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable video to train on") as info:
        lists_of(tmp_path / "flat", tmp_path / "out")
    assert "\n" not in str(info.value)
    assert (tmp_path / "out" / "skipped.txt").read_text().splitlines() == [
        "a.mp4: not in a class folder",
        "cls/b.mp4: empty file (0 bytes)",
    ]


# ------------------------------------------------------------------------------------------- command line
# `evl lists` through the command line (parser and handler: evl/cli/data.py).


def test_evl_lists_command(dataset, tmp_path, capsys):
    from evl.cli import main

    folder = dataset.root / "videos" / "train"
    code = main(
        ["lists", str(folder), "--out-dir", str(tmp_path), "--seed", "1", "--workers", "2", "--quiet"]
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split() == ["class", "videos", "train", "val", "hours", "skipped"]
    assert "total" in out and "3 videos left out" in err
    assert len(read_list(tmp_path / "train.txt")) + len(read_list(tmp_path / "val.txt")) == 12
    assert main(["lists", str(folder), "--out-dir", str(tmp_path)]) == 2  # lists there: not replaced
