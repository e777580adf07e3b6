"""The method registry: every entry builds a model the engine can drive through the VideoModel protocol, and
the entries carry the defaults the methods' reference code uses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from evl.config import CLIP_MEAN, IMAGENET_MEAN, BackboneSpec, DataConfig, MethodConfig, RunConfig
from evl.engine.methods import (
    METHODS,
    build_method_optimizer,
    build_model,
    has_trainable_parameters,
    method_spec,
    normalization_stats,
    templates_for,
)
from evl.engine.train import train
from evl.models.protocol import TextVideoModel, VideoModel
from factories import TINY_BACKBONE

CLASSES = ["left", "right", "up"]
# Settings a method needs on the tiny random ViT: deep prompts no deeper than its 6 image and 4 text blocks.
TINY_SETTINGS = {"vifi_prompt": dict(prompt_vision_depth=6, prompt_text_depth=4)}


def _run(name: str, **method) -> RunConfig:
    return RunConfig(
        backbone=BackboneSpec(name=TINY_BACKBONE),
        data=DataConfig(num_frames=3),
        method=MethodConfig(name=name, **method),
    )


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return {
        name: build_model(_run(name, **TINY_SETTINGS.get(name, {})), None, CLASSES, seed=1).model
        for name in METHODS
    }


def test_the_registry_knows_the_five_methods():
    assert list(METHODS) == ["evl", "vifi", "vifi_prompt", "xclip", "zeroshot"]
    assert all(name == spec.name for name, spec in METHODS.items())


@pytest.mark.parametrize("name", ["evl", "vifi", "vifi_prompt", "xclip", "zeroshot"])
def test_every_method_builds_a_video_model(built, name):
    model, spec = built[name], METHODS[name]
    assert isinstance(model, VideoModel)
    assert isinstance(model, TextVideoModel) == spec.reads_text
    assert model.num_classes == len(CLASSES)
    assert has_trainable_parameters(model) == spec.trains
    video = torch.randn(2, 3, 3, model.vision_config.image_size, model.vision_config.image_size)
    with torch.no_grad():
        assert model.eval()(video).shape == (2, len(CLASSES))


@pytest.mark.parametrize("name", ["evl", "vifi", "vifi_prompt", "xclip", "zeroshot"])
def test_trainable_state_round_trips_and_mismatches_are_one_line(built, name):
    model = built[name]
    state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained <= set(state)
    model.load_trainable_state_dict(state, source="ckpt")
    if state:
        key = sorted(state)[0]
        with pytest.raises(ValueError, match=r"^ckpt does not match the model") as err:
            model.load_trainable_state_dict({k: v for k, v in state.items() if k != key}, source="ckpt")
        assert "\n" not in str(err.value)


def test_the_methods_defaults_are_the_references():
    betas = {name: spec.betas for name, spec in METHODS.items()}
    assert betas == {
        "evl": (0.9, 0.999),
        "vifi": (0.9, 0.98),
        "vifi_prompt": (0.9, 0.98),
        "xclip": (0.9, 0.98),
        "zeroshot": (0.9, 0.98),
    }
    templates = {name: templates_for(MethodConfig(name=name)) for name in METHODS if METHODS[name].reads_text}
    assert templates == {
        "vifi": ("a photo of a {}.",),
        "vifi_prompt": ("X X X X X X X X X X {}.",),  # 10 context tokens: placeholder words
        "xclip": ("{}",),
        "zeroshot": ("{}",),
    }
    means = {name: normalization_stats(MethodConfig(name=name)) for name in METHODS}
    assert means["evl"] is None and means["zeroshot"] is None  # the encoder's own
    assert means["vifi"][0] == means["vifi_prompt"][0] == means["xclip"][0] == IMAGENET_MEAN
    assert normalization_stats(MethodConfig(name="vifi", normalization="clip"))[0] == CLIP_MEAN
    assert [n for n, s in METHODS.items() if s.trains_from_features] == ["evl"]


@pytest.mark.parametrize("name", ["evl", "vifi", "vifi_prompt", "xclip"])
def test_the_optimizer_takes_the_methods_betas_unless_set(built, name):
    run = _run(name)
    assert build_method_optimizer(built[name], run).defaults["betas"] == METHODS[name].betas
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, betas=(0.8, 0.9)))
    assert build_method_optimizer(built[name], run).defaults["betas"] == (0.8, 0.9)


def test_an_unknown_method_is_refused_by_name_before_a_run_directory_exists(tmp_path):
    message = "method.name must be one of evl, vifi, vifi_prompt, xclip, zeroshot, got 'bogus'"
    with pytest.raises(ValueError, match=message):
        method_spec("bogus")
    with pytest.raises(ValueError, match=message):
        train(_run("bogus"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
