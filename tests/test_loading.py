"""Data-loader settings sized to the machine, device copies, and out-of-memory in evaluation as an error."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from evl.config import (
    DataConfig,
    DecoderConfig,
    ModelConfig,
    RunConfig,
    VisionConfig,
    run_config_from_dict,
    to_dict,
)
from evl.devices import DeviceOutOfMemory
from evl.engine.cached_data import to_frame_features
from evl.engine.cached_eval import evaluate_cached
from evl.engine.evaluate import eval_loader, evaluate
from evl.engine.extract import extract
from evl.engine.feature_cache import FeatureCache
from evl.engine.loading import default_num_workers, loader_options, processes_per_node
from evl.models.evl import EVL
from evl.recipes import RecipeError, build_run_config, load_resolved, save_resolved
from evl.video.lists import read_list
from factories import tiny_dataset


def on(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


# ---------------------------------------------------------------------------------------- worker counts


@pytest.fixture
def cpus(monkeypatch):
    """Set the CPUs this process may use; LOCAL_WORLD_SIZE starts unset."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_cpus(affinity: int, machine: int | None = None) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: machine if machine is not None else affinity)

    return set_cpus


@pytest.mark.parametrize(
    ("cpu_count", "processes", "expected"),
    [
        (1, 1, 0),  # the only core is the main process's
        (2, 1, 1),
        (4, 1, 3),
        (9, 1, 8),
        (64, 1, 8),  # capped
        (16, 4, 3),  # 4 cores each, one kept for the process
        (16, 8, 1),
        (16, 16, 0),
        (4, 8, 0),  # fewer cores than processes: never below 0
        (17, 2, 7),  # an odd core is not split
    ],
)
def test_default_num_workers_shares_the_cpus(cpus, cpu_count, processes, expected):
    cpus(cpu_count)
    assert default_num_workers(processes) == expected


def test_default_num_workers_counts_the_affinity_not_the_machine(cpus):
    cpus(affinity=3, machine=64)  # e.g. a job granted 3 cores of a 64-core node
    assert default_num_workers() == 2


def test_default_num_workers_without_affinity(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert default_num_workers() == 5 and default_num_workers(3) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # undeterminable
    assert default_num_workers() == 0


def test_processes_per_node_reads_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert processes_per_node() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert processes_per_node() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert processes_per_node() == 1


# ------------------------------------------------------------------------------------------ loader options


def test_loader_options_resolve_none_for_the_node(cpus, monkeypatch):
    cpus(16)
    assert loader_options(torch.device("cpu"), None)["num_workers"] == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_options(torch.device("cpu"), None)["num_workers"] == 3
    # A number given is taken as it is, whatever the machine.
    assert loader_options(torch.device("cpu"), 0)["num_workers"] == 0
    assert loader_options(torch.device("cpu"), 12)["num_workers"] == 12


def test_loader_options_pin_memory_for_cuda_only():
    cpu = loader_options(torch.device("cpu"), 0)
    assert cpu == {"num_workers": 0, "pin_memory": False}
    # Building the options needs no GPU: they only name the device type.
    assert loader_options(torch.device("cuda"), 0)["pin_memory"] is True
    assert loader_options(torch.device("cuda", 1), 3) == {"num_workers": 3, "pin_memory": True}


def test_loader_options_build_a_loader(cpus):
    cpus(2)
    loader = DataLoader(list(range(5)), batch_size=2, **loader_options(torch.device("cpu"), None))
    assert loader.num_workers == 1 and not loader.pin_memory
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4]]


def test_loader_options_refuse_negative_workers():
    with pytest.raises(ValueError, match="num_workers"):
        loader_options(torch.device("cpu"), -1)


# ---------------------------------------------------------------------------------------------- config


def test_data_config_num_workers():
    assert DataConfig().num_workers is None
    assert DataConfig(num_workers=0).num_workers == 0
    with pytest.raises(ValueError, match=r"data\.num_workers") as info:
        DataConfig(num_workers=-2)
    assert "\n" not in str(info.value) and "-2" in str(info.value)


def test_negative_num_workers_override_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"data\.num_workers=-1"):
        build_run_config(overrides=["data.num_workers=-1"])


def test_none_num_workers_round_trips(tmp_path):
    config = build_run_config()
    assert config.data.num_workers is None
    path = save_resolved(config, tmp_path / "config.json")
    assert json.loads(path.read_text())["data"]["num_workers"] is None
    assert load_resolved(path) == config
    assert run_config_from_dict(to_dict(config)) == config  # a run directory's config.json


def test_num_workers_from_recipe_flag_and_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  num_workers: null\n", encoding="utf-8")
    assert build_run_config(recipe).data.num_workers is None
    recipe.write_text("data:\n  num_workers: 3\n", encoding="utf-8")
    # A flag left out (None) keeps the recipe's value; a flag given wins; --set null restores the default.
    assert build_run_config(recipe, **{"data.num_workers": None}).data.num_workers == 3
    assert build_run_config(recipe, **{"data.num_workers": 0}).data.num_workers == 0
    config = build_run_config(recipe, ["data.num_workers=null"])
    assert config.data.num_workers is None
    assert load_resolved(save_resolved(config, tmp_path / "config.json")) == config


def test_shipped_demo_recipe_keeps_its_workers():
    assert build_run_config("demo_synth").data.num_workers == 2


# --------------------------------------------------------------------------------------- device copies


def test_to_frame_features_on_device(device):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 3, 5, 8, generator=g).half()
    attn = torch.rand(2, 2, 2, 4, 4, generator=g).half()
    if device.type == "cuda":  # what a loader with pin_memory hands over
        out, attn = out.pin_memory(), attn.pin_memory()
    features = to_frame_features([(out, attn), (out[:, :, :3], None)], device)
    assert len(features) == 2 and features[1].attn is None
    for got, want in [(features[0].out, out), (features[0].attn, attn), (features[1].out, out[:, :, :3])]:
        assert on(got, device) and got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.cpu(), want.float(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- evaluation

NUM_FRAMES = 2


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    # 4 classes, one validation video each: 6 frames of 32 px.
    return tiny_dataset(tmp_path_factory.mktemp("synth"), train_per_class=1, frames=6, size=32)


def tiny_model(num_classes: int, device: torch.device) -> EVL:
    vision = VisionConfig(width=48, layers=2, heads=3, patch_size=8, image_size=32, output_dim=24)
    decoder = DecoderConfig(num_frames=NUM_FRAMES, num_layers=1, num_classes=num_classes)
    return EVL(ModelConfig(backbone=vision, decoder=decoder, backbone_name="tiny")).to(device).eval()


def val_data(videos, **changes) -> DataConfig:
    fields = dict(data_root=str(videos.root), num_frames=NUM_FRAMES, frame_stride=2, num_workers=0)
    return DataConfig(**{**fields, **changes})


def entries_of(videos, data: DataConfig):
    return read_list(videos.val_list, num_classes=videos.num_classes, data_root=data.data_root)


def running_out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")


def check_out_of_memory(info: pytest.ExceptionInfo, batch_size: int, micro_batch: int) -> None:
    err = info.value
    assert (err.stage, err.batch_size, err.micro_batch) == ("evaluation", batch_size, micro_batch)
    message = str(err)
    assert "\n" not in message and "--" not in message  # one line, and the engine names no flag
    # Raised after the handler: the failed pass's traceback (and what its frames hold) is not kept.
    assert err.__cause__ is None and err.__context__ is None


def test_eval_loader_takes_the_machine_options(videos, cpus, device):
    cpus(3)
    model = tiny_model(videos.num_classes, device)
    data = val_data(videos, num_workers=None)
    loader = eval_loader(model, entries_of(videos, data), data, batch_size=2)
    assert loader.num_workers == 2 and loader.pin_memory == (device.type == "cuda")


def test_evaluate_on_device(videos, device):
    model = tiny_model(videos.num_classes, device)
    data = val_data(videos, num_spatial_views=3)
    evaluation = evaluate(model, entries_of(videos, data), data, batch_size=3, progress=False)
    assert evaluation.result.num_videos == 4 and evaluation.decoded.all()
    np.testing.assert_allclose(evaluation.scores.sum(1), 1.0, atol=1e-5)


def test_evaluation_out_of_memory_is_an_error_with_the_batch_sizes(videos, device, monkeypatch):
    model = tiny_model(videos.num_classes, device)
    monkeypatch.setattr(model, "forward", running_out_of_memory)
    # 2 videos per batch, 2 temporal x 3 spatial views each: 12 clips per forward pass.
    data = val_data(videos, num_temporal_views=2, num_spatial_views=3)
    with pytest.raises(DeviceOutOfMemory) as info:
        evaluate(model, entries_of(videos, data), data, batch_size=2, progress=False)
    check_out_of_memory(info, batch_size=2, micro_batch=12)


def test_other_errors_of_the_forward_pass_pass_through(videos, device, monkeypatch):
    model = tiny_model(videos.num_classes, device)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a full device")

    monkeypatch.setattr(model, "forward", broken)
    data = val_data(videos)
    with pytest.raises(RuntimeError, match="a bug"):
        evaluate(model, entries_of(videos, data), data, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def cached(videos, tmp_path_factory) -> tuple[FeatureCache, dict[str, torch.Tensor]]:
    """A feature cache of the validation videos, and the weights of the tiny model that made it."""
    model = tiny_model(videos.num_classes, torch.device("cpu"))
    data = val_data(videos)
    out = tmp_path_factory.mktemp("cache")
    extract(model, RunConfig(data=data), entries_of(videos, data), list(videos.classes), out, progress=False)
    return FeatureCache.open(out), model.state_dict()


def cache_reader(videos, cached, device: torch.device) -> EVL:
    model = tiny_model(videos.num_classes, device)
    model.load_state_dict(cached[1])
    return model


def test_cached_evaluation_on_device(videos, cached, device):
    model = cache_reader(videos, cached, device)
    evaluation = evaluate_cached(model, cached[0], batch_size=3, progress=False, num_workers=0)
    assert evaluation.result.num_videos == 4 and evaluation.decoded.all()
    np.testing.assert_allclose(evaluation.scores.sum(1), 1.0, atol=1e-5)


def test_cached_evaluation_out_of_memory(videos, cached, device, monkeypatch):
    model = cache_reader(videos, cached, device)
    monkeypatch.setattr(model, "forward_head", running_out_of_memory)
    with pytest.raises(DeviceOutOfMemory) as info:
        evaluate_cached(model, cached[0], batch_size=3, progress=False, num_workers=0)
    check_out_of_memory(info, batch_size=3, micro_batch=3)
