"""Image encoder families: configs, the family table, reading a file's family, and runs saved before the
families existed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from evl.config import VisionConfig, to_dict, vision_preset
from evl.engine.run import _differences
from evl.models.encoders import create_encoder
from evl.models.registry import create_backbone
from evl.weights import VISION_CONFIG_METADATA, WeightFormatError, read_vision


def test_token_layout_per_family():
    clip = VisionConfig(width=48, heads=3, patch_size=8, image_size=40)
    assert (clip.prefix_tokens, clip.num_patches, clip.num_tokens) == (1, 25, 26)
    siglip = VisionConfig(width=48, heads=3, patch_size=8, image_size=40, family="siglip")
    assert (siglip.prefix_tokens, siglip.num_tokens) == (0, 25)
    dino = VisionConfig(width=48, heads=3, patch_size=8, image_size=40, family="dinov2", register_tokens=4)
    assert (dino.prefix_tokens, dino.num_tokens) == (5, 30)


def test_config_refuses_unknown_families_activations_and_misplaced_registers():
    with pytest.raises(ValueError, match="unknown family 'vit'"):
        VisionConfig(family="vit")
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        VisionConfig(activation="relu")
    with pytest.raises(ValueError, match="register tokens are DINOv2's"):
        VisionConfig(register_tokens=4)


def test_saved_backbone_reads_back_with_its_config(tmp_path):
    torch.manual_seed(0)
    config = vision_preset("ViT-T/16@112", heads=4)  # a head count no shape tells
    module = create_encoder(config)
    path = tmp_path / "backbone.safetensors"
    save_file(module.state_dict(), str(path), metadata={VISION_CONFIG_METADATA: json.dumps(to_dict(config))})
    read, state = read_vision(path)
    assert read == config and state.keys() == module.state_dict().keys()
    loaded, _ = create_backbone(path)
    expected = module.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    with pytest.raises(WeightFormatError, match="not resized on loading"):
        read_vision(path, image_size=64)


def test_damaged_saved_config_is_one_line(tmp_path):
    path = tmp_path / "backbone.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={VISION_CONFIG_METADATA: '{"family": "vit"}'})
    with pytest.raises(WeightFormatError, match=f"damaged {VISION_CONFIG_METADATA} metadata"):
        read_vision(path)


def test_unsupported_hugging_face_model_type_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightFormatError, match="model_type 'vit_mae' is not a supported image encoder"):
        create_backbone(tmp_path)


def test_runs_saved_before_families_existed_still_match_their_model():
    # As load_run compares them: the built description through JSON (tuples become lists).
    built = json.loads(
        json.dumps({"backbone": to_dict(vision_preset("ViT-T/16@112")), "decoder": {"layers": 4}})
    )
    saved = json.loads(json.dumps(built))
    del saved["backbone"]["family"], saved["backbone"]["register_tokens"]
    assert _differences(saved, built) == []
    other = json.loads(json.dumps(built))
    other["backbone"]["family"] = "dinov2"
    assert _differences(saved, other) == ["backbone.family: saved 'clip', now 'dinov2'"]
