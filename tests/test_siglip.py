"""SigLIP and SigLIP 2 image encoders: parity with transformers (SiglipVisionModel, a SiglipModel's vision
tower, Siglip2VisionModel driven at a fixed grid), the presets' shapes against transformers' modules,
one-line errors for checkpoints that do not fit, EVL trained end to end on a SigLIP backbone, and FLOPs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Siglip2Config,
    Siglip2Model,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

from evl.config import DecoderConfig, ModelConfig, vision_preset
from evl.engine.evaluate import evaluate
from evl.engine.predict import Predictor, expand_video_paths
from evl.engine.run import load_run
from evl.engine.train import train
from evl.flops import count_flops
from evl.models.encoders import create_encoder
from evl.models.registry import create_backbone
from evl.models.siglip_vit import SigLIPVisionTransformer
from evl.video.lists import read_list
from evl.weights import WeightFormatError, read_vision
from evl.weights.siglip import siglip_vision_state_dict
from factories import tiny_dataset, tiny_run

# Odd sizes expose swapped axes: width 48, 3 heads of 16, MLP 37, patch 8, a 5x5 grid at 40 px.
TINY = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=3, num_attention_heads=3, patch_size=8)
# The text tower of a whole-model folder, which the image encoder's reader leaves out.
TEXT = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Well-scaled noise in every parameter (zero-initialised biases included), so each one counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)  # 1 / sqrt(fan-in)
    return module.eval()


def _save(module, folder, preprocessor=None):
    module.save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def _max_diffs(ours: SigLIPVisionTransformer, images: torch.Tensor, out) -> tuple[list[float], float]:
    """Largest differences of every block output and of the pooled embedding against transformers'."""
    with torch.no_grad():
        blocks = ours.forward_intermediates(images, range(ours.config.layers))
        pooled = ours(images)
    diffs = [(f.out - h).abs().max().item() for f, h in zip(blocks, out.hidden_states[1:], strict=True)]
    return diffs, (pooled - out.pooler_output).abs().max().item()


def _as_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, 3, S, S] -> [N, (S/p)^2, p*p*3], flattened as Siglip2ImageProcessor flattens them."""
    return torch.stack([torch.from_numpy(convert_image_to_patches(x.numpy(), patch)) for x in images])


def _siglip2_forward(hf: Siglip2VisionModel, images: torch.Tensor, patch: int = 8):
    """Siglip2VisionModel on square images of one size, inputs as its processor makes them (no padding)."""
    n, grid = images.shape[0], images.shape[-1] // patch
    with torch.no_grad():
        return hf(
            pixel_values=_as_patches(images, patch),
            pixel_attention_mask=torch.ones(n, grid * grid, dtype=torch.int32),
            spatial_shapes=torch.tensor([[grid, grid]] * n),
            output_hidden_states=True,
        )


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    hf = _randomize(SiglipVisionModel(SiglipVisionConfig(image_size=40, **TINY)))
    folder = _save(hf, tmp_path_factory.mktemp("siglip"))
    ours, _ = create_backbone(folder)
    return hf, ours.eval(), folder


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory):
    """A NaFlex tower whose position table is 4x4 (num_patches 16)."""
    hf = _randomize(Siglip2VisionModel(Siglip2VisionConfig(num_patches=16, **TINY)), seed=1)
    return hf, _save(hf, tmp_path_factory.mktemp("siglip2"))


# ------------------------------------------------------------------------------------------------ parity


def test_siglip_config_is_read_from_the_folder(siglip):
    _, ours, _ = siglip
    config = ours.config
    assert (config.family, config.prefix_tokens, config.num_tokens) == ("siglip", 0, 25)
    assert (config.width, config.layers, config.heads, config.mlp_width) == (48, 3, 3, 37)
    assert (config.activation, config.layer_norm_eps, config.output_dim) == ("gelu_tanh", 1e-6, None)
    assert (config.mean, config.std, config.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bicubic")


def test_siglip_parity_every_block_and_pooled(siglip):
    hf, ours, _ = siglip
    images = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        out = hf(pixel_values=images, output_hidden_states=True)
    blocks, pooled = _max_diffs(ours, images, out)
    assert max(blocks) <= 1e-5 and pooled <= 1e-5, (blocks, pooled)


def test_q_and_k_are_the_blocks_own_projections(siglip):
    hf, ours, _ = siglip
    images = torch.randn(2, 3, 40, 40)
    seen = {}
    attn = hf.encoder.layers[1].self_attn
    hooks = [
        attn.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("q", o)),
        attn.k_proj.register_forward_hook(lambda m, i, o: seen.setdefault("k", o)),
    ]
    try:
        with torch.no_grad():
            hf(pixel_values=images)
            (features,) = ours.forward_intermediates(images, [1])
    finally:
        for hook in hooks:
            hook.remove()
    assert features.q.shape == (2, 25, 3, 16)
    torch.testing.assert_close(features.q, seen["q"].view(2, 25, 3, 16))
    torch.testing.assert_close(features.k, seen["k"].view(2, 25, 3, 16))


def test_siglip_at_another_resolution(siglip):
    hf, ours, folder = siglip
    images = torch.randn(2, 3, 56, 56)  # a 7x7 grid from the 5x5 table
    with torch.no_grad():
        out = hf(pixel_values=images, interpolate_pos_encoding=True, output_hidden_states=True)
    _, pooled = _max_diffs(ours, images, out)  # resized as it runs
    resized, _ = create_backbone(folder, image_size=56)  # resized once, at load
    assert resized.config.grid_size == 7
    blocks, pooled_at_load = _max_diffs(resized.eval(), images, out)
    assert max(max(blocks), pooled, pooled_at_load) <= 1e-5


def test_sizes_between_whole_patches_leave_the_last_pixels_unread(tmp_path):
    """As SigLIP So400m/14 at 384 px (27 patches of 14): 44 px with patch 8 make a 5x5 grid."""
    hf = _randomize(SiglipVisionModel(SiglipVisionConfig(image_size=44, **TINY)), seed=4)
    ours, _ = create_backbone(_save(hf, tmp_path))
    assert (ours.config.image_size, ours.config.grid_size) == (44, 5)
    images = torch.randn(2, 3, 44, 44)
    with torch.no_grad():
        out = hf(pixel_values=images, output_hidden_states=True)
    blocks, pooled = _max_diffs(ours.eval(), images, out)
    assert max(blocks) <= 1e-5 and pooled <= 1e-5, (blocks, pooled)


def test_siglip_model_folder_gives_its_vision_tower(tmp_path):
    config = SiglipConfig(vision_config=dict(image_size=40, **TINY), text_config=TEXT)
    hf = _randomize(SiglipModel(config), seed=2)
    # The preprocessor's statistics and resizing win over the family's.
    preprocessor = {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4], "resample": 2}
    ours, _ = create_backbone(_save(hf, tmp_path, preprocessor))
    assert (ours.config.mean, ours.config.std) == ((0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    assert ours.config.interpolation == "bilinear"
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out = hf.vision_model(pixel_values=images, output_hidden_states=True)
    blocks, pooled = _max_diffs(ours.eval(), images, out)
    assert max(blocks) <= 1e-5 and pooled <= 1e-5, (blocks, pooled)


def test_siglip_without_pooling_head_pools_by_the_mean(tmp_path):
    hf = _randomize(SiglipVisionModel(SiglipVisionConfig(image_size=40, vision_use_head=False, **TINY)))
    ours, _ = create_backbone(_save(hf, tmp_path))
    assert not ours.config.pool_head and ours.head is None
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out = hf(pixel_values=images, output_hidden_states=True)
        pooled = ours.eval()(images)
    assert out.pooler_output is None  # transformers has no pooled output without the head
    torch.testing.assert_close(pooled, out.last_hidden_state.mean(dim=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("image_size", [None, 40, 24])  # the table's own 4x4 grid, enlarged, shrunk
def test_siglip2_naflex_parity_at_a_fixed_grid(siglip2, image_size):
    hf, folder = siglip2
    ours, _ = create_backbone(folder, image_size=image_size)
    config = ours.config
    assert config.image_size == (image_size or 32) and config.interpolation == "bilinear"
    images = torch.randn(2, 3, config.image_size, config.image_size)
    blocks, pooled = _max_diffs(ours.eval(), images, _siglip2_forward(hf, images))
    assert max(blocks) <= 1e-5 and pooled <= 1e-5, (blocks, pooled)


def test_siglip2_model_folder_gives_its_vision_tower(tmp_path):
    config = Siglip2Config(vision_config=dict(num_patches=16, **TINY), text_config=TEXT)
    hf = _randomize(Siglip2Model(config), seed=3)
    ours, _ = create_backbone(_save(hf, tmp_path), image_size=40)
    images = torch.randn(2, 3, 40, 40)
    blocks, pooled = _max_diffs(ours.eval(), images, _siglip2_forward(hf.vision_model, images))
    assert max(blocks) <= 1e-5 and pooled <= 1e-5, (blocks, pooled)


# (width, MLP, layers, heads, patch, image size) of Google's releases; SigLIP 2's fixed-resolution towers
# have SigLIP's shapes.
RELEASES = {
    "SigLIP-B/16": (768, 3072, 12, 12, 16, 224),
    "SigLIP-L/16@256": (1024, 4096, 24, 16, 16, 256),
    "SigLIP-So400m/14@384": (1152, 4304, 27, 16, 14, 384),
    "SigLIP2-B/16": (768, 3072, 12, 12, 16, 224),
    "SigLIP2-L/16@256": (1024, 4096, 24, 16, 16, 256),
    "SigLIP2-So400m/14@384": (1152, 4304, 27, 16, 14, 384),
}


@pytest.mark.parametrize("preset", RELEASES)
def test_presets_have_the_released_towers_shapes(preset):
    """Every tensor of transformers' tower built to the release's config (on the meta device) has the
    shape of ours under its renamed key; So400m's 384 px make 27 patches of 14 (the last 6 px unread)."""
    width, mlp, layers, heads, patch, size = RELEASES[preset]
    hf_config = SiglipVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=patch,
        image_size=size,
    )
    config = vision_preset(preset)
    with torch.device("meta"):
        theirs = siglip_vision_state_dict(SiglipVisionModel(hf_config).state_dict(), preset)
        ours = create_encoder(config).state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}
    assert (config.mlp_width, config.heads, config.image_size) == (mlp, heads, size)
    assert config.num_patches == (size // patch) ** 2


# ------------------------------------------------------------------------------------------------ errors


def _broken_folder(tmp_path, folder, edit_state=None, edit_config=None):
    """A copy of ``folder`` with its tensors and config.json edited."""
    state = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    if edit_state:
        edit_state(state)
    if edit_config:
        edit_config(config)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    "edit_state,edit_config,message",
    [
        (
            lambda s: s.pop("encoder.layers.1.self_attn.k_proj.weight"),
            None,
            r"transformer\.resblocks\.1\.attn lacks k_proj\.weight",
        ),
        (
            lambda s: s.update({"embeddings.class_embedding": torch.zeros(48)}),
            None,
            "unexpected key 'vision_model.embeddings.class_embedding'",
        ),
        (
            lambda s: [s.pop(k) for k in list(s) if k.startswith("head.")],
            None,
            r"does not fit its SigLIPVisionTransformer \(missing \['head\.",
        ),
        (
            lambda s: s.update({"embeddings.position_embedding.weight": torch.zeros(24, 48)}),
            None,
            "24 position embeddings do not form a square grid",
        ),
        (None, lambda c: c.update(num_attention_heads=5), "width 48 is not divisible by heads 5"),
        (None, lambda c: c.update(hidden_act="relu"), "unsupported activation 'relu'"),
        (None, lambda c: c.update(model_type="siglip_text_model"), "'siglip_text_model' is not a supported"),
    ],
    ids=["lacks-k", "clip-key", "no-head", "not-square", "heads", "activation", "text-tower"],
)
def test_mismatched_checkpoints_are_one_line_errors(siglip, tmp_path, edit_state, edit_config, message):
    _, _, folder = siglip
    broken = _broken_folder(tmp_path, folder, edit_state, edit_config)
    with pytest.raises(WeightFormatError, match=message) as err:
        create_backbone(broken)
    assert "\n" not in str(err.value)


def test_naflex_patch_embedding_must_cover_rgb_patches(siglip2, tmp_path):
    _, folder = siglip2
    broken = _broken_folder(
        tmp_path, folder, lambda s: s.update({"embeddings.patch_embedding.weight": torch.zeros(48, 100)})
    )
    with pytest.raises(WeightFormatError, match="over 100 values is not one of 3 x p x p"):
        read_vision(broken)


# ------------------------------------------------------------------------------------------ EVL and FLOPs


def test_evl_trains_evaluates_and_predicts_on_a_random_siglip(tmp_path):
    dataset = tiny_dataset(tmp_path / "synth", train_per_class=1, val_per_class=1)
    run = tiny_run(
        dataset,
        "backbone.name=random:SigLIP-T/16@112",
        "decoder.num_layers=2",
        "data.rand_augment=null",
        steps=1,
        batch_size=2,
    )
    run_dir = tmp_path / "run"
    assert train(run, run_dir, progress=False).step == 1
    assert json.loads((run_dir / "config.json").read_text())["model"]["backbone"]["family"] == "siglip"
    # The random backbone is saved with its config, which reading it back needs (no HF config there).
    config, _ = read_vision(run_dir / "backbone.safetensors")
    assert config == vision_preset("SigLIP-T/16@112")

    loaded = load_run(run_dir)
    assert isinstance(loaded.model.backbone, SigLIPVisionTransformer)
    entries = read_list(dataset.val_list, num_classes=len(loaded.classes), data_root=dataset.root)
    result = evaluate(loaded.model, entries, loaded.run.data, batch_size=2, progress=False).result
    assert result.to_dict()["num_videos"] == 4
    video = expand_video_paths([dataset.root / "videos" / "val"])[0]
    prediction = Predictor(loaded).predict(video, topk=2)
    assert len(prediction.classes) == 2 and prediction.classes[0] in loaded.classes


def test_flops_of_a_siglip_backbone_are_its_matmuls():
    vision = vision_preset("SigLIP-B/16")
    config = ModelConfig(backbone=vision, decoder=DecoderConfig(num_frames=8, num_classes=400))
    report = count_flops(config)
    # Per frame, in multiply-adds: the patch convolution, then per block q/k/v/out projections, attention
    # over the 196 patch tokens (no class token) and the MLP.
    tokens, width, mlp = vision.num_patches, vision.width, vision.mlp_width
    block = 4 * tokens * width**2 + 2 * tokens**2 * width + 2 * tokens * width * mlp
    per_frame = tokens * width * 3 * vision.patch_size**2 + vision.layers * block
    assert report.backbone_gflops == pytest.approx(8 * per_frame * 1e-9, rel=1e-9)
    assert 0 < report.decoder_gflops < 0.2 * report.backbone_gflops
