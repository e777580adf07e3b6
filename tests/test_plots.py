"""Plots: valid PNG files, empty histories, any class count."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evl.engine.plots import ema_smooth, plot_confusion_matrix, plot_training_curves, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000  # axes, text and curves, not a blank canvas


def _write_metrics(path, with_val: bool = True):
    lines = ["step,split,name,value"]
    for step in range(1, 60):
        lines.append(f"{step},train,loss,{2.0 * math.exp(-step / 20) + 0.1 * math.sin(step)}")
        lines.append(f"{step},train,lr,{4e-4 * step / 60}")
    if with_val:
        lines += [f"{step},val,top1,{30 + step / 2}" for step in (20, 40, 60)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_training_curves(tmp_path):
    out = plot_training_curves(_write_metrics(tmp_path / "metrics.csv"), tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    _assert_png(out)


def test_training_curves_without_validation_or_rows(tmp_path):
    _assert_png(plot_training_curves(_write_metrics(tmp_path / "m.csv", with_val=False), tmp_path / "a.png"))
    header_only = tmp_path / "empty.csv"
    header_only.write_text("step,split,name,value\n")
    _assert_png(plot_training_curves(header_only, tmp_path / "b.png"))


def test_read_metrics_keeps_last_value_of_repeated_steps(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("step,split,name,value\n2,train,loss,5\n1,train,loss,4\n2,train,loss,3\n10,val,top1,50\n")
    series = read_metrics(path)
    steps, values = series[("train", "loss")]
    assert steps.tolist() == [1, 2] and values.tolist() == [4.0, 3.0]
    assert series[("val", "top1")][1].tolist() == [50.0]
    (tmp_path / "bad.csv").write_text("step,value\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_metrics(tmp_path / "bad.csv")


def test_ema_smooth_is_debiased_and_skips_nan():
    np.testing.assert_allclose(ema_smooth(np.array([2.0, 2.0, 2.0])), [2.0, 2.0, 2.0])
    smoothed = ema_smooth(np.array([1.0, np.nan, 3.0]), weight=0.5)
    # (0.5 * 1 * 0.5 + 0.5 * 3) / (0.25 + 0.5) = 1.75 / 0.75
    np.testing.assert_allclose(smoothed, [1.0, 1.0, 1.75 / 0.75])


@pytest.mark.parametrize("num_classes", [2, 37, 400])
def test_confusion_matrix_plot(tmp_path, num_classes):
    rng = np.random.default_rng(num_classes)
    cm = rng.integers(0, 5, size=(num_classes, num_classes)) + np.eye(num_classes, dtype=np.int64) * 20
    cm[-1] = 0  # a class with no videos must not divide by zero
    names = [f"class {i}" for i in range(num_classes)]
    _assert_png(plot_confusion_matrix(cm, names, tmp_path / "cm.png"))
    _assert_png(plot_confusion_matrix(cm, None, tmp_path / "cm_counts.png", normalize=False))


def test_confusion_matrix_plot_checks_inputs(tmp_path):
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(np.eye(3, dtype=int), ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="square"):
        plot_confusion_matrix(np.zeros((2, 3), dtype=int), None, tmp_path / "x.png")
