"""`evl bench` on a tiny preset: every measurement runs in its own process and the report is consistent."""

from __future__ import annotations

import json

import pytest

from evl.bench import BenchConfig, cached_epoch
from evl.cli import main


def test_cached_epoch_shares_the_optimiser_step_over_the_epoch_batch():
    bench = BenchConfig(cached_batch_size=4, epoch_batch_size=256)
    cached = {"batch": 4, "forward_backward_s": 0.4, "optimizer_s": 2.56}
    epoch = cached_epoch(bench, {"seconds": 1.5}, cached, {"seconds_per_clip": 0.5})
    assert epoch["cached_s_per_clip"] == pytest.approx(0.1 + 0.01)
    assert epoch["speedup"] == pytest.approx(2.0 / 0.11)
    without_loader = cached_epoch(bench, {"seconds": 1.5}, cached, None)
    assert without_loader["decode_s_per_clip"] == 0 and without_loader["speedup"] == pytest.approx(1.5 / 0.11)
    assert "speedup_vs_training_from_videos" not in without_loader
    frozen = {"batch1": {"batch": 1, "step_s": 1.7}, "batch2": {"batch": 2, "step_s": 3.0}}
    with_steps = cached_epoch(bench, {"seconds": 1.5}, cached, {"seconds_per_clip": 0.5}, frozen)
    assert with_steps["training_from_videos_s_per_clip"] == pytest.approx(0.5 + 1.5)
    assert with_steps["speedup_vs_training_from_videos"] == pytest.approx(2.0 / 0.11)
    assert cached_epoch(bench, {"error": "RuntimeError: x"}, cached, None) is None


def test_cached_epoch_speedup_is_the_median_of_the_rounds_own_ratios():
    bench = BenchConfig(cached_batch_size=4, epoch_batch_size=256)
    cached = {"batch": 4, "forward_backward_s": 0.4, "optimizer_s": 2.56}
    # A slow round slows both sides: its ratio stays, while a ratio of medians would mix rounds.
    rounds = [
        {"features_s": 1.5, "forward_backward_s": 0.4, "optimizer_s": 2.56},
        {"features_s": 3.0, "forward_backward_s": 0.8, "optimizer_s": 5.12},
        {"features_s": 1.6, "forward_backward_s": 0.4, "optimizer_s": 2.56},
    ]
    epoch = cached_epoch(bench, {"seconds": 1.6}, cached, {"seconds_per_clip": 0.5}, rounds=rounds)
    ratios = [2.0 / 0.11, 3.5 / 0.22, 2.1 / 0.11]
    assert epoch["speedup"] == pytest.approx(sorted(ratios)[1])
    assert epoch["speedup_range"] == pytest.approx([min(ratios), max(ratios)])
    assert epoch["cached_s_per_clip"] == pytest.approx(0.11)


def test_bench_report_of_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        ["bench", "--model", "evl-t16-112", "--batch-sizes", "1", "--cached-batch-size", "2",
         "--repeats", "1", "--no-dataloader", "--skip", "inference_throughput", "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    errors = {k: v for k, v in report.items() if isinstance(v, dict) and "error" in v}
    assert not errors
    assert "inference_throughput" not in report and "dataloader" not in report
    frozen, open_step = report["train_frozen"]["batch1"], report["train_open"]
    assert frozen["trainable_params"] < open_step["trainable_params"]
    assert report["frozen_open_step_ratio"] == pytest.approx(frozen["step_s"] / open_step["step_s"])
    assert frozen["peak_memory_gb"] == pytest.approx(frozen["peak_memory_gib"] * 2**30 / 1e9)
    assert report["backbone"]["gflops_per_s"] > 0
    assert report["backbone"]["fraction_of_matmul"] == pytest.approx(
        report["backbone"]["gflops_per_s"] / report["matmul"]["gflops_per_s"]
    )
    cached = report["cached_step"]
    assert cached["batch"] == 2 and cached["mib_per_clip"] > 0
    assert cached["forward_backward_s"] + cached["optimizer_s"] <= 1.5 * cached["step_s"] + 0.05
    epoch = report["cached_epoch"]
    assert epoch["features_s_per_clip"] == report["features"]["seconds"]
    low, high = epoch["speedup_range"]
    assert low <= epoch["speedup"] <= high and low > 0
    assert epoch["training_from_videos_s_per_clip"] == pytest.approx(frozen["step_s"])


def test_bench_reports_an_unknown_preset_in_one_line(capsys):
    assert main(["bench", "--model", "evl-nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown model preset 'evl-nonexistent'" in err


def test_bench_measurements_run_isolated_and_report_errors():
    from evl.bench import run_isolated

    result = run_isolated("inference", BenchConfig(model="evl-nonexistent", repeats=1), batch=1)
    assert result == {"error": result["error"]} and result["error"].startswith("ValueError: unknown model")


def test_a_measurement_process_that_is_killed_is_reported_not_waited_for():
    """A child killed by the system (e.g. out of memory) never reports; the runner must not wait forever."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    from evl.bench import run_isolated

    results = []
    runner = threading.Thread(
        target=lambda: results.append(
            run_isolated("train_step", BenchConfig(repeats=50), batch=2, freeze=True)
        )
    )
    runner.start()
    deadline = time.monotonic() + 60
    while not multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (child,) = multiprocessing.active_children()
    os.kill(child.pid, signal.SIGKILL)
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert results == [{"error": f"measurement process ended without a result (exit code {-signal.SIGKILL})"}]
