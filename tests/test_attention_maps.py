"""EVL's attention maps (models/attention_maps.py): shapes, normalisation, agreement with the model's own
forward, and, on synthetic clips whose shape moves, a trained query's attention following the shape."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from evl.config import CLIP_MEAN, CLIP_STD, DecoderConfig, ModelConfig, VisionConfig
from evl.models.attention_maps import EVLAttention, class_token_attention, evl_attention
from evl.models.evl import EVL
from evl.synth import render_clip, sample_spec, shape_coverage
from factories import randomize_, tiny_config


@pytest.fixture(scope="module")
def model_and_maps():
    torch.manual_seed(0)
    config = tiny_config(num_frames=5)  # 3x3 patches of 8 px, 3 blocks, 2 decoder layers
    model = randomize_(EVL(config)).eval()
    video = torch.randn(2, 5, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    return model, video, evl_attention(model, video)


def test_shapes(model_and_maps):
    model, _, maps = model_and_maps
    b, t, layers, tokens, patches = 2, 5, 2, 1 + 9, 9
    assert maps.query.shape == (b, layers, t, tokens)
    assert maps.class_token.shape == (b, layers, t, tokens)
    assert maps.cross_frame.shape == (b, layers, 2, t - 1, patches, patches)
    assert maps.query_patches().shape == (b, layers, t, 3, 3)
    assert maps.logits.shape == (b, 5)
    assert maps.blocks == tuple(model.blocks) and maps.grid == (3, 3) and maps.prefix_tokens == 1


def test_maps_sum_to_one_over_what_they_attend(model_and_maps):
    _, _, maps = model_and_maps
    ones = torch.ones(2, 2)
    torch.testing.assert_close(maps.query.sum(dim=(-2, -1)), ones)  # over every frame's tokens at once
    torch.testing.assert_close(maps.class_token.sum(dim=-1), torch.ones(2, 2, 5))  # over its own frame
    torch.testing.assert_close(maps.cross_frame.sum(dim=-1), torch.ones(2, 2, 2, 4, 9))  # over key patches
    assert (maps.query >= 0).all() and (maps.cross_frame >= 0).all()


def test_logits_are_the_models(model_and_maps):
    model, video, maps = model_and_maps
    with torch.no_grad():
        torch.testing.assert_close(maps.logits, model(video), atol=1e-5, rtol=1e-5)


def test_query_weights_are_those_the_decoder_attends_with(model_and_maps):
    """Rebuilding each layer's attention output from the recorded weights (per head) gives the layer's."""
    model = model_and_maps[0]
    layer = model.decoder.layers[0]
    memory = torch.randn(2, 7, 32)
    query = torch.randn(2, 1, 32)
    weights = layer.attn.attention_weights(query, memory)  # [B, H, 1, Lm]
    heads, d = layer.attn.heads, 32 // layer.attn.heads
    values = layer.attn.v_proj(memory).view(2, 7, heads, d).transpose(1, 2)  # [B, H, Lm, d]
    rebuilt = layer.attn.out_proj((weights @ values).transpose(1, 2).reshape(2, 1, 32))
    torch.testing.assert_close(rebuilt, layer.attn(query, memory, folded=False), atol=1e-5, rtol=1e-5)


def test_class_token_attention_matches_a_softmax_by_hand():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 6, 2, 4, generator=g), torch.randn(3, 6, 2, 4, generator=g)  # [N, L, H, Dh]
    scores = torch.einsum("nhd,nlhd->nhl", q[:, 0], k) / 4**0.5  # the class token's query, every key
    by_hand = scores.softmax(dim=-1).mean(dim=1)  # [N, L], head-averaged
    torch.testing.assert_close(class_token_attention(q, k), by_hand)


def test_previous_and_next_read_the_right_frame_pairs(model_and_maps):
    _, _, maps = model_and_maps
    previous, following = maps.previous_and_next(layer=1, frame=2, patch=4)
    torch.testing.assert_close(previous, maps.cross_frame[:, 1, 0, 1, 4].view(2, 3, 3))  # frame 2 -> 1
    torch.testing.assert_close(following, maps.cross_frame[:, 1, 1, 2, 4].view(2, 3, 3))  # frame 2 -> 3
    first_previous, _ = maps.previous_and_next(layer=0, frame=0, patch=0)
    _, last_next = maps.previous_and_next(layer=0, frame=4, patch=0)
    assert first_previous is None and last_next is None


def test_an_encoder_without_class_token_has_no_class_token_row():
    config = tiny_config(num_frames=3)
    vision = dataclasses.replace(config.backbone, family="siglip", output_dim=None)
    model = EVL(dataclasses.replace(config, backbone=vision)).eval()
    maps = evl_attention(model, torch.randn(1, 3, 3, 24, 24))
    assert maps.class_token is None and maps.prefix_tokens == 0
    assert maps.query.shape == (1, 2, 3, 9)
    torch.testing.assert_close(maps.query.sum(dim=(-2, -1)), torch.ones(1, 2))


def test_one_frame_has_no_cross_frame_maps():
    model = EVL(tiny_config(num_frames=1, temporal_cross_attention=False)).eval()
    maps = evl_attention(model, torch.randn(1, 1, 3, 24, 24))
    assert maps.cross_frame is None
    assert maps.previous_and_next(0, 0, 0) == (None, None)


# ------------------------------------------------------------------------- does the query follow the shape?

FRAMES, SIZE, PATCH = 8, 48, 8
GRID = SIZE // PATCH


def _motion_clips(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n synthetic motion clips (normalised [n, T, 3, S, S]), their labels, and the shape's coverage of
    each patch [n, T, rows, cols]."""
    rng = np.random.default_rng(seed)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    videos, labels, coverage = [], [], []
    for i in range(n):
        spec = sample_spec("motion", i % 4, FRAMES, rng)
        pixels = torch.from_numpy(render_clip(spec, FRAMES, SIZE, rng)).permute(0, 3, 1, 2).float() / 255
        videos.append((pixels - mean) / std)
        labels.append(i % 4)
        cover = torch.from_numpy(shape_coverage(spec, FRAMES, SIZE)).float()
        coverage.append(cover.view(FRAMES, GRID, PATCH, GRID, PATCH).mean(dim=(2, 4)))
    return torch.stack(videos), torch.tensor(labels), torch.stack(coverage)


def _mass_on(maps: EVLAttention, masks: torch.Tensor) -> torch.Tensor:
    """The query's attention within each frame (normalised over its patches) falling on ``masks``,
    averaged over clips, frames and decoder layers."""
    patches = maps.query_patches()  # [B, M, T, rows, cols]
    per_frame = patches / patches.sum(dim=(-2, -1), keepdim=True)
    return (per_frame * masks[:, None]).sum(dim=(-2, -1)).mean()


def test_a_trained_query_attends_to_the_moving_shape():
    """A tiny EVL trained briefly on the motion task (direction of a moving shape over a textured
    background): in held-out clips, the query's attention in each frame falls on the shape's patches in
    that frame, far above their share of the frame, and above the patches the shape covers at the
    mirrored time (so it follows the shape, not a fixed region). Untrained, the query's attention is flat,
    and both measures are at the shape's share: the test fails without the learned attention."""
    torch.manual_seed(0)
    vision = VisionConfig(width=48, layers=3, heads=3, patch_size=PATCH, image_size=SIZE, mlp_ratio=2.0)
    decoder = DecoderConfig(num_frames=FRAMES, num_layers=2, num_classes=4, mlp_dropout=0.0, head_dropout=0.0)
    model = EVL(ModelConfig(backbone=vision, decoder=decoder, backbone_name="tiny"))
    train_x, train_y, _ = _motion_clips(128, seed=0)
    test_x, _, test_cover = _motion_clips(32, seed=1)
    on_shape = (test_cover > 0.25).float()  # patches the shape covers at least a quarter of
    share = on_shape.mean()

    untrained = evl_attention(model.eval(), test_x)
    assert abs(_mass_on(untrained, on_shape) - share) < 0.05

    with torch.no_grad():
        features = model.extract_features(train_x)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(100):
        idx = torch.randint(0, len(train_y), (16,), generator=g)
        batch = [type(f)(f.out[idx], f.attn[idx]) for f in features]
        loss = torch.nn.functional.cross_entropy(model(batch), train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    trained = evl_attention(model.eval(), test_x)
    own, mirrored = _mass_on(trained, on_shape), _mass_on(trained, on_shape.flip(1))
    # Measured over torch seeds 0-3: 0.26-0.31 on the shape against its share of 0.08, and 0.13-0.16 on
    # the shape at the mirrored time.
    assert own > 2.5 * share
    assert own > 1.5 * mirrored
