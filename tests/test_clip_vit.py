"""CLIP image encoder: parity with transformers' CLIPVisionModel, intermediates, position interpolation."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from evl.config import VisionConfig
from evl.models.clip_vit import CLIPVisionTransformer
from evl.weights import clip_visual_state_dict, infer_vision_config
from factories import HF_TINY


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise if name.endswith("bias") else noise * p.shape[0] ** -0.5)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)


@pytest.fixture(scope="module")
def hf_and_ours():
    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(**HF_TINY)).eval()
    _randomize(hf)
    state = clip_visual_state_dict(hf.state_dict(), "hf")
    config = infer_vision_config(state, heads=3)
    ours = CLIPVisionTransformer(config).eval()
    ours.load_state_dict(state, strict=True)
    return hf, ours


def test_parity_with_transformers_every_block_and_embedding(hf_and_ours):
    hf, ours = hf_and_ours
    images = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        out = hf(pixel_values=images, output_hidden_states=True)
        blocks = ours.forward_intermediates(images, blocks=[0, 1, 2])
        embedding = ours(images)
    for i, features in enumerate(blocks):
        diff = (features.out - out.hidden_states[i + 1]).abs().max().item()
        assert diff <= 1e-5, f"block {i}: {diff}"
    assert (embedding - out.image_embeds).abs().max().item() <= 1e-5


def test_parity_at_another_resolution_with_interpolated_positions(hf_and_ours):
    hf, ours = hf_and_ours
    images = torch.randn(2, 3, 56, 72)  # 7x9 grid from a 5x5 table
    with torch.no_grad():
        out = hf(pixel_values=images, interpolate_pos_encoding=True)
        embedding = ours(images)
    assert (embedding - out.image_embeds).abs().max().item() <= 1e-5


def test_intermediates_return_requested_blocks_with_their_q_and_k(hf_and_ours):
    _, ours = hf_and_ours
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        feats = ours.forward_intermediates(images, blocks=[2, 0])
        inputs = ours.embed(images)
        block0 = ours.transformer.resblocks[0]
        qkv = torch.nn.functional.linear(
            block0.ln_1(inputs), block0.attn.in_proj_weight, block0.attn.in_proj_bias
        )
    q, k, _ = qkv.split(48, dim=-1)
    assert feats[1].q.shape == (2, 26, 3, 16)
    torch.testing.assert_close(feats[1].q, q.view(2, 26, 3, 16))
    torch.testing.assert_close(feats[1].k, k.view(2, 26, 3, 16))
    with torch.no_grad():
        torch.testing.assert_close(feats[0].out, ours.forward_features(images))


def test_intermediates_run_no_block_past_the_deepest_requested(hf_and_ours):
    _, ours = hf_and_ours
    calls = []
    hooks = [
        b.register_forward_hook(lambda m, i, o, n=n: calls.append(n))
        for n, b in enumerate(ours.transformer.resblocks)
    ]
    try:
        with torch.no_grad():
            ours.forward_intermediates(torch.randn(1, 3, 40, 40), blocks=[1])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1]


def test_intermediates_validate_block_indices(hf_and_ours):
    _, ours = hf_and_ours
    with pytest.raises(ValueError, match="outside the encoder's 3 blocks"):
        ours.forward_intermediates(torch.randn(1, 3, 40, 40), blocks=[3])


def test_half_precision_backbone_matches_float32_loosely():
    config = VisionConfig(width=32, layers=2, heads=2, patch_size=8, image_size=16, output_dim=8)
    model = CLIPVisionTransformer(config).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.1)


def test_blocks_without_autograd_equal_blocks_with_autograd(hf_and_ours, monkeypatch):
    """Without autograd the blocks reuse buffers (in-place activation and residuals) and run the MLP in
    pieces of tokens; the numbers must be those of the plain path, and the input must stay untouched."""
    import evl.models.clip_vit as clip_vit

    _, ours = hf_and_ours
    monkeypatch.setattr(clip_vit, "MLP_TOKENS_PER_PIECE", 7)  # 3 x 26 tokens -> 12 uneven pieces
    tokens = torch.randn(3, 26, 48)
    before = tokens.clone()
    for block in ours.transformer.resblocks:
        with torch.enable_grad():
            plain, (q, k) = block(tokens, return_qk=True)
        with torch.no_grad():
            fast, (fast_q, fast_k) = block(tokens, return_qk=True)
        assert torch.equal(tokens, before)
        torch.testing.assert_close(fast, plain.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(fast_q, q.detach())
        torch.testing.assert_close(fast_k, k.detach())


def test_iter_intermediates_yields_requested_blocks_shallow_to_deep(hf_and_ours):
    _, ours = hf_and_ours
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        steps = list(ours.iter_intermediates(images, blocks=[2, 0]))
        expected = ours.forward_intermediates(images, blocks=[0, 2])
    assert [index for index, _ in steps] == [0, 2]
    for (_, got), want in zip(steps, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
