"""Score fusion (`evl ensemble`) on hand-made score files whose best weights are known."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from evl.cli import main
from evl.engine.ensemble import ensemble_files, write_ensemble
from evl.engine.metrics import ensemble_scores, read_scores, topk_accuracy, write_scores

# 6 videos, 3 classes. A is right on videos 0-2, B on videos 3-5; where one is right the other prefers one
# wrong class z, the third class being low in both. With w the weight of A, a video where A is right is
# right in w*A + (1-w)*B iff w*dA > (1-w)*dB (dA, dB: the two margins between the label and z), i.e.
# w > dB / (dA + dB); a video where B is right iff w < dB / (dA + dB) with the margins the other way.
# Thresholds: videos 0-2 need w > 0.25, 0.05, 0.15; videos 3-5 need w < 0.35, 0.45, 0.95 (none on the grid).
LABELS = [0, 1, 2, 0, 1, 2]
A = [
    [0.70, 0.10, 0.20],  # y=0, z=1: dA = 0.6, dB = 0.2 -> w > 0.25
    [0.16, 0.80, 0.04],  # y=1, z=2: dA = 0.76, dB = 0.04 -> w > 0.05
    [0.08, 0.16, 0.76],  # y=2, z=0: dA = 0.68, dB = 0.12 -> w > 0.15
    [0.20, 0.08, 0.72],  # y=0, z=2: dB = 0.28, dA = 0.52 -> w < 0.35
    [0.64, 0.20, 0.16],  # y=1, z=0: dB = 0.36, dA = 0.44 -> w < 0.45
    [0.16, 0.44, 0.40],  # y=2, z=1: dB = 0.76, dA = 0.04 -> w < 0.95
]
B = [
    [0.30, 0.50, 0.20],
    [0.20, 0.38, 0.42],
    [0.46, 0.20, 0.34],
    [0.60, 0.08, 0.32],
    [0.24, 0.60, 0.16],
    [0.12, 0.06, 0.82],
]
# Right videos at w = 0, 0.1, ..., 1 by the thresholds: (videos 0-2 with threshold < w) + (3-5 with w <).
HAND_TOP1 = [100 * n / 6 for n in (3, 4, 5, 6, 5, 4, 4, 4, 4, 4, 3)]
PATHS = [f"v{i}.mp4" for i in range(6)]


def write(tmp_path, name, scores, labels=LABELS, paths=PATHS):
    return write_scores(tmp_path / name, paths, np.array(labels), np.array(scores, dtype=np.float64))


@pytest.fixture
def pair(tmp_path):
    return write(tmp_path, "a.csv", A), write(tmp_path, "b.csv", B)


def test_fused_scores_are_the_weighted_average_and_match_the_hand_count():
    fused = ensemble_scores([A, B], [0.3, 0.7])
    np.testing.assert_allclose(fused[0], [0.3 * 0.7 + 0.7 * 0.3, 0.3 * 0.1 + 0.7 * 0.5, 0.2])  # 0.42, 0.38
    for step, expected in enumerate(HAND_TOP1):
        w = step / 10
        assert topk_accuracy(ensemble_scores([A, B], [w, 1 - w]), LABELS, ks=(1,))["top1"] == pytest.approx(
            expected
        )


def test_search_finds_the_known_weight(pair):
    ens = ensemble_files(pair, search_step=0.1)
    assert ens.weights == pytest.approx((0.3, 0.7))  # the one grid point right on all six videos
    assert ens.result.top1 == 100.0 and ens.search.top1 == 100.0 and ens.search.num_tied == 1
    assert [m.result.top1 for m in ens.members] == [50.0, 50.0]
    np.testing.assert_allclose(ens.fused.scores, 0.3 * np.array(A) + 0.7 * np.array(B))
    assert ens.fused.paths == PATHS and ens.fused.labels.tolist() == LABELS


def test_given_weights_are_normalised_and_default_to_equal(pair):
    given = ensemble_files(pair, weights=[1, 3])
    assert given.weights == (0.25, 0.75) and given.search is None
    np.testing.assert_allclose(given.fused.scores, 0.25 * np.array(A) + 0.75 * np.array(B))
    equal = ensemble_files(pair)
    assert equal.weights == (0.5, 0.5)
    assert equal.result.top1 == pytest.approx(HAND_TOP1[5])
    with pytest.raises(ValueError, match="non-negative"):
        ensemble_files(pair, weights=[1, -1])
    with pytest.raises(ValueError, match="1 weights for 2 score files"):
        ensemble_files(pair, weights=[1])


def test_tie_goes_to_the_most_even_weights(tmp_path):
    # The same scores twice: every weight ties, so the most even wins.
    a, b = write(tmp_path, "a.csv", A), write(tmp_path, "b.csv", A)
    ens = ensemble_files([a, b], search_step=0.1)
    assert ens.weights == (0.5, 0.5) and ens.search.num_tied == 11


def test_three_members_search_the_simplex_with_the_tie_rule(tmp_path):
    # A given twice (as two runs with equal scores would be): the fused scores depend only on wA + wA2 and
    # wB, so the best is wA + wA2 = 0.3, wB = 0.7, at (0.3, 0.7, 0), (0.2, 0.7, 0.1), (0.1, 0.7, 0.2),
    # (0, 0.7, 0.3). Most even: (0.2, 0.7, 0.1) and (0.1, 0.7, 0.2) (sums of squares 0.54); then more
    # weight on the earlier file.
    files = [write(tmp_path, "a.csv", A), write(tmp_path, "b.csv", B), write(tmp_path, "a2.csv", A)]
    ens = ensemble_files(files, search_step=0.1)
    assert ens.weights == pytest.approx((0.2, 0.7, 0.1))
    assert ens.result.top1 == 100.0 and ens.search.num_tied == 4


def test_search_on_other_files_is_applied_to_the_main_files(pair, tmp_path, caplog):
    # The other set holds the same models' roles swapped on other videos: its best weight of the first file
    # is 0.7, which on the main files gives the hand count at w = 0.7.
    other = [f"other{i}.mp4" for i in range(6)]
    search_on = [write(tmp_path, "oa.csv", B, paths=other), write(tmp_path, "ob.csv", A, paths=other)]
    with caplog.at_level(logging.WARNING, logger="evl"):
        ens = ensemble_files(pair, search_step=0.1, search_on=search_on)
    assert ens.weights == pytest.approx((0.7, 0.3))
    assert ens.search.top1 == 100.0 and ens.search.files == tuple(map(str, search_on))
    assert ens.result.top1 == pytest.approx(HAND_TOP1[7])
    assert not ens.search.optimistic and "optimistic" not in caplog.text


def test_search_on_the_reported_videos_warns_that_it_is_optimistic(pair, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="evl"):
        ens = ensemble_files(pair, search_step=0.1)
    assert ens.search.optimistic and ens.search.num_shared == 6
    assert "searched on 6 of the 6 fused videos" in caplog.text and "optimistic" in caplog.text
    # A search set sharing some videos with the fused ones is optimistic too.
    caplog.clear()
    paths = [*PATHS[:2], *(f"other{i}.mp4" for i in range(4))]
    search_on = [write(tmp_path, "oa.csv", A, paths=paths), write(tmp_path, "ob.csv", B, paths=paths)]
    with caplog.at_level(logging.WARNING, logger="evl"):
        assert ensemble_files(pair, search_step=0.1, search_on=search_on).search.num_shared == 2
    assert "searched on 2 of the 6 fused videos" in caplog.text


def shuffled(rows, i, j):
    rows = list(rows)
    rows[i], rows[j] = rows[j], rows[i]
    return rows


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"paths": [*PATHS[:3], "x.mp4", *PATHS[4:]]},
            r"b\.csv:5: video 'x\.mp4' where .*a\.csv has 'v3\.mp4', ",
        ),
        ({"paths": shuffled(PATHS, 1, 2)}, r"b\.csv:3: video 'v2\.mp4' .* the same videos in another order"),
        ({"labels": [0, 1, 2, 0, 2, 2]}, r"b\.csv:6: label 2 for 'v4\.mp4', but .*a\.csv has 1"),
        ({"scores": [[*r, 0.0] for r in B]}, r"b\.csv: 4 classes, but .*a\.csv has 3"),
        (
            {"scores": B[:5], "labels": LABELS[:5], "paths": PATHS[:5]},
            r"a\.csv:7: video 'v5\.mp4' is not in .*b\.csv \(6 videos against 5\)",
        ),
        ({"scores": [B[0], B[1], [np.nan] * 3, *B[3:]]}, r"b\.csv:4: non-finite score for 'v2\.mp4'"),
    ],
    ids=["paths", "order", "labels", "class-count", "row-count", "nan-row"],
)
def test_files_that_differ_are_refused_at_the_first_difference(tmp_path, changes, message):
    a = write(tmp_path, "a.csv", A)
    b = write(tmp_path, "b.csv", **{"scores": B, **changes})
    with pytest.raises(ValueError, match=message):
        ensemble_files([a, b])


def test_missing_video_names_the_likely_cause(tmp_path):
    a = write(tmp_path, "a.csv", A)
    b = write(tmp_path, "b.csv", [*B[1:], B[0]], labels=[*LABELS[1:], 0], paths=[*PATHS[1:], "new.mp4"])
    with pytest.raises(ValueError, match=r"b\.csv:2: .*which this file lacks \(a video skipped"):
        ensemble_files([a, b])


def test_other_refusals(pair, tmp_path):
    with pytest.raises(ValueError, match="two or more score files"):
        ensemble_files(pair[:1])
    with pytest.raises(ValueError, match="must divide 1"):
        ensemble_files(pair, search_step=0.3)
    with pytest.raises(ValueError, match="one per member"):
        ensemble_files(pair, search_step=0.1, search_on=pair[:1])
    four = [write(tmp_path, f"o{n}.csv", [[*r, 0.0] for r in A]) for n in "ab"]
    with pytest.raises(ValueError, match=r"o[a]\.csv: 4 classes, but .*a\.csv has 3"):
        ensemble_files(pair, search_step=0.1, search_on=four)
    with pytest.raises(FileNotFoundError, match="no such score file"):
        ensemble_files([pair[0], tmp_path / "missing.csv"])


def test_scores_that_are_not_probabilities_are_flagged(pair, tmp_path, caplog):
    logits = write(tmp_path, "logits.csv", (np.log(np.array(B)) + 2.0).tolist())
    with caplog.at_level(logging.WARNING, logger="evl"):
        ensemble_files([pair[0], logits])
    assert "logits.csv:2: scores sum to" in caplog.text and "mixes scales" in caplog.text


def test_written_files_read_back(pair, tmp_path):
    ens = ensemble_files(pair, search_step=0.1)
    out = write_ensemble(ens, tmp_path / "out")
    fused = read_scores(out / "scores.csv")
    assert fused.paths == PATHS and fused.labels.tolist() == LABELS
    np.testing.assert_array_equal(fused.scores, ens.fused.scores)  # repr floats: bit-exact
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] == 100.0 and metrics["weights"] == pytest.approx([0.3, 0.7])
    assert [m["top1"] for m in metrics["members"]] == [50.0, 50.0]
    assert metrics["search"]["step"] == 0.1 and metrics["search"]["optimistic"] is True


# ------------------------------------------------------------------------------------------- command line


def test_cli_end_to_end(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["ensemble", *map(str, pair), "--search", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "weight 0.300  top1 50.00" in lines[0] and "weight 0.700  top1 50.00" in lines[1]
    assert lines[2].startswith("ensemble") and "top1 100.00" in lines[2] and "optimistic" in lines[2]
    assert "warning: the weights were searched on 6 of the 6 fused videos" in captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights"] == pytest.approx([0.3, 0.7])
    assert read_scores(out / "scores.csv").paths == PATHS


def test_cli_search_on_folders_implies_the_papers_step(pair, tmp_path, capsys):
    # Folders stand for their scores.csv, as `evl eval` writes them; --search-on alone searches at 0.1.
    other = [f"other{i}.mp4" for i in range(6)]
    folders = [tmp_path / "ra", tmp_path / "rb"]
    for folder, scores in zip(folders, (B, A), strict=True):
        folder.mkdir()
        write(folder, "scores.csv", scores, paths=other)
    out = tmp_path / "out"
    args = ["ensemble", *map(str, pair), "--search-on", *map(str, folders), "--output", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "searched at step 0.1 on 6 other videos, top1 there 100.00" in captured.out
    assert "warning" not in captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights"] == pytest.approx([0.7, 0.3])
    assert metrics["search"]["files"] == [str(f / "scores.csv") for f in folders]


def test_cli_refuses_in_one_line(pair, tmp_path, capsys):
    bad = write(tmp_path, "bad.csv", B, labels=[1, 1, 2, 0, 1, 2])
    assert main(["ensemble", str(pair[0]), str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evl ensemble: error: ") and "bad.csv:2: label 1" in err[0]
    args = ["ensemble", *map(str, pair), "--weights", "1", "1", "--search-on", *map(str, pair)]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    assert "--search-on searches the weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
