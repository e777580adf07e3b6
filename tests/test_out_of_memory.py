"""Out of device memory in training ends with one line naming the batch sizes and what to pass instead,
and the last good checkpoint stays."""

from __future__ import annotations

import pytest
import torch

from evl.cli import main as cli_main
from evl.engine.checkpoint import load_checkpoint
from evl.models.evl import EVL
from evl.synth import make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return make_dataset(
        root, num_train_per_class=2, num_val_per_class=1, num_frames=8, size=48, progress=False
    )


def train_args(dataset, run_dir, steps):
    return [
        "train",
        "--data-root", str(dataset.root),
        "--train-list", str(dataset.train_list),
        "--classes", str(dataset.classes_file),
        "--backbone", "random:ViT-T/16@112",
        "--num-frames", "4",
        "--frame-stride", "2",
        "--steps", str(steps),
        "--batch-size", "4",
        "--batch-split", "2",
        "--save-every", "1",
        "--num-workers", "0",
        "--decoder-layers", "1",
        "--output-dir", str(run_dir),
        "--quiet",
    ]  # fmt: skip


def test_out_of_memory_in_training_is_one_line_and_keeps_the_checkpoint(
    dataset, tmp_path, capsys, monkeypatch
):
    run_dir = tmp_path / "run"
    assert cli_main(train_args(dataset, run_dir, steps=1)) == 0
    saved = load_checkpoint(run_dir)
    capsys.readouterr()

    def out_of_memory(self, features):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(EVL, "forward_head", out_of_memory)
    assert cli_main(train_args(dataset, run_dir, steps=3)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "out of device memory in training at batch size 4 (2 clips per forward pass)" in err
    assert "--batch-split 4" in err
    kept = load_checkpoint(run_dir)
    assert kept.step == saved.step == 1
    assert all(torch.equal(kept.model_state[k], v) for k, v in saved.model_state.items())
