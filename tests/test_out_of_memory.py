"""Out of device memory in training ends with one line naming the batch sizes and what to pass instead,
and the last good checkpoint stays."""

from __future__ import annotations

import pytest
import torch

from evl.cli import main as cli_main
from evl.engine.checkpoint import load_checkpoint
from evl.models.evl import EVL
from factories import tiny_dataset, train_flags


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"), frames=8)


def train_args(dataset, run_dir, steps):
    extra = ("--batch-split", "2", "--save-every", "1", "--decoder-layers", "1")
    return train_flags(dataset, run_dir, *extra, steps=steps, val=False)


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


def test_out_of_memory_in_predict_is_one_line_without_a_batch_flag(dataset, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert cli_main(train_args(dataset, run_dir, steps=1)) == 0
    video = next((dataset.root / "videos").rglob("*.mp4"))
    capsys.readouterr()

    def out_of_memory(self, features):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(EVL, "forward_head", out_of_memory)
    assert cli_main(["predict", str(run_dir), str(video)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "out of device memory in evaluation" in err and "the views of one video do not fit" in err
    assert "--batch-size" not in err  # evl predict has no such flag
