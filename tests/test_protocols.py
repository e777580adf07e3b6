"""The cross-dataset zero-shot protocol (X-CLIP / ViFi-CLIP): split sets drawn the Kinetics-600 way or copied
from published lists, and a text method evaluated on every split with the mean ± std of the accuracies."""

from __future__ import annotations

import json
import math
import random
import statistics

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from evl.cli import main
from evl.config import MethodConfig
from evl.engine.evaluate import CrossDatasetResult, EvalSummary, evaluate_cross_dataset, mean_std
from evl.engine.metrics import read_scores
from evl.engine.train import train
from evl.models.registry import clip_state_dict, create_clip
from evl.splits import (
    cross_dataset_splits,
    new_classes,
    read_split_set,
    write_cross_dataset_lists,
    write_published_splits,
)
from evl.video.lists import ListFileError, VideoEntry, read_class_names, read_list, write_list
from factories import tiny_dataset, tiny_run

# ------------------------------------------------------------------------------------ drawing the classes


def test_new_classes_match_names_loosely_and_through_the_same_class_table():
    names = ["Dyeing hair", "abseiling", "Ice_Swimming", "cumbia", "tie dying"]
    excluded = ["dying hair", "ice  swimming", "zumba"]  # K400 spellings; "zumba" is not in the list
    assert new_classes(names, excluded) == [1, 3, 4]
    assert new_classes(names, []) == [0, 1, 2, 3, 4]


def test_drawn_splits_are_seeded_sized_and_independent_of_order_and_count():
    names = [f"class {i:02d}" for i in range(10)]
    splits = cross_dataset_splits(names, range(10), num_splits=3, classes_per_split=4, seed=0)
    assert splits == [[4, 5, 6, 7], [1, 4, 6, 8], [4, 5, 6, 9]]  # pinned: SHA-256, the same everywhere
    assert cross_dataset_splits(names, range(10), 3, 4, seed=1) != splits
    assert cross_dataset_splits(names, range(10), 1, 4, seed=0) == splits[:1]  # split n is (seed, n) alone
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    again = cross_dataset_splits(shuffled, range(10), 3, 4, seed=0)
    assert [{shuffled[i] for i in ids} for ids in again] == [{names[i] for i in ids} for ids in splits]
    odd = cross_dataset_splits(names, [1, 3, 5, 7, 9], 2, 3, seed=0)
    assert all(len(ids) == 3 and ids == sorted(ids) and set(ids) <= {1, 3, 5, 7, 9} for ids in odd)
    with pytest.raises(ValueError, match="classes_per_split=6 is more than the 5 classes"):
        cross_dataset_splits(names, [1, 3, 5, 7, 9], 2, 6)
    with pytest.raises(ValueError, match="num_splits must be a positive integer"):
        cross_dataset_splits(names, range(10), 0, 2)


# ------------------------------------------------------------------------------------------ split files

K600 = [f"new {i:02d}" for i in range(12)] + ["dyeing hair", "Old_A", "old b", "old c"]
K400 = ["dying hair", "old a", "Old B", "old c", "only in k400"]


def write_source(tmp_path, order_seed: int | None = None):
    """A Kinetics-600-like class file and a list of 2 videos per class (the class name in the path)."""
    classes = tmp_path / "k600_classes.txt"
    classes.write_text("\n".join(K600) + "\n", encoding="utf-8")
    excluded = tmp_path / "k400_classes.txt"
    excluded.write_text("\n".join(K400) + "\n", encoding="utf-8")
    entries = [VideoEntry(f"{name}/{i}.mp4", c, 0) for c, name in enumerate(K600) for i in range(2)]
    if order_seed is not None:
        random.Random(order_seed).shuffle(entries)
    write_list(tmp_path / "k600_val.txt", entries)
    return tmp_path / "k600_val.txt", classes, excluded


def test_drawn_set_excludes_renumbers_and_records(tmp_path):
    val, classes, excluded = write_source(tmp_path)
    out = tmp_path / "zs"
    write_cross_dataset_lists(val, classes, out, excluded, num_splits=3, classes_per_split=8, seed=0)
    new = set(K600[:12])
    assert read_class_names(out / "candidate_classes.txt") == K600[:12]
    meta = json.loads((out / "protocol.json").read_text())
    assert (meta["kind"], meta["seed"], meta["num_splits"], meta["classes_per_split"]) == ("drawn", 0, 3, 8)
    assert (meta["num_source_classes"], meta["num_candidates"]) == (16, 12)
    assert meta["excluded_names_not_found"] == ["only in k400"]
    drawn = []
    for n, record in enumerate(meta["splits"], start=1):
        names = read_class_names(out / f"split_{n}_classes.txt")
        assert len(names) == 8 and set(names) <= new  # the requested size, nothing trained on
        assert names == [K600[i] for i in record["class_ids"]]  # class-file order
        entries = read_list(out / f"split_{n}_val.txt", num_classes=8)
        assert sorted(e.label for e in entries) == sorted(list(range(8)) * 2)
        assert all(e.path.split("/")[0] == names[e.label] for e in entries)  # labels renumbered right
        assert (record["num_classes"], record["num_videos"]) == (8, 16)
        drawn.append(tuple(names))
    assert len(set(drawn)) == 3

    # Reproducible: the same bytes again; a reordered list draws the same classes.
    again = tmp_path / "again"
    write_cross_dataset_lists(val, classes, again, excluded, num_splits=3, classes_per_split=8, seed=0)
    for path in sorted(out.iterdir()):
        assert path.read_bytes() == (again / path.name).read_bytes(), path.name
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    val2, classes2, excluded2 = write_source(shuffled, order_seed=1)
    write_cross_dataset_lists(val2, classes2, shuffled / "zs", excluded2, num_splits=3, classes_per_split=8)
    for n in (1, 2, 3):
        name = f"split_{n}_classes.txt"
        assert (shuffled / "zs" / name).read_bytes() == (out / name).read_bytes()
    other = tmp_path / "seed1"
    write_cross_dataset_lists(val, classes, other, excluded, num_splits=3, classes_per_split=8, seed=1)
    assert (other / "split_1_classes.txt").read_bytes() != (out / "split_1_classes.txt").read_bytes()


def test_drawn_set_errors_name_the_file(tmp_path):
    val, classes, _ = write_source(tmp_path)
    unrelated = tmp_path / "ucf.txt"
    unrelated.write_text("ApplyEyeMakeup\nArchery\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ucf\.txt: none of its 2 classes is in .*k600_classes\.txt"):
        write_cross_dataset_lists(val, classes, tmp_path / "a", unrelated, classes_per_split=4)
    with pytest.raises(
        ValueError, match=r"k600_classes\.txt: 12 classes to draw from .*classes_per_split=160"
    ):
        write_cross_dataset_lists(val, classes, tmp_path / "b", tmp_path / "k400_classes.txt")
    few = tmp_path / "few.txt"
    write_list(few, [VideoEntry("old a/0.mp4", 13, 0)])
    with pytest.raises(ValueError, match=r"few\.txt: no video of any of split_1's 2 classes"):
        write_cross_dataset_lists(few, classes, tmp_path / "c", tmp_path / "k400_classes.txt", 1, 2)


def test_published_splits_are_copied_as_they_are(tmp_path):
    names = ["brush_hair", "cartwheel", "catch", "chew", "clap"]
    classes = tmp_path / "hmdb_labels.csv"
    classes.write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(names)), encoding="utf-8")
    lists = []
    for n in (1, 2, 3):
        entries = [VideoEntry(f"{c}/v{n}_{i}.avi", c, 0) for c in range(5) for i in range(n)]
        lists.append(tmp_path / f"val{n}.txt")
        write_list(lists[-1], entries)
    out = tmp_path / "hmdb"
    write_published_splits(lists, out, classes=classes)
    meta = json.loads((out / "protocol.json").read_text())
    assert (meta["kind"], meta["num_splits"]) == ("published", 3)
    for n, source in enumerate(lists, start=1):
        copied = read_list(out / f"split_{n}_val.txt")
        assert [(e.path, e.label) for e in copied] == [(e.path, e.label) for e in read_list(source)]
        assert read_class_names(out / f"split_{n}_classes.txt") == names  # every class is a candidate
        assert meta["splits"][n - 1]["num_videos"] == 5 * n
    split_set = read_split_set(out)
    assert [s.name for s in split_set.splits] == ["split_1", "split_2", "split_3"]

    # One class file per split (ViFi-CLIP's ZS_split{1,2,3}_K600.csv).
    own = [tmp_path / f"own{n}.txt" for n in (1, 2, 3)]
    for n, path in enumerate(own):
        path.write_text("\n".join(names[n : n + 3][::-1]) + "\n", encoding="utf-8")
    subsets = [tmp_path / f"sub{n}.txt" for n in (1, 2, 3)]
    for path in subsets:
        write_list(path, [VideoEntry(f"x{c}.avi", c, 0) for c in range(3)])
    write_published_splits(subsets, tmp_path / "own", split_classes=own)
    assert read_class_names(tmp_path / "own" / "split_2_classes.txt") == ["chew", "catch", "cartwheel"]

    with pytest.raises(ValueError, match="one class file for every split"):
        write_published_splits(lists, tmp_path / "x")
    with pytest.raises(ValueError, match="3 split lists but 2 class files"):
        write_published_splits(lists, tmp_path / "x", split_classes=own[:2])
    write_list(tmp_path / "bad.txt", [VideoEntry("a.avi", 0, 0), VideoEntry("b.avi", 7, 0)])
    with pytest.raises(ListFileError, match=r"bad\.txt:2: .*7"):
        write_published_splits([tmp_path / "bad.txt"], tmp_path / "x", classes=classes)


def test_a_split_set_with_a_broken_protocol_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"protocol\.json: not found \(write the set with"):
        read_split_set(tmp_path)
    (tmp_path / "protocol.json").write_text('{\n "kind": "drawn",\n "splits": [,]\n}\n')
    with pytest.raises(ValueError, match=r"protocol\.json:3: not valid JSON"):
        read_split_set(tmp_path)
    (tmp_path / "protocol.json").write_text(
        '{"splits": [{"name": "split_1", "val_list": "v.txt", "classes": "c"}]}'
    )
    with pytest.raises(FileNotFoundError, match=r"v\.txt: not found \(split split_1 of .*protocol\.json\)"):
        read_split_set(tmp_path)


# ------------------------------------------------------------------------------------------- mean ± std


def summary(right: int, listed: int, decoded: int) -> EvalSummary:
    """A split of ``listed`` videos (3 classes): ``decoded`` of them scored, the first ``right`` right."""
    labels = np.zeros(listed, dtype=np.int64)
    scores = np.tile([0.1, 0.6, 0.3], (listed, 1))  # predicts class 1, wrong ...
    scores[:right] = [0.8, 0.1, 0.1]  # ... except the first ``right`` videos
    mask = np.arange(listed) < decoded
    return EvalSummary.from_listed(scores, labels, mask, 3)


def test_mean_and_std_equal_a_hand_computation_with_an_undecodable_split():
    splits = (summary(3, 4, 4), summary(2, 5, 5), summary(0, 3, 0))  # the last split: nothing decodes
    result = CrossDatasetResult(("split_1", "split_2", "split_3"), (3, 3, 3), splits, "drawn")
    out = result.to_dict()
    top1 = [75.0, 40.0, 0.0]  # an undecodable video counts wrong: the last split counts 0, not NaN
    mean = sum(top1) / 3
    assert out["top1_mean"] == pytest.approx(mean)
    assert out["top1_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in top1) / 3))  # population
    assert out["top1_std"] == pytest.approx(statistics.pstdev(top1))
    assert out["top1_std_sample"] == pytest.approx(statistics.stdev(top1))
    assert out["top5_mean"] == pytest.approx(200 / 3) and out["top5_std"] == pytest.approx(
        statistics.pstdev([100, 100, 0])
    )
    assert out["std"] == "population" and out["num_splits"] == 3
    assert (out["num_listed"], out["num_skipped"]) == (12, 3)
    last = out["splits"][2]
    assert math.isnan(last["top1"]) and last["top1_listed"] == 0.0 and last["num_videos"] == 0
    assert mean_std([50.0]) == (50.0, 0.0)
    assert math.isnan(mean_std([50.0], ddof=1)[1])


# --------------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"), train_per_class=1, val_per_class=2)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A random CLIP checkpoint (both towers and the logit scale) in a file, for zero-shot CLIP."""
    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_file(clip_state_dict(create_clip("random:ViT-T/16@112")), str(path))
    return path


EVAL = ["--method", "zeroshot", "--num-frames", "4", "--frame-stride", "2", "--num-workers", "0", "--quiet"]


def hand_top1(scores_csv) -> float:
    scores = read_scores(scores_csv)
    return 100.0 * float(np.mean(scores.scores.argmax(axis=1) == scores.labels))


def test_cli_draws_a_set_and_evaluates_every_split(dataset, clip_file, tmp_path, capsys):
    excluded = tmp_path / "trained_on.txt"
    excluded.write_text("Left\n", encoding="utf-8")  # matched by normalised name
    args = [
        "splits",
        "cross-dataset",
        "--list",
        str(dataset.val_list),
        "--classes",
        str(dataset.classes_file),
    ]
    args += ["--exclude-classes", str(excluded), "--num-splits", "2", "--classes-per-split", "2"]
    args += ["--data-root", str(dataset.root)]
    assert main([*args, "--out-dir", str(tmp_path / "zs")]) == 0
    assert main([*args, "--out-dir", str(tmp_path / "again")]) == 0
    for path in sorted((tmp_path / "zs").iterdir()):
        assert path.read_bytes() == (tmp_path / "again" / path.name).read_bytes(), path.name
    for n in (1, 2):
        assert "left" not in read_class_names(tmp_path / "zs" / f"split_{n}_classes.txt")
    capsys.readouterr()

    out_dir, output = tmp_path / "eval", tmp_path / "summary.json"
    cmd = ["eval", str(clip_file), "--splits", str(tmp_path / "zs"), *EVAL]  # data root: the set's
    assert main([*cmd, "--out-dir", str(out_dir), "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert (out_dir / "summary.json").read_text() == output.read_text()
    top1, top5 = [], []
    for n, split in enumerate(result["splits"], start=1):
        scores = out_dir / f"split_{n}" / "scores.csv"
        assert read_scores(scores).scores.shape == (4, 2)  # 2 videos x 2 classes, 2 classes to choose from
        assert split["top1_listed"] == pytest.approx(hand_top1(scores))
        assert split["top5_listed"] == 100.0  # 2 classes: always in the top 5
        assert json.loads((out_dir / f"split_{n}" / "metrics.json").read_text())["top1"] == split["top1"]
        top1.append(split["top1_listed"])
        top5.append(split["top5_listed"])
    assert result["top1_mean"] == pytest.approx(np.mean(top1))
    assert result["top1_std"] == pytest.approx(np.std(top1))  # population, ddof 0
    assert result["top5_mean"] == 100.0 and result["top5_std"] == 0.0
    printed = capsys.readouterr().out
    assert "mean ± std over 2 splits (population std): top1" in printed and "split_2  top1" in printed


def test_cli_published_lists_with_a_split_that_never_decodes(dataset, clip_file, tmp_path, capsys):
    broken = dataset.root / "broken"
    broken.mkdir(exist_ok=True)
    for name in ("a.mp4", "b.mp4"):
        (broken / name).write_bytes(b"not a video")
    write_list(tmp_path / "broken.txt", [VideoEntry("broken/a.mp4", 0, 0), VideoEntry("broken/b.mp4", 3, 0)])
    args = ["splits", "cross-dataset", "--split-lists", str(dataset.val_list), str(tmp_path / "broken.txt")]
    args += ["--classes", str(dataset.classes_file), "--out-dir", str(tmp_path / "pub")]
    assert main(args) == 0

    output, out_dir = tmp_path / "summary.json", tmp_path / "eval"
    cmd = ["eval", str(clip_file), "--splits", str(tmp_path / "pub"), "--data-root", str(dataset.root), *EVAL]
    assert main([*cmd, "--out-dir", str(out_dir), "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    first, second = result["splits"]
    assert (first["num_classes"], first["num_listed"], first["num_skipped"]) == (4, 8, 0)
    assert first["top1_listed"] == pytest.approx(hand_top1(out_dir / "split_1" / "scores.csv"))
    assert (second["num_videos"], second["num_skipped"], second["top1_listed"]) == (0, 2, 0.0)
    assert math.isnan(second["top1"])
    assert result["top1_mean"] == pytest.approx(first["top1_listed"] / 2)  # the broken split counts 0
    assert result["top1_std"] == pytest.approx(first["top1_listed"] / 2)  # population std of (a, 0)
    assert (out_dir / "split_2" / "skipped_videos.txt").read_text().count("\n") == 2
    assert "2 undecodable videos counted wrong" in capsys.readouterr().out


def test_cli_refuses_fixed_classifiers_and_mixed_flags(dataset, clip_file, tmp_path, capsys):
    write_published_splits([dataset.val_list], tmp_path / "set", classes=dataset.classes_file)
    with pytest.raises(ValueError, match="text-matching method"):
        evaluate_cross_dataset(None, MethodConfig(name="evl"), tmp_path / "set", None)

    evl = ("method.name=evl", "backbone.heads=3", "data.rand_augment=null")
    run = tiny_run(dataset, *evl, steps=1, batch_size=1, val=False)
    train(run, tmp_path / "evl", progress=False)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "evl"), "--splits", str(tmp_path / "set"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "text-matching method" in err and "evl's fixed classifier" in err and len(err.splitlines()) == 1

    cmd = ["eval", str(clip_file), "--splits", str(tmp_path / "set"), *EVAL]
    assert main([*cmd, "--val-list", str(dataset.val_list)]) == 2
    assert (
        "--splits: each split names its own list and classes; leave out --val-list" in capsys.readouterr().err
    )
    assert main(["eval", str(clip_file), "--splits", str(tmp_path), *EVAL]) == 2
    assert "protocol.json: not found" in capsys.readouterr().err
    split = [
        "splits",
        "cross-dataset",
        "--out-dir",
        str(tmp_path / "x"),
        "--classes",
        str(dataset.classes_file),
    ]
    assert main([*split, "--split-lists", str(dataset.val_list), "--seed", "1"]) == 2
    assert "--seed: not taken with --split-lists" in capsys.readouterr().err
    assert main([*split, "--list", str(dataset.val_list), "--split-classes", str(dataset.classes_file)]) == 2
    assert "--split-classes: not taken with --list" in capsys.readouterr().err
