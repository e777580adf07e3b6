"""Checkpoints: round trip, damage detection, fallback, pruning, RNG state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from evl.engine.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from evl.engine.optim import build_optimizer, build_scheduler
from evl.engine.train_state import capture_rng_state, make_train_state, restore_rng_state, restore_train_state

CONFIG = {"model": {"width": 32, "blocks": [2, 3]}, "train": {"lr": 4e-4}}


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))


def _save(run_dir, step: int, **kwargs):
    model = _model()
    state = {"step_note": f"at {step}", "data": {"epoch": 0, "index": step}}
    return save_checkpoint(run_dir, step, model.state_dict(), state, CONFIG, **kwargs), model


def _draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(2).tolist()


def test_round_trip_and_layout(tmp_path):
    path, model = _save(tmp_path, 1234)
    ckpt_dir = checkpoint_dir(tmp_path)
    assert path == ckpt_dir / "step-00001234.safetensors"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "latest",
        "step-00001234.safetensors",
        "step-00001234.state.pt",
    ]
    assert (ckpt_dir / "latest").read_text().strip() == "step-00001234"

    for where in (tmp_path, ckpt_dir, path, ckpt_dir / "step-00001234.state.pt", ckpt_dir / "step-00001234"):
        ckpt = load_checkpoint(where)
        assert ckpt.step == 1234 and ckpt.path == path
        assert ckpt.config == CONFIG
        assert ckpt.train_state == {"step_note": "at 1234", "data": {"epoch": 0, "index": 1234}}
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(ckpt.model_state[name], tensor, rtol=0, atol=0)


def test_full_train_state_round_trip_resumes_identically(tmp_path):
    def make():
        torch.manual_seed(1)
        model = _model()
        opt = build_optimizer(model, lr=1e-2, weight_decay=0.05)
        return model, opt, build_scheduler(opt, total_steps=8, warmup_steps=2)

    def train_step(model, opt, sched):
        loss = model(torch.randn(4, 5)).square().mean()  # the draw comes from the restored torch RNG
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    model, opt, sched = make()
    for _ in range(3):
        train_step(model, opt, sched)
    save_checkpoint(tmp_path, 3, model.state_dict(), make_train_state(opt, sched, data={"index": 12}), CONFIG)
    for _ in range(3):
        train_step(model, opt, sched)
    expected = model.state_dict()

    model, opt, sched = make()
    ckpt = load_checkpoint(tmp_path, expected_config={"model": CONFIG["model"]})
    model.load_state_dict(ckpt.model_state)
    assert restore_train_state(ckpt.train_state, opt, sched) == {"index": 12}
    for _ in range(3):
        train_step(model, opt, sched)
    for name, tensor in expected.items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)


def test_rng_state_round_trip_restores_identical_draws(tmp_path):
    np_gen, torch_gen = np.random.default_rng(7), torch.Generator().manual_seed(7)
    generators = {"sampler": np_gen, "augment": torch_gen}
    state = {"rng": capture_rng_state(generators)}
    save_checkpoint(tmp_path, 5, {"w": torch.zeros(1)}, state, CONFIG)
    expected = (_draws(), np_gen.integers(1 << 60, size=3).tolist(), torch.rand(2, generator=torch_gen))

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    np_gen.integers(10), torch.rand(1, generator=torch_gen)  # move the generators on
    restore_rng_state(load_checkpoint(tmp_path).train_state["rng"], generators)  # weights-only load
    actual = (_draws(), np_gen.integers(1 << 60, size=3).tolist(), torch.rand(2, generator=torch_gen))
    assert actual[:2] == expected[:2]
    torch.testing.assert_close(actual[2], expected[2], rtol=0, atol=0)


def test_truncated_weights_detected_and_previous_checkpoint_used(tmp_path):
    _save(tmp_path, 100)
    newest, _ = _save(tmp_path, 200)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # as if killed mid-write without the atomic rename

    with pytest.raises(CheckpointError, match=r"step-00000200\.safetensors"):
        load_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match=r"step-00000200\.safetensors"):
        assert find_resumable(tmp_path) == checkpoint_dir(tmp_path) / "step-00000100.safetensors"


def test_flipped_byte_in_weights_fails_the_checksum(tmp_path):
    path, _ = _save(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data, past the header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_damaged_or_missing_state_file(tmp_path):
    path, _ = _save(tmp_path, 1)
    state_path = path.with_name("step-00000001.state.pt")
    state_path.write_bytes(state_path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"step-00000001\.state\.pt"):
        load_checkpoint(path)
    state_path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)


def test_state_file_from_another_save_is_rejected(tmp_path):
    # A crash between the new state file and the new weights of a re-saved step leaves a mixed pair.
    path, _ = _save(tmp_path, 1)
    state = {"format": "evl.checkpoint.v1", "step": 1, "train_state": {"data": {"index": 999}}}
    torch.save(state, path.with_name("step-00000001.state.pt"))
    with pytest.raises(CheckpointError, match="not paired"):
        load_checkpoint(path)


def test_latest_pointing_at_missing_file_falls_back(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    (checkpoint_dir(tmp_path) / "latest").write_text("step-00000030\n")
    with pytest.raises(CheckpointError, match=r"step-00000030\.safetensors"):
        load_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match="step-00000030"):
        assert find_resumable(tmp_path).name == "step-00000020.safetensors"


def test_find_resumable_prefers_latest_and_handles_empty_dirs(tmp_path):
    assert find_resumable(tmp_path) is None
    _save(tmp_path, 50)
    _save(tmp_path, 10)  # a run restarted from an earlier step: `latest` names step 10
    assert find_resumable(tmp_path).name == "step-00000010.safetensors"


def test_keep_last_prunes_older_and_keeps_latest(tmp_path):
    ckpt_dir = checkpoint_dir(tmp_path)
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / ".step-00000003.safetensors.1f-0a0b0c0d.tmp").write_bytes(b"partial")  # a killed writer's
    (ckpt_dir / "notes.txt").write_text("mine")  # a user's file is never touched
    for step in range(1, 6):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "latest",
        "notes.txt",
        "step-00000004.safetensors",
        "step-00000004.state.pt",
        "step-00000005.safetensors",
        "step-00000005.state.pt",
    ]
    _save(tmp_path, 6, keep_last=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5, 6]


def test_pruning_never_touches_higher_steps(tmp_path):
    _save(tmp_path, 90)
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 90]


def test_config_mismatch_is_reported(tmp_path):
    _save(tmp_path, 1)
    load_checkpoint(tmp_path, expected_config={"model": {"width": 32, "blocks": (2, 3)}})  # tuple == list
    with pytest.raises(CheckpointError, match=r"model\.width \(checkpoint 32, expected 64\)"):
        load_checkpoint(tmp_path, expected_config={"model": {"width": 64}})


def test_unstorable_train_state_fails_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"train_state\['loss'\]"):
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {"loss": np.float64(1.0)}, CONFIG)
    assert not list_checkpoints(tmp_path)


def test_tied_weights_are_saved(tmp_path):
    shared = torch.arange(6.0)
    save_checkpoint(tmp_path, 1, {"a": shared, "b": shared, "c": shared[2:]}, {}, CONFIG)
    state = load_checkpoint(tmp_path).model_state
    assert state["a"].tolist() == state["b"].tolist() == list(range(6))
    assert state["c"].tolist() == [2.0, 3.0, 4.0, 5.0]
