"""Metrics on tiny hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evl.engine.metrics import (
    EvalResult,
    average_views,
    base_novel_accuracy,
    confusion_matrix,
    ensemble_scores,
    harmonic_mean,
    label_ranks,
    mean_class_accuracy,
    read_scores,
    search_ensemble_weights,
    simplex_grid,
    topk_accuracy,
    write_scores,
)

# 4 videos, 3 classes. Predictions (argmax): 0, 2, 1, 0. Label ranks: 0, 1, 2, 1.
SCORES = np.array(
    [
        [0.7, 0.2, 0.1],  # label 0: right
        [0.1, 0.3, 0.6],  # label 1: second
        [0.2, 0.5, 0.3],  # label 0: third
        [0.5, 0.1, 0.4],  # label 2: second
    ]
)
LABELS = np.array([0, 1, 0, 2])


def test_average_views_prob_is_mean_of_softmax():
    logits = np.array([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # [N=1, V=2, C=2]
    # softmax: view 0 -> [1/2, 1/2], view 1 -> [3/4, 1/4]; mean -> [5/8, 3/8]
    np.testing.assert_allclose(average_views(logits), [[0.625, 0.375]])
    np.testing.assert_allclose(average_views(logits, mode="logit"), [[math.log(3.0) / 2, 0.0]])


def test_average_views_accepts_tensors_and_large_logits():
    logits = torch.tensor([[[1000.0, 0.0]], [[0.0, 1000.0]]])  # [2, 1, 2]; naive exp overflows
    np.testing.assert_allclose(average_views(logits), [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="mode"):
        average_views(logits, mode="vote")
    with pytest.raises(ValueError, match=r"\[N, V, C\]"):
        average_views(np.zeros((2, 3)))


def test_topk_accuracy():
    assert label_ranks(SCORES, LABELS).tolist() == [0, 1, 2, 1]
    assert topk_accuracy(SCORES, LABELS, ks=(1, 2, 3)) == {"top1": 25.0, "top2": 75.0, "top3": 100.0}


def test_topk_k_larger_than_classes_counts_everything():
    assert topk_accuracy(SCORES, LABELS, ks=(5,)) == {"top5": 100.0}


def test_topk_ties_break_towards_lower_index_like_argmax():
    scores = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    labels = np.array([0, 1])
    assert label_ranks(scores, labels).tolist() == [0, 1]
    assert topk_accuracy(scores, labels, ks=(1, 2)) == {"top1": 50.0, "top2": 100.0}
    # The same tie-break as the confusion matrix built from argmax.
    assert np.trace(confusion_matrix(scores.argmax(1), labels, 3)) == 1


def test_topk_empty_is_nan():
    result = topk_accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int), ks=(1,))
    assert math.isnan(result["top1"])


def test_mean_class_accuracy_ignores_absent_classes():
    # Class 0: 1 of 2 right; class 1: 0 of 1; class 2: 0 of 1; class 3 absent from labels.
    scores = np.pad(SCORES, ((0, 0), (0, 1)))
    assert mean_class_accuracy(scores, LABELS, num_classes=4) == pytest.approx(100.0 / 6)
    # Only class 0 present, 1 of 2 right.
    assert mean_class_accuracy(SCORES[[0, 2]], LABELS[[0, 2]], num_classes=3) == 50.0


def test_confusion_matrix_rows_true_cols_pred():
    cm = confusion_matrix(SCORES.argmax(1), LABELS, num_classes=3)
    expected = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 0]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([3], [0], num_classes=3)


def test_eval_result():
    result = EvalResult.from_scores(SCORES, LABELS, num_classes=3, num_skipped=2)
    assert result.to_dict() == {
        "top1": 25.0,
        "top5": 100.0,
        "mean_class_accuracy": pytest.approx(100.0 / 6),
        "num_videos": 4,
        "num_skipped": 2,
    }


def test_score_file_round_trip(tmp_path):
    paths = ["a/x.mp4", "b,with comma.mp4", "c.mp4", "d.mp4"]
    scores = SCORES + np.array([1e-17, 1 / 3, 0.0])[None]  # values repr must keep exactly
    out = write_scores(tmp_path / "scores.csv", paths, LABELS, torch.from_numpy(scores))
    loaded = read_scores(out)
    assert loaded.paths == paths
    np.testing.assert_array_equal(loaded.labels, LABELS)
    np.testing.assert_array_equal(loaded.scores, scores)  # bit-exact
    assert (tmp_path / "scores.csv").read_text().splitlines()[0] == "path,label,score_0,score_1,score_2"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]  # no temporary file left


def test_read_scores_rejects_other_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,split,name,value\n")
    with pytest.raises(ValueError, match="not a score file"):
        read_scores(path)


def test_ensemble_scores_weighted_average():
    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    np.testing.assert_allclose(ensemble_scores([a, b]), [[0.5, 0.5]])
    np.testing.assert_allclose(ensemble_scores([a, b], [3, 1]), [[0.75, 0.25]])
    with pytest.raises(ValueError):
        ensemble_scores([a, np.zeros((1, 3))])
    for bad in ([2, -1], [0, 0], [1, float("nan")], [1]):  # negative, zero sum, NaN, one too few
        with pytest.raises(ValueError, match="non-negative numbers with a positive sum"):
            ensemble_scores([a, b], bad)


def test_simplex_grid():
    two = simplex_grid(2, 0.1)
    assert two.tolist()[:5] == [[0.5, 0.5], [0.6, 0.4], [0.4, 0.6], [0.7, 0.3], [0.3, 0.7]]
    assert sorted(two[:, 0].tolist()) == [n / 10 for n in range(11)]  # exact: n / 10, not accumulated
    three = simplex_grid(3, 0.1)
    assert len(three) == 66 and len({tuple(r) for r in three.tolist()}) == 66  # C(12, 2)
    np.testing.assert_allclose(three.sum(axis=1), 1.0)
    assert three[0].tolist() == [0.4, 0.3, 0.3]  # the most even, then more weight on earlier members
    assert simplex_grid(3, 0.5).tolist()[:3] == [[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]
    with pytest.raises(ValueError, match="must divide 1"):
        simplex_grid(2, 0.3)
    with pytest.raises(ValueError, match="coarser step"):
        simplex_grid(6, 0.01)


def test_search_ensemble_weights():
    labels = np.array([0, 1])
    # Model a is right only on video 0, model b only on video 1, each more confident where it is right,
    # so mixing gets both: w*a + (1-w)*b is right on video 0 iff w > 3/11, on video 1 iff w < 8/9.
    a = np.array([[0.9, 0.1], [0.55, 0.45]])
    b = np.array([[0.35, 0.65], [0.1, 0.9]])
    found = search_ensemble_weights([a, b], labels)
    assert found.top1 == 100.0
    # w = 0.3 ... 0.8 all reach 100%: the most even, 0.5, wins.
    assert found.weights == (0.5, 0.5) and found.num_tied == 6
    assert search_ensemble_weights([a, a], labels) == ((0.5, 0.5), 50.0, 11)
    # Ties between equally even weights go to the earlier member. Video 0 is right only for w in
    # (0.35, 0.45), video 1 only for w in (0.55, 0.65) (each class margin crosses 0 at one of those ends),
    # so 0.4 and 0.6 tie at 50% and 0.5 gets neither.
    a = np.array([[0.5, 0.37, 0.61], [0.5, 0.41, 0.57]])
    b = np.array([[0.5, 0.57, 0.41], [0.5, 0.61, 0.37]])
    assert search_ensemble_weights([a, b], [0, 0]) == ((0.6, 0.4), 50.0, 2)
    # A brute-force reference on random scores, three members: the best top-1 over every grid point.
    rng = np.random.default_rng(0)
    members = [rng.dirichlet(np.ones(4), size=40) for _ in range(3)]
    truth = rng.integers(0, 4, size=40)
    found = search_ensemble_weights(members, truth, step=0.25)
    best = max(
        topk_accuracy(ensemble_scores(members, w), truth, ks=(1,))["top1"] for w in simplex_grid(3, 0.25)
    )
    assert found.top1 == best
    assert topk_accuracy(ensemble_scores(members, found.weights), truth, ks=(1,))["top1"] == best


# ------------------------------------------------------------------------------------------- base-to-novel


def test_harmonic_mean_values():
    assert harmonic_mean(76.4, 61.1) == pytest.approx(67.899, abs=1e-3)  # ViFi-CLIP K400: HM 67.9
    assert harmonic_mean(50.0, 50.0) == 50.0
    assert harmonic_mean(100.0, 0.0) == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(0.8, 0.4) == pytest.approx(0.64 / 1.2)
    with pytest.raises(ValueError):
        harmonic_mean(-1.0, 10.0)


def test_base_novel_accuracy_restricts_classes():
    # Classes 0, 1 base; 2, 3 novel. Columns chosen so that the global argmax and the subset argmax differ.
    scores = np.array(
        [
            [0.9, 0.1, 5.0, 0.0],  # base video, label 0: globally class 2, among base class 0 -> right
            [0.9, 0.1, 0.0, 0.0],  # label 1 -> predicted 0, wrong
            [0.0, 0.2, 0.1, 0.0],  # label 1 -> right
            [0.0, 0.0, 0.3, 0.7],  # novel, label 3 -> right
            [9.0, 0.0, 0.3, 0.2],  # label 2: globally class 0, among novel class 2 -> right
            [0.0, 0.0, 0.1, 0.2],  # label 2 -> predicted 3, wrong
            [0.0, 0.0, 0.5, 0.5],  # label 3, tie -> the lower id (2), wrong
            [0.0, 0.0, 0.0, 0.0],  # label 4: neither subset -> ignored
        ]
    )
    scores = np.pad(scores, ((0, 0), (0, 1)))
    labels = np.array([0, 1, 1, 3, 2, 2, 3, 4])
    result = base_novel_accuracy(scores, labels, [0, 1], [2, 3])
    assert result["base"] == pytest.approx(200 / 3)
    assert result["novel"] == pytest.approx(50.0)
    assert result["hm"] == pytest.approx(harmonic_mean(200 / 3, 50.0))
    # Tensors are accepted, and the subset order does not matter (not even for ties).
    again = base_novel_accuracy(torch.tensor(scores), torch.tensor(labels), [1, 0], [3, 2])
    assert again["base"] == pytest.approx(200 / 3)
    assert again["novel"] == pytest.approx(50.0)


def test_base_novel_accuracy_nan_and_errors():
    labels = np.array([0, 1, 0, 1])
    scores = np.eye(4)[labels]
    result = base_novel_accuracy(scores, labels, [0, 1], [2, 3])
    assert result["base"] == 100.0 and math.isnan(result["novel"]) and math.isnan(result["hm"])
    with pytest.raises(ValueError, match="both base and novel"):
        base_novel_accuracy(scores, labels, [0, 1], [1, 2])
    with pytest.raises(ValueError, match=r"class ids must be in 0\.\.3"):
        base_novel_accuracy(scores, labels, [0, 1], [4])
    with pytest.raises(ValueError, match=r"expected scores \[N, K\]"):
        base_novel_accuracy(scores, labels[:3], [0, 1], [2, 3])
