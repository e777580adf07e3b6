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
from evl.models.registry import OfflineWeightsError, create_backbone
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


def _tiny_dinov2_folder(folder):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
                          image_size=40, patch_size=8)  # fmt: skip
    Dinov2Model(config).save_pretrained(folder)


def test_preset_names_find_hugging_face_folders_offline(tmp_path, monkeypatch):
    weights, hub = tmp_path / "weights", tmp_path / "hub"
    monkeypatch.setenv("EVL_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(OfflineWeightsError, match="fetch the Hugging Face folder facebook/dinov2-base"):
        create_backbone("DINOv2-B/14")
    # As the hub caches a download: models--ORG--NAME/snapshots/REVISION/.
    _tiny_dinov2_folder(hub / "models--facebook--dinov2-base" / "snapshots" / "abc123")
    module, name = create_backbone("DINOv2-B/14")
    assert module.config.family == "dinov2" and name.endswith("abc123")
    # A folder named after the repository in EVL_WEIGHTS_DIR comes first.
    _tiny_dinov2_folder(weights / "dinov2-base")
    assert create_backbone("DINOv2-B/14")[1] == str(weights / "dinov2-base")


def test_flops_of_other_encoders_under_the_decoder(capsys):
    from evl.cli import main

    reports = {}
    for backbone in ("ViT-B/16", "SigLIP-B/16", "DINOv2-B/14"):
        assert main(["flops", "--backbone", backbone, "--views", "1"]) == 0
        reports[backbone] = json.loads(capsys.readouterr().out)
    assert reports["SigLIP-B/16"]["backbone"] == "SigLIP-B/16"
    # 196 patch tokens without a class token, against CLIP's 197; DINOv2 at 224 px has 16 x 16 patches + 1.
    clip, siglip, dino = (reports[b]["backbone_gflops"] for b in ("ViT-B/16", "SigLIP-B/16", "DINOv2-B/14"))
    assert siglip < clip < dino
