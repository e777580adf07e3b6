"""DINOv2 image encoder, with and without registers: parity with transformers' Dinov2Model and
Dinov2WithRegistersModel read from their saved folders, q/k, position resizing, presets and FLOPs, and EVL
trained, evaluated and used for prediction on a DINOv2 backbone through the engine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from evl.config import IMAGENET_MEAN, DecoderConfig, ModelConfig, vision_preset
from evl.engine.evaluate import evaluate
from evl.engine.predict import Predictor, expand_video_paths
from evl.engine.run import load_run
from evl.engine.train import train
from evl.flops import count_flops
from evl.models.dinov2_vit import DINOv2VisionTransformer
from evl.models.encoders import create_encoder
from evl.models.evl import EVL
from evl.models.registry import create_backbone
from evl.video.lists import read_list
from evl.weights import WeightFormatError, read_vision
from factories import tiny_dataset, tiny_run

# Odd sizes, which expose swapped axes: width 48, 3 heads of 16, MLP 144 (transformers takes an integer
# mlp_ratio), 3 blocks, a 5x5 grid of 8 px patches; 2 registers in the register model.
HF_TINY_DINOV2 = dict(
    hidden_size=48, num_hidden_layers=3, num_attention_heads=3, mlp_ratio=3, image_size=40, patch_size=8
)
VARIANTS = {
    "dinov2": (Dinov2Config, Dinov2Model, {}),
    "dinov2_with_registers": (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        {"num_register_tokens": 2},
    ),
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every tensor drawn at a scale where each block and both LayerScales visibly change the tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "lambda1")):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif name.endswith(("cls_token", "mask_token", "register_tokens", "position_embeddings")):
                p.copy_(0.5 * noise)
            else:  # matmul and convolution weights: outputs of unit variance
                p.copy_(noise * p[0].numel() ** -0.5)


def _save_hf(folder, variant: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = VARIANTS[variant]
    hf = model_cls(config_cls(**{**HF_TINY_DINOV2, **extra, **overrides})).eval()
    _randomize(hf, seed)
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_and_ours(request, tmp_path_factory):
    """A random transformers model saved with ``save_pretrained`` and ours read from that folder."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = _save_hf(folder, request.param)
    ours, _ = create_backbone(folder)
    return hf, ours.eval(), folder


def test_config_read_from_the_folder(hf_and_ours):
    hf, ours, _ = hf_and_ours
    config = ours.config
    registers = getattr(hf.config, "num_register_tokens", 0)
    assert isinstance(ours, DINOv2VisionTransformer)
    assert (config.family, config.width, config.layers, config.heads) == ("dinov2", 48, 3, 3)
    assert (config.patch_size, config.image_size, config.mlp_width) == (8, 40, 144)
    assert (config.register_tokens, config.prefix_tokens) == (registers, 1 + registers)
    assert config.num_tokens == 26 + registers
    assert (config.activation, config.layer_norm_eps, config.output_dim) == ("gelu", 1e-6, None)
    assert config.mean == IMAGENET_MEAN


def test_parity_with_transformers_every_block_and_embedding(hf_and_ours):
    hf, ours, _ = hf_and_ours
    images = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        out = hf(pixel_values=images, output_hidden_states=True)
        blocks = ours.forward_intermediates(images, blocks=[0, 1, 2])
        embedding = ours(images)
    for i, features in enumerate(blocks):
        reference = out.hidden_states[i + 1]
        assert reference.abs().max() > 1  # a block that did not collapse its tokens
        diff = (features.out - reference).abs().max().item()
        assert diff <= 1e-5, f"block {i}: {diff}"
    assert (embedding - out.pooler_output).abs().max().item() <= 1e-5


def test_q_and_k_are_the_attention_projections_of_the_block(hf_and_ours):
    hf, ours, _ = hf_and_ours
    attention = hf.encoder.layer[1].attention
    seen = {}
    hooks = [
        getattr(attention, f"{n}_proj").register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
        for n in ("q", "k")
    ]
    images = torch.randn(2, 3, 40, 40)
    try:
        with torch.no_grad():
            hf(pixel_values=images)
            (features,) = ours.forward_intermediates(images, blocks=[1])
    finally:
        for hook in hooks:
            hook.remove()
    tokens = ours.config.num_tokens
    assert features.q.shape == features.k.shape == (2, tokens, 3, 16)
    torch.testing.assert_close(features.q, seen["q"].view(2, tokens, 3, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(features.k, seen["k"].view(2, tokens, 3, 16), atol=1e-5, rtol=0)


def test_positions_resized_at_run_time_and_at_reading_match_transformers(hf_and_ours):
    """transformers resizes the 5x5 table on every call; ours at run time for another input size and, given
    ``image_size``, once when reading (what EVL uses: its frames come at the backbone's size). Shrinking
    tells the register models' antialiased resizing from the plain one."""
    hf, ours, folder = hf_and_ours
    with torch.no_grad():
        for height, width in ((56, 72), (24, 32)):  # 7x9 and 3x4 patches
            images = torch.randn(2, 3, height, width)
            assert (ours(images) - hf(pixel_values=images).pooler_output).abs().max().item() <= 1e-5
        for size in (64, 24):
            resized, _ = create_backbone(folder, image_size=size)
            assert (resized.config.image_size, resized.pos_embed.shape[0]) == (size, 1 + (size // 8) ** 2)
            images = torch.randn(2, 3, size, size)
            expected = hf(pixel_values=images).pooler_output
            assert (resized.eval()(images) - expected).abs().max().item() <= 1e-5


def test_bare_state_dicts_and_classification_folders_read_the_same_encoder(hf_and_ours, tmp_path):
    """A live model's state dict (transformers 5 names: ``attention.q_proj``) and a
    Dinov2ForImageClassification folder (``dinov2.`` prefix, a classifier to leave out) give the tensors the
    saved folder gave (hub names: ``attention.attention.query``)."""
    hf, ours, _ = hf_and_ours
    expected = ours.state_dict()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    # No config.json: the head count is DINOv2's 64-wide default unless given.
    bare, _ = create_backbone(tmp_path / "bare.safetensors", heads=3)
    assert bare.config == ours.config
    assert all(torch.equal(v, expected[k]) for k, v in bare.state_dict().items())

    if "register" not in hf.config.model_type:
        classifier = Dinov2ForImageClassification(Dinov2Config(**HF_TINY_DINOV2, num_labels=3))
        classifier.dinov2.load_state_dict(hf.state_dict())
        classifier.save_pretrained(tmp_path / "classifier")
        loaded, _ = create_backbone(tmp_path / "classifier")
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(use_swiglu_ffn=True), "SwiGLU MLP"),
        (dict(qkv_bias=False), "without q/k/v biases"),
        (dict(hidden_act="relu"), "hidden_act 'relu' is not supported"),
    ],
)
def test_unsupported_configs_are_one_line_errors(tmp_path, overrides, message):
    hf = _save_hf(tmp_path, "dinov2", **overrides)
    with pytest.raises(WeightFormatError, match=message) as caught:
        read_vision(tmp_path)
    assert "\n" not in str(caught.value) and str(tmp_path) in str(caught.value)
    if "use_swiglu_ffn" in overrides:  # without its config, the SwiGLU tensors tell
        bare = tmp_path / "bare.safetensors"
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(bare))
        with pytest.raises(WeightFormatError, match=message):
            read_vision(bare)


def test_presets_and_random_backbones():
    base, reg = vision_preset("DINOv2-B/14"), vision_preset("DINOv2-B/14-reg")
    assert (base.family, base.width, base.heads, base.grid_size, base.output_dim) == (
        "dinov2",
        768,
        12,
        16,
        None,
    )
    assert (base.layer_norm_eps, base.activation, base.mean) == (1e-6, "gelu", IMAGENET_MEAN)
    assert (base.prefix_tokens, reg.prefix_tokens, reg.num_tokens) == (1, 5, 261)
    model, name = create_backbone("random:DINOv2-T/14@112")
    assert name == "DINOv2-T/14@112" and isinstance(model, DINOv2VisionTransformer)
    with torch.no_grad():
        (features,) = model.eval().forward_intermediates(torch.randn(1, 3, 112, 112), blocks=[5])
    assert features.out.shape == (1, 65, 192) and features.q.shape == (1, 65, 3, 64)
    assert model(torch.randn(1, 3, 112, 112)).shape == (1, 192)


def test_flops_of_a_dinov2_model_count_every_token():
    """Backbone multiply-adds by hand: patch convolution, then per block q/k/v/out and MLP matmuls and the
    two attention products, over CLS, registers and 256 patches for each of 8 frames."""
    decoder = DecoderConfig(num_frames=8, num_layers=4, num_classes=400)
    for name, tokens in (("DINOv2-B/14", 257), ("DINOv2-B/14-reg", 261)):
        vision = vision_preset(name)
        report = count_flops(ModelConfig(backbone=vision, decoder=decoder, backbone_name=name))
        c, mlp = vision.width, vision.mlp_width
        block = tokens * (4 * c * c + 2 * c * mlp) + 2 * tokens * tokens * c
        per_frame = 256 * c * 3 * 14 * 14 + vision.layers * block
        assert report.backbone_gflops == pytest.approx(8 * per_frame * 1e-9, rel=1e-9)
        assert report.decoder_gflops > 0


def test_evl_on_a_register_backbone_reads_the_patches_after_the_registers(hf_and_ours):
    """CLS and registers lead every frame; the decoder's cross-frame attention reads the last 25 tokens."""
    _, ours, _ = hf_and_ours
    decoder = DecoderConfig(num_frames=2, num_layers=2, num_classes=3, mlp_dropout=0.0, head_dropout=0.0)
    model = EVL(ModelConfig(backbone=ours.config, decoder=decoder, backbone_name="tiny"), ours)
    logits = model(torch.randn(2, 2, 3, 40, 40))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert model.decoder.cross_attention[0].w_prev.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())


def test_evl_trains_evaluates_and_predicts_on_a_random_dinov2_backbone(tmp_path):
    dataset = tiny_dataset(tmp_path / "data", train_per_class=1, val_per_class=1)
    run = tiny_run(
        dataset,
        "backbone.name=random:DINOv2-T/14@112",
        "decoder.num_layers=2",
        "data.rand_augment=null",
        "train.eval_every=100",
        steps=2,
        batch_size=2,
    )
    run_dir = tmp_path / "run"
    assert train(run, run_dir, progress=False).step == 2

    # The random backbone was saved into the run with its config, and comes back as the same encoder.
    saved_config, _ = read_vision(run_dir / "backbone.safetensors")
    assert saved_config == vision_preset("DINOv2-T/14@112")
    loaded = load_run(run_dir)
    assert loaded.model.vision_config == saved_config
    assert json.loads((run_dir / "config.json").read_text())["model"]["backbone"]["family"] == "dinov2"

    data = loaded.run.data
    entries = read_list(data.val_list, num_classes=len(loaded.classes), data_root=data.data_root)
    result = evaluate(loaded.model, entries, data, batch_size=2, progress=False).result.to_dict()
    assert result["num_videos"] == 4

    video = expand_video_paths([dataset.root / "videos" / "val"])[0]
    prediction = Predictor(loaded).predict(video, topk=2)
    assert len(prediction.classes) == 2 and set(prediction.classes) <= set(loaded.classes)
    assert 0 < sum(prediction.probabilities) <= 1 + 1e-6


def test_a_module_of_another_family_is_refused():
    with pytest.raises(ValueError, match="needs a dinov2 config"):
        DINOv2VisionTransformer(vision_preset("ViT-T/16@112"))
    assert isinstance(create_encoder(vision_preset("DINOv2-T/14@112")), DINOv2VisionTransformer)
