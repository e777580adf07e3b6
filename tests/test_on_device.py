"""The device-sensitive path end to end on the test device (the CPU, or ``EVL_TEST_DEVICE=cuda``): train,
load, evaluate, predict, extract a feature cache and train from it, and training in half precision."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from conftest import TEST_DEVICE
from evl.cli import main
from evl.engine.checkpoint import list_checkpoints, load_checkpoint
from evl.engine.evaluate import evaluate
from evl.engine.feature_cache import DONE, FeatureCache
from evl.engine.predict import Predictor
from evl.engine.run import load_run
from evl.engine.train import train
from evl.recipes import build_run_config
from evl.video.lists import read_list
from factories import tiny_dataset

STEPS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 4 classes: 8 training and 4 validation videos of 10 frames at 48 px.
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def flags(dataset) -> dict[str, object]:
    return {
        "data.data_root": str(dataset.root),
        "data.train_list": str(dataset.train_list),
        "data.val_list": str(dataset.val_list),
        "data.classes": str(dataset.classes_file),
        "backbone.name": "random:ViT-T/16@112",
        "data.num_frames": 4,
        "data.frame_stride": 2,
        "data.num_workers": 0,
        "decoder.num_layers": 2,
        "train.steps": STEPS,
        "train.batch_size": 4,
        "train.batch_split": 2,  # two micro-batches: gradient accumulation runs on the device too
        "train.lr": 1e-3,
        "train.eval_every": STEPS,
        "train.save_every": STEPS,
    }


def run_config(dataset, *overrides: str, **changes: object):
    return build_run_config(None, ["data.rand_augment=null", *overrides], **{**flags(dataset), **changes})


def on(tensor: torch.Tensor, device: torch.device) -> bool:
    """``tensor`` is on ``device`` (``cuda`` matches ``cuda:0``, as a model moved to ``cuda`` is)."""
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)


def tensors_in(value: object) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors_in(item)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """One short run shared by the tests that read it. The ``device`` fixture is per test; this run trains
    on the same device, which conftest takes from EVL_TEST_DEVICE."""
    run_dir = tmp_path_factory.mktemp("run")
    return train(run_config(dataset), run_dir, device=TEST_DEVICE, progress=False)


def test_training_on_device(trained):
    assert trained.step == STEPS and math.isfinite(trained.final_loss) and trained.final_loss > 0
    assert [step for step, _ in list_checkpoints(trained.run_dir)] == [STEPS]
    val = trained.evaluation.result
    assert val.num_videos == 4 and 0 <= val.top1 <= val.top5 <= 100
    # A checkpoint written from any device loads onto the CPU: weights and optimiser state alike, and the
    # weights stay float32 whatever the compute precision was.
    checkpoint = load_checkpoint(trained.run_dir)
    assert checkpoint.step == STEPS and checkpoint.model_state
    for name, tensor in checkpoint.model_state.items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32, name
        assert tensor.isfinite().all(), name
    state_tensors = list(tensors_in(checkpoint.train_state))
    assert state_tensors and all(t.device.type == "cpu" for t in state_tensors)


def test_load_run_puts_the_model_on_the_device(trained, device):
    loaded = load_run(trained.run_dir, device=device)
    assert loaded.step == STEPS and not loaded.model.training
    for name, tensor in [*loaded.model.named_parameters(), *loaded.model.named_buffers()]:
        assert on(tensor, device), f"{name} on {tensor.device}, not {device}"
    # The weights on the device are the checkpoint's.
    checkpoint = load_checkpoint(trained.run_dir)
    for name, tensor in loaded.model.trainable_state_dict().items():
        torch.testing.assert_close(tensor.cpu(), checkpoint.model_state[name], rtol=0, atol=0, msg=name)


def test_evaluate_and_predict_on_device(trained, dataset, device):
    loaded = load_run(trained.run_dir, device=device)
    data = loaded.run.data
    entries = read_list(data.val_list, num_classes=len(loaded.classes), data_root=data.data_root)
    evaluation = evaluate(loaded.model, entries, data, batch_size=2, progress=False)
    result = evaluation.result
    assert result.num_videos == 4 and result.num_skipped == 0
    assert 0 <= result.top1 <= result.top5 <= 100 and 0 <= result.mean_class_accuracy <= 100
    # Each row is a softmax averaged over views: a probability distribution.
    assert np.isfinite(evaluation.scores).all() and (evaluation.scores >= 0).all()
    np.testing.assert_allclose(evaluation.scores.sum(1), 1.0, atol=1e-5)

    predictor = Predictor(loaded)
    probs = predictor.probabilities(dataset.root / entries[0].path)
    assert probs.shape == (len(dataset.classes),) and probs.min() >= 0
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    # One video alone gives the scores it got in a batch of two (same views, same preprocessing); the
    # batch changes only the rounding, coarser with the bfloat16 backbone of GPUs.
    atol = 1e-4 if device.type == "cpu" else 2e-2
    np.testing.assert_allclose(probs.numpy(), evaluation.scores[0], atol=atol)
    prediction = predictor.predict(dataset.root / entries[0].path, topk=3)
    assert prediction.probabilities == sorted(prediction.probabilities, reverse=True)
    assert len(prediction.classes) == 3 and set(prediction.classes) <= set(dataset.classes)


def test_extract_then_train_from_features_on_device(dataset, device, tmp_path):
    cache_dir = tmp_path / "cache"
    args = [
        "extract",
        "--data-root", str(dataset.root),
        "--train-list", str(dataset.train_list),
        "--classes", str(dataset.classes_file),
        "--backbone", "random:ViT-T/16@112",
        "--num-frames", "4",
        "--frame-stride", "2",
        "--decoder-layers", "2",
        "--num-workers", "0",
        "--batch-size", "3",  # 8 videos: a last, partial batch
        "--device", str(device),
        "--output", str(cache_dir),
        "--quiet",
    ]  # fmt: skip
    assert main(args) == 0
    cache = FeatureCache.open(cache_dir)
    train_entries = read_list(dataset.train_list)
    # One row per listed video, in list order, every one extracted.
    assert cache.meta.num_videos == len(train_entries) == 8 and cache.meta.blocks == (4, 5)
    assert [path for path, _ in cache.entries()] == [e.path for e in train_entries]
    assert (np.asarray(cache.status()) == DONE).all()
    for block in cache.meta.blocks:
        out = np.load(cache_dir / f"block{block}.out.npy", mmap_mode="r")
        attn = np.load(cache_dir / f"block{block}.attn.npy", mmap_mode="r")
        assert out.shape == (8, 4, 50, 192) and out.dtype == np.float16
        assert np.isfinite(out).all() and np.abs(out).reshape(8, -1).max(1).min() > 0  # no row left empty
        # Head-averaged softmax maps between adjacent frames: rows sum to one (within float16 error).
        assert attn.shape == (8, 2, 3, 49, 49)
        np.testing.assert_allclose(attn.astype(np.float32).sum(-1), 1.0, atol=3e-3)

    run = run_config(dataset, "data.val_list=null", **{"data.features": str(cache_dir)})
    result = train(run, tmp_path / "run", device=str(device), progress=False)
    assert result.step == STEPS and math.isfinite(result.final_loss)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [STEPS]


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_half_precision_training_on_device(dataset, device, tmp_path, precision):
    run = run_config(dataset, **{"train.precision": precision, "train.steps": 2, "train.eval_every": 2})
    result = train(run, tmp_path / "run", device=str(device), progress=False)
    assert result.step == 2 and math.isfinite(result.final_loss)
    assert 0 <= result.evaluation.result.top1 <= 100
    checkpoint = load_checkpoint(tmp_path / "run")
    # Autocast computes in half precision; the weights it updates stay float32.
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in checkpoint.model_state.values())
