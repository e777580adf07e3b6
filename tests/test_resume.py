"""kill -9 at a random moment, then --resume auto: the final weights are bit-identical to a run that was
never interrupted (same seed, CPU), data order, augmentation, dropout and validation included."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from evl.engine.checkpoint import list_checkpoints, load_checkpoint
from factories import tiny_dataset, train_flags

STEPS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def command(dataset, run_dir):
    extra = ("--lr", "1e-3", "--warmup-steps", "2", "--eval-every", "2", "--save-every", "1")
    extra += ("--decoder-layers", "2", "--seed", "5")
    return [sys.executable, "-m", "evl", *train_flags(dataset, run_dir, *extra, steps=STEPS, batch_size=2)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def final_weights(run_dir):
    return load_checkpoint(run_dir).model_state


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    subprocess.run(command(dataset, run_dir), env=ENV, check=True, capture_output=True, timeout=300)
    return final_weights(run_dir)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_then_resume_is_bit_identical(dataset, reference, tmp_path, seed):
    rng = random.Random(seed)
    kill_after = rng.randint(1, STEPS - 1)  # checkpoints seen before the kill
    delay = rng.uniform(0.0, 0.3)  # then a random moment, possibly mid-step or mid-write
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        command(dataset, run_dir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 180
    while time.time() < deadline and len(list_checkpoints(run_dir)) < min(kill_after, 2):
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert max(step for step, _ in list_checkpoints(run_dir)) < STEPS
    subprocess.run(command(dataset, run_dir), env=ENV, check=True, capture_output=True, timeout=300)
    resumed = final_weights(run_dir)
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
