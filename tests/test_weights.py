"""Loading CLIP image encoders from every real checkpoint format, and refusing what is unsafe or broken."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from evl.config import VisionConfig
from evl.models.clip_vit import CLIPVisionTransformer
from evl.models.registry import OfflineWeightsError, create_backbone
from evl.weights import WeightFormatError, load_clip_vision, read_state_dict
from factories import HF_TINY, random_openai_visual

WIDTH, HEADS = 48, 3
IMAGES = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(5))


def reference_embedding(visual: dict[str, torch.Tensor], **config) -> torch.Tensor:
    fields = dict(
        width=WIDTH, layers=3, heads=HEADS, patch_size=8, image_size=40, mlp_ratio=37 / WIDTH, output_dim=24
    )
    model = CLIPVisionTransformer(VisionConfig(**{**fields, **config})).eval()
    model.load_state_dict({k: v.float() for k, v in visual.items()}, strict=True)
    with torch.no_grad():
        return model(IMAGES)


def loaded_embedding(path, **kwargs) -> tuple[torch.Tensor, VisionConfig]:
    module, _ = create_backbone(path, **kwargs)
    with torch.no_grad():
        return module.eval()(IMAGES), module.config


def text_tower(prefix: str = "") -> dict[str, torch.Tensor]:
    """A stand-in for the text side that full CLIP checkpoints also carry (ignored by the image loader)."""
    return {
        f"{prefix}token_embedding.weight": torch.randn(99, 32),
        f"{prefix}positional_embedding": torch.randn(16, 32),
        f"{prefix}transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32),
        f"{prefix}ln_final.weight": torch.ones(32),
        f"{prefix}text_projection": torch.randn(32, 24),
        f"{prefix}logit_scale": torch.tensor(4.6052),
    }


class _OpenAIArchive(torch.nn.Module):
    """OpenAI's layout: ``visual`` plus text tower, and three 0-dim integer entries."""

    def __init__(self, visual: CLIPVisionTransformer) -> None:
        super().__init__()
        self.visual = visual
        self.token_embedding = torch.nn.Embedding(99, 32)
        self.ln_final = torch.nn.LayerNorm(32)
        self.text_projection = torch.nn.Parameter(torch.randn(32, 24))
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6052))
        self.register_buffer("input_resolution", torch.tensor(40))
        self.register_buffer("context_length", torch.tensor(16))
        self.register_buffer("vocab_size", torch.tensor(99))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def test_openai_torchscript_archive_mixed_precision(tmp_path):
    visual = random_openai_visual()
    config = VisionConfig(
        width=WIDTH, layers=3, heads=HEADS, patch_size=8, image_size=40, mlp_ratio=37 / WIDTH, output_dim=24
    )
    module = CLIPVisionTransformer(config).eval()
    module.load_state_dict(visual)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_OpenAIArchive(module).eval(), IMAGES)
        # As OpenAI ships them: matmul weights in fp16, LayerNorms and embeddings in fp32.
        for name, p in traced.named_parameters():
            if name.endswith(
                ("conv1.weight", "in_proj_weight", "c_fc.weight", "c_proj.weight", "out_proj.weight", "proj")
            ):
                p.data = p.data.half()
        path = tmp_path / "ViT-Tiny.pt"
        torch.jit.save(traced, str(path))
    state, info = read_state_dict(path)
    assert info["format"] == "openai-torchscript"
    assert "input_resolution" not in state and state["visual.conv1.weight"].dtype == torch.float16
    embedding, loaded = loaded_embedding(path, heads=HEADS)
    half_rounded = {
        k: (v.half().float() if state[f"visual.{k}"].dtype == torch.float16 else v) for k, v in visual.items()
    }
    assert loaded.heads == HEADS and loaded.output_dim == 24 and loaded.image_size == 40
    torch.testing.assert_close(embedding, reference_embedding(half_rounded), atol=0, rtol=0)


def test_openai_plain_state_dict(tmp_path):
    visual = random_openai_visual()
    path = tmp_path / "clip.pt"
    torch.save({**{f"visual.{k}": v for k, v in visual.items()}, **text_tower()}, path)
    embedding, config = loaded_embedding(path, heads=HEADS)
    assert config.layers == 3 and config.patch_size == 8 and config.mlp_width == 37
    torch.testing.assert_close(embedding, reference_embedding(visual), atol=0, rtol=0)


def test_heads_default_to_width_over_64(tmp_path):
    visual = random_openai_visual(width=128, mlp=256, output_dim=24)
    path = tmp_path / "clip.safetensors"
    save_file({f"visual.{k}": v for k, v in visual.items()}, str(path))
    config, _ = load_clip_vision(path)
    assert config.heads == 2


def test_open_clip_training_checkpoint_with_ddp_prefix(tmp_path):
    visual = random_openai_visual()
    state = {f"module.visual.{k}": v for k, v in visual.items()} | {
        f"module.{k}": v for k, v in text_tower().items()
    }
    path = tmp_path / "epoch_3.pt"
    torch.save(
        {"epoch": 3, "name": "run", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path
    )
    embedding, _ = loaded_embedding(path, heads=HEADS)
    torch.testing.assert_close(embedding, reference_embedding(visual), atol=0, rtol=0)


def test_open_clip_safetensors(tmp_path):
    visual = random_openai_visual()
    path = tmp_path / "open_clip_model.safetensors"
    save_file({**{f"visual.{k}": v for k, v in visual.items()}, **text_tower()}, str(path))
    embedding, _ = loaded_embedding(path, heads=HEADS)
    torch.testing.assert_close(embedding, reference_embedding(visual), atol=0, rtol=0)


def test_open_clip_hub_folder_reads_heads_activation_and_stats(tmp_path):
    visual = random_openai_visual()
    save_file({f"visual.{k}": v for k, v in visual.items()}, str(tmp_path / "open_clip_model.safetensors"))
    config = {
        "model_cfg": {
            "embed_dim": 24,
            "vision_cfg": {"width": WIDTH, "layers": 3, "patch_size": 8, "image_size": 40, "head_width": 16},
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    embedding, loaded = loaded_embedding(tmp_path)
    assert loaded.heads == HEADS and loaded.activation == "gelu" and loaded.mean == (0.5, 0.5, 0.5)
    torch.testing.assert_close(embedding, reference_embedding(visual, activation="gelu"), atol=0, rtol=0)


def _hf_vision_config() -> dict:
    return {k: v for k, v in HF_TINY.items() if k != "projection_dim"}


def test_huggingface_clip_model_folder(tmp_path):
    text = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    hf = CLIPModel(CLIPConfig(text_config=text, vision_config=_hf_vision_config(), projection_dim=24)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    embedding, config = loaded_embedding(tmp_path)
    assert config.heads == HEADS and config.output_dim == 24
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=IMAGES)
    expected = getattr(expected, "pooler_output", expected)
    assert (embedding - expected).abs().max().item() <= 1e-5


def test_huggingface_vision_model_folder_without_projection(tmp_path):
    hf = CLIPVisionModel(CLIPVisionConfig(**_hf_vision_config())).eval()
    hf.save_pretrained(tmp_path)
    embedding, config = loaded_embedding(tmp_path)
    assert config.output_dim is None and embedding.shape == (2, WIDTH)
    with torch.no_grad():
        expected = hf(pixel_values=IMAGES).pooler_output
    assert (embedding - expected).abs().max().item() <= 1e-5


def test_image_size_override_resizes_position_embeddings(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_file({f"visual.{k}": v for k, v in random_openai_visual().items()}, str(path))
    config, state = load_clip_vision(path, heads=HEADS, image_size=56)
    assert config.image_size == 56 and state["positional_embedding"].shape == (50, WIDTH)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}, "x": _Payload()}, path)
    with pytest.raises(WeightFormatError, match="refused to load"):
        create_backbone(path)
    assert not (tmp_path / "PWNED").exists()


def test_raw_pickle_protocol_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(WeightFormatError, match="refused to load"):
        read_state_dict(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty file"),
        (b"hello, this is text\n", "unrecognised file"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{broken", "damaged safetensors"),
    ],
)
def test_broken_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / ("weights.safetensors" if b"broken" in content else "weights.bin")
    path.write_bytes(content)
    with pytest.raises(WeightFormatError, match=message) as err:
        load_clip_vision(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_and_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file or folder nor a preset"):
        create_backbone(tmp_path / "nope.pt")
    with pytest.raises(WeightFormatError, match="a folder without CLIP weights"):
        load_clip_vision(tmp_path)


def test_checkpoint_without_image_encoder(tmp_path):
    path = tmp_path / "text_only.safetensors"
    save_file(text_tower(), str(path))
    with pytest.raises(WeightFormatError, match="no CLIP image encoder found"):
        load_clip_vision(path)


def test_preset_name_without_local_weights_is_a_clear_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EVL_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(OfflineWeightsError, match="evl does not download"):
        create_backbone("ViT-B/16")


def test_preset_name_finds_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("EVL_WEIGHTS_DIR", str(tmp_path))
    save_file(
        {f"visual.{k}": v for k, v in random_openai_visual().items()}, str(tmp_path / "model.safetensors")
    )
    (tmp_path / "ViT-B-16.pt").write_bytes((tmp_path / "model.safetensors").read_bytes())
    with pytest.raises(WeightFormatError, match="unrecognised file"):
        create_backbone("ViT-B/16")  # found, and read by content rather than by name
    torch.save({f"visual.{k}": v for k, v in random_openai_visual().items()}, tmp_path / "ViT-B-16.pt")
    module, name = create_backbone("ViT-B/16", heads=HEADS)
    assert name.endswith("ViT-B-16.pt") and module.config.width == WIDTH
