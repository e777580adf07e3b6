"""End to end through the command line on generated mp4 files: train -> eval -> predict, and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from evl.cli import main
from evl.engine.checkpoint import list_checkpoints
from evl.engine.metrics import read_scores
from factories import tiny_dataset, train_flags


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"), train_per_class=3, val_per_class=2)


def train_args(dataset, run_dir, steps=4, extra=()):
    return train_flags(
        dataset, run_dir, "--set", "backbone.heads=3", "--batch-split", "2", "--lr", "1e-3",
        "--eval-every", "2", "--save-every", "2", "--decoder-layers", "2", "--set", "data.rand_augment=null",
        *extra, steps=steps,
    )  # fmt: skip


def test_train_eval_predict(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_args(dataset, run_dir)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["val"]["num_videos"] == 8
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 4]
    for name in ("config.json", "classes.txt", "metrics.csv", "training_curves.png", "backbone.safetensors"):
        assert (run_dir / name).is_file(), name

    metrics = tmp_path / "metrics.json"
    eval_args = [
        "eval",
        str(run_dir),
        "--output",
        str(metrics),
        "--num-temporal-views",
        "2",
        "--num-workers",
        "2",
    ]
    assert main([*eval_args, "--quiet"]) == 0
    result = json.loads(metrics.read_text())
    assert {"top1", "top5", "mean_class_accuracy", "num_videos"} <= set(result)
    # Every video counted exactly once, and the accuracy equals a hand count over the score file.
    scores = read_scores(run_dir / "eval" / "scores.csv")
    listed = [line.split()[0] for line in dataset.val_list.read_text().splitlines()]
    assert sorted(os.path.relpath(p, dataset.root) for p in scores.paths) == sorted(listed)
    hand_top1 = 100 * np.mean(scores.scores.argmax(1) == scores.labels)
    assert result["num_videos"] == len(listed) and result["top1"] == pytest.approx(hand_top1)
    assert (run_dir / "eval" / "confusion_matrix.png").stat().st_size > 1000

    video = dataset.root / listed[0]
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(video), "--topk", "3", "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)
    probs = [p["probability"] for p in prediction["predictions"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert {p["class"] for p in prediction["predictions"]} <= set(dataset.classes)
    assert main(["predict", str(run_dir), str(dataset.root / "videos" / "val")]) == 0
    assert capsys.readouterr().out.count("%") == 8 * 4  # 8 videos, top-4 of 4 classes

    # Exit statuses as every command has them: one readable video of two is a success (the other gets its
    # error line); none readable is an input error, status 2.
    missing = tmp_path / "missing.mp4"
    assert main(["predict", str(run_dir), str(video), str(missing), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "predictions" in lines[0] and "missing.mp4" in lines[1]["path"] and lines[1]["error"]
    assert main(["predict", str(run_dir), str(missing)]) == 2
    assert "missing.mp4" in capsys.readouterr().out


def test_python_api_predict(dataset, tmp_path):
    import evl.engine.predict as predict

    run_dir = tmp_path / "run"
    assert main(train_args(dataset, run_dir, steps=2)) == 0
    model = predict.load(run_dir)
    result = model.predict(dataset.root / "videos" / "val" / "left" / "0000.mp4", topk=2)
    assert len(result.classes) == 2 and result.probabilities[0] >= result.probabilities[1]


def test_bad_list_is_one_line_error(dataset, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("videos/train/left/0000.mp4 0\nvideos/train/left/0001.mp4 9\n")
    args = train_args(dataset, tmp_path / "run")
    args[args.index("--train-list") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:2" in err and "9" in err


def test_resume_after_kill_finishes(dataset, tmp_path):
    """SIGKILL a training process after its first checkpoint, then --resume auto completes the run."""
    run_dir = tmp_path / "run"
    args = train_args(dataset, run_dir, steps=8, extra=["--save-every", "1"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "evl", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(run_dir):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max((s for s, _ in list_checkpoints(run_dir)), default=0)
    assert 1 <= killed_at < 8, "the run should have been killed mid-way"
    assert main([*args, "--resume", "auto"]) == 0
    assert max(s for s, _ in list_checkpoints(run_dir)) == 8


def test_init_from_another_run_with_a_new_classifier(dataset, tmp_path, capsys):
    source = tmp_path / "source"
    assert main(train_args(dataset, source, steps=2)) == 0
    five = tmp_path / "five.txt"
    five.write_text("".join(f"{name}\n" for name in [*dataset.classes, "spinning"]))
    target = tmp_path / "target"
    args = train_args(
        dataset, target, steps=2, extra=["--init-from", str(source), "--set", "train.head_lr_scale=10"]
    )
    args[args.index("--classes") + 1] = str(five)
    capsys.readouterr()
    assert main(args) == 0
    assert "(new classifier)" in capsys.readouterr().out
    deeper = train_args(dataset, tmp_path / "deeper", steps=2, extra=["--init-from", str(source)])
    deeper[deeper.index("--decoder-layers") + 1] = "3"
    assert main(deeper) == 2
    assert "weights do not match this model" in capsys.readouterr().err


def test_shortened_demo_runs_end_to_end(tmp_path):
    """`evl demo --steps N` with N below the recipe's warm-up still trains, evaluates and plots."""
    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "4", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["num_videos"] == 64
    assert (tmp_path / "run" / "training_curves.png").is_file()


def test_engine_messages_reach_the_terminal_once(tmp_path, capsys):
    import logging
    from types import SimpleNamespace

    from evl.cli import install_log_handler
    from evl.engine.train import _record_skipped

    install_log_handler()
    install_log_handler()  # as when `main` runs twice in one process: still one handler
    capsys.readouterr()
    _record_skipped(tmp_path, [SimpleNamespace(path="a.mp4", reason="no video stream")])
    logging.getLogger("evl.engine.train").info("resumed from somewhere at step 3")
    out, err = capsys.readouterr()
    assert err == "warning: skipped undecodable video (no video stream)\n"  # warnings: stderr, prefixed
    assert out == "resumed from somewhere at step 3\n"  # information: stdout, as printed before


def test_an_engine_setting_error_gets_the_flag_that_sets_it(dataset, tmp_path, capsys):
    args = train_args(dataset, tmp_path / "run")
    del args[args.index("--train-list") : args.index("--train-list") + 2]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "evl train: error: no training list: set data.train_list; pass --train-list"
