"""Few-shot and base-to-novel splits: exact draws, nesting, errors, list files and the HM metric."""

from __future__ import annotations

import json
import random

import pytest

from evl.splits import (
    base_novel,
    base_novel_from_names,
    few_shot,
    write_base_novel_lists,
    write_few_shot_lists,
)
from evl.video.lists import VideoEntry, read_class_names, read_list


def make_entries(num_classes: int = 3, per_class: int = 5) -> list[VideoEntry]:
    """Interleaved classes: c0/v0, c1/v0, c2/v0, c0/v1, ... (line numbers from 1)."""
    paths = [(f"c{c}/v{i}.mp4", c) for i in range(per_class) for c in range(num_classes)]
    return [VideoEntry(path, label, line) for line, (path, label) in enumerate(paths, start=1)]


def paths(entries: list[VideoEntry]) -> list[str]:
    return [e.path for e in entries]


# ------------------------------------------------------------------------------------------- few-shot

# Pinned draws: SHA-256 ranking, so they hold on every platform and NumPy version.
EXPECTED_SEED0 = {
    1: ["c2/v0.mp4", "c0/v2.mp4", "c1/v3.mp4"],
    2: ["c1/v0.mp4", "c2/v0.mp4", "c0/v2.mp4", "c2/v2.mp4", "c0/v3.mp4", "c1/v3.mp4"],
}


@pytest.mark.parametrize("k", [1, 2])
def test_few_shot_exact_draw(k):
    assert paths(few_shot(make_entries(), k, seed=0)) == EXPECTED_SEED0[k]


def test_few_shot_other_seed_exact_and_different():
    drawn = paths(few_shot(make_entries(), 2, seed=1))
    assert drawn == ["c2/v0.mp4", "c2/v1.mp4", "c0/v2.mp4", "c1/v2.mp4", "c1/v3.mp4", "c0/v4.mp4"]
    assert drawn != EXPECTED_SEED0[2]


def test_few_shot_counts_order_and_entries_kept():
    entries = make_entries()
    for k in range(1, 6):
        drawn = few_shot(entries, k, seed=7)
        assert [sum(e.label == c for e in drawn) for c in range(3)] == [k, k, k]
        lines = [e.line for e in drawn]
        assert lines == sorted(lines)  # original list order
        assert all(e in entries for e in drawn)  # the same records, labels and lines untouched
    assert few_shot(entries, 5, seed=7) == entries


def test_few_shot_deterministic_and_nested():
    entries = make_entries(num_classes=4, per_class=20)
    for seed in (0, 1, 2):
        previous: set[str] = set()
        for k in (2, 4, 8, 16):
            drawn = set(paths(few_shot(entries, k, seed)))
            assert drawn == set(paths(few_shot(entries, k, seed)))
            assert previous < drawn
            previous = drawn
    assert len({tuple(paths(few_shot(entries, 4, seed))) for seed in range(5)}) > 1


def test_few_shot_does_not_depend_on_list_order():
    entries = make_entries()
    shuffled = entries[:]
    random.Random(3).shuffle(shuffled)
    assert set(paths(few_shot(shuffled, 2, seed=0))) == set(EXPECTED_SEED0[2])
    out = few_shot(shuffled, 2, seed=0)
    assert out == [e for e in shuffled if e in out]  # order follows the input, not the labels


def test_few_shot_too_few_videos_errors_or_warns():
    entries = make_entries()[:-1]  # class 2 keeps 4 videos
    with pytest.raises(ValueError, match=r"class 'jump' \(label 2\) has 4 videos, fewer than k=5"):
        few_shot(entries, 5, seed=0, class_names=["run", "walk", "jump"])
    with pytest.raises(ValueError, match=r"class label 2 has 4 videos"):
        few_shot(entries, 5, seed=0)
    with pytest.warns(UserWarning, match=r"1 classes have fewer than k=5"):
        drawn = few_shot(entries, 5, seed=0, allow_fewer=True)
    assert drawn == entries


def test_few_shot_counts_empty_classes_when_names_given():
    entries = make_entries(num_classes=2)
    with pytest.raises(ValueError, match=r"class 'c' \(label 2\) has 0 videos"):
        few_shot(entries, 1, seed=0, class_names=["a", "b", "c"])
    assert len(few_shot(entries, 1, seed=0)) == 2


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_few_shot_rejects_bad_k(k):
    with pytest.raises(ValueError, match="positive integer"):
        few_shot(make_entries(), k, seed=0)


# -------------------------------------------------------------------------------------- base / novel


@pytest.mark.parametrize(
    ("num_classes", "sizes"), [(51, (26, 25)), (101, (51, 50)), (400, (200, 200)), (174, (87, 87))]
)
def test_base_novel_sizes_follow_vificlip(num_classes, sizes):
    names = [f"class {i}" for i in range(num_classes)]
    base, novel = base_novel(names)
    assert (len(base), len(novel)) == sizes
    assert base == list(range(sizes[0]))
    assert novel == list(range(sizes[0], num_classes))


BASE3 = [4, 7, 9]  # seed 0, 3 of 10 classes: the three best-ranked names


def test_base_novel_seeded_exact_and_disjoint():
    names = [str(i) for i in range(10)]
    assert base_novel(names, seed=0) == ([3, 4, 7, 8, 9], [0, 1, 2, 5, 6])
    assert base_novel(names, seed=1) == ([4, 5, 6, 7, 8], [0, 1, 2, 3, 9])
    base, novel = base_novel([f"k{i}" for i in range(101)], seed=5)
    assert (len(base), len(novel)) == (51, 50)
    assert sorted(base + novel) == list(range(101))
    assert base != list(range(51))
    assert base_novel(names, seed=0, num_base=3) == (BASE3, [i for i in range(10) if i not in BASE3])
    assert set(base_novel(names, seed=0, num_base=3)[0]) < set(base_novel(names, seed=0)[0])


def test_base_novel_errors():
    with pytest.raises(ValueError, match=r"num_base must be in 1\.\.2"):
        base_novel(["a", "b", "c"], num_base=3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        base_novel(["a"])
    with pytest.raises(ValueError, match="not unique"):
        base_novel(["a", "a", "b"])


def test_base_novel_from_names_keeps_their_order():
    classes = ["brush_hair", "cartwheel", "ride_bike", "wave"]
    base, novel = base_novel_from_names(classes, ["wave", "Ride Bike"])
    assert (base, novel) == ([3, 2], [0, 1])
    with pytest.raises(ValueError, match=r"not in the class list: \['swim'\]"):
        base_novel_from_names(classes, ["swim"])
    with pytest.raises(ValueError, match="same class twice"):
        base_novel_from_names(classes, ["wave", "wave"])


# ----------------------------------------------------------------------------------------------- files


def write_plain(path, entries):
    path.write_text("".join(f"{e.path} {e.label}\n" for e in entries), encoding="utf-8")
    return path


def test_write_few_shot_lists(tmp_path):
    source = write_plain(tmp_path / "train1.txt", make_entries())
    written = write_few_shot_lists(source, tmp_path / "out", ks=(1, 2), seed=0)
    assert [p.name for p in written] == ["train1_few_shot_1.txt", "train1_few_shot_2.txt"]
    for path, k in zip(written, (1, 2), strict=True):
        back = read_list(path)
        assert [(e.path, e.label) for e in back] == [(p, int(p[1])) for p in EXPECTED_SEED0[k]]
    with pytest.raises(ValueError, match="fewer than k=6"):
        write_few_shot_lists(source, tmp_path / "out", ks=(6,))


def test_write_few_shot_lists_checks_files_under_data_root(tmp_path):
    source = write_plain(tmp_path / "train.txt", make_entries(num_classes=1, per_class=2))
    (tmp_path / "videos" / "c0").mkdir(parents=True)
    (tmp_path / "videos" / "c0" / "v0.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="video file not found"):
        write_few_shot_lists(source, tmp_path / "out", ks=(1,), data_root=tmp_path / "videos")
    (tmp_path / "videos" / "c0" / "v1.mp4").write_bytes(b"")
    assert len(write_few_shot_lists(source, tmp_path / "out", ks=(1,), data_root=tmp_path / "videos")) == 1


def test_write_base_novel_lists(tmp_path):
    names = ["brush_hair", "cartwheel", "catch", "chew", "clap"]  # base: first 3
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(names) + "\n", encoding="utf-8")
    train = write_plain(tmp_path / "train.txt", make_entries(num_classes=5, per_class=4))
    val_entries = [VideoEntry(f"val/{c}_{i}.mp4", c, 0) for c in range(5) for i in range(2)]
    val = write_plain(tmp_path / "val.txt", val_entries)
    out = tmp_path / "b2n"
    written = write_base_novel_lists(train, classes, out, shots=2, seeds=(1, 2, 3), val_list=val)
    assert [p.name for p in written] == [
        "fs_base_s1_train.txt",
        "fs_base_s2_train.txt",
        "fs_base_s3_train.txt",
        "base_val.txt",
        "novel_val.txt",
        "base_classes.txt",
        "novel_classes.txt",
        "split.json",
    ]
    assert read_class_names(out / "base_classes.txt") == names[:3]
    assert read_class_names(out / "novel_classes.txt") == names[3:]
    drawn = []
    for seed in (1, 2, 3):
        entries = read_list(out / f"fs_base_s{seed}_train.txt", num_classes=3)
        assert sorted(e.label for e in entries) == [0, 0, 1, 1, 2, 2]
        assert all(e.path.startswith(f"c{e.label}/") for e in entries)  # base labels are global 0..2
        drawn.append(tuple(e.path for e in entries))
    assert len(set(drawn)) > 1  # the three seeds are different draws
    novel_val = read_list(out / "novel_val.txt", num_classes=2)
    assert [(e.path, e.label) for e in novel_val] == [
        ("val/3_0.mp4", 0),
        ("val/3_1.mp4", 0),
        ("val/4_0.mp4", 1),
        ("val/4_1.mp4", 1),
    ]
    assert [e.label for e in read_list(out / "base_val.txt")] == [0, 0, 1, 1, 2, 2]
    meta = json.loads((out / "split.json").read_text())
    assert meta["base_ids"] == [0, 1, 2] and meta["novel_ids"] == [3, 4]


def test_write_base_novel_lists_from_reference_base_labels(tmp_path):
    names = ["brush_hair", "cartwheel", "catch", "chew"]
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(names) + "\n", encoding="utf-8")
    base_csv = tmp_path / "base_labels.csv"
    base_csv.write_text("id,name\n0,chew\n1,brush hair\n", encoding="utf-8")
    train = write_plain(tmp_path / "train.txt", make_entries(num_classes=4, per_class=3))
    out = tmp_path / "b2n"
    write_base_novel_lists(train, classes, out, shots=1, seeds=(1,), base_classes=base_csv)
    assert read_class_names(out / "base_classes.txt") == ["chew", "brush_hair"]
    assert read_class_names(out / "novel_classes.txt") == ["cartwheel", "catch"]
    entries = read_list(out / "fs_base_s1_train.txt")
    # Global class 3 (chew) becomes base label 0, class 0 (brush_hair) base label 1.
    assert sorted((e.path[:2], e.label) for e in entries) == [("c0", 1), ("c3", 0)]
    with pytest.raises(ValueError, match="not both"):
        write_base_novel_lists(train, classes, out, base_classes=["chew"], split_seed=1)
