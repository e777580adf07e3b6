"""EVL model: parity with the official implementation, temporal modules, gradients, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import evl
from conftest import FIXTURES
from evl.models.evl import (
    EVL,
    DecoderAttention,
    TemporalConv,
    TemporalCrossAttention,
    TemporalPosEmbed,
    temporal_residual,
)
from evl.models.frame_features import FrameFeatures, cross_frame_attention, frame_features
from evl.models.layers import LayerNorm
from evl.models.ops.attention import MEMORY_PIECES, attend_memory
from evl.models.ops.relative import (
    MIN_GROUP_ROWS,
    aggregate_relative,
    aggregate_relative_gather,
    relative_position_index,
    relative_query_groups,
)
from evl.models.registry import load_official_checkpoint
from evl_oracle import evl_logits
from factories import (
    assert_same_outputs_and_grads,
    moving_video,
    random_maps,
    random_official_decoder,
    random_openai_visual,
    randomize_,
    tiny_config,
)

OFFICIAL = FIXTURES / "official_evl_tiny"


def _official_files(tmp_path, visual, decoder, suffix=".pth"):
    backbone = tmp_path / "backbone.safetensors"
    save_file(visual, str(backbone))
    checkpoint = tmp_path / f"checkpoint{suffix}"
    state = {f"module.{k}": v for k, v in decoder.items()}
    if suffix == ".pth":
        torch.save({"model": state, "next_step": 0}, checkpoint)
    else:
        save_file(state, str(checkpoint))
    return checkpoint, backbone


# ------------------------------------------------------------------------------------ official parity


@pytest.mark.parametrize("checkpoint", ["official_checkpoint.pth", "official_decoder.safetensors"])
def test_official_fixture_logits(checkpoint):
    model = load_official_checkpoint(
        OFFICIAL / checkpoint, OFFICIAL / "backbone_openai_visual.safetensors", backbone_heads=4
    )
    video = load_file(str(OFFICIAL / "input.safetensors"))["video"]  # [B, C, T, H, W]
    expected = load_file(str(OFFICIAL / "expected.safetensors"))
    with torch.no_grad():
        features = model.extract_features(video.transpose(1, 2))
        query = model.decoder.query.expand(2, 1, -1)
        for i, layer in enumerate(model.decoder.layers):
            query = layer(query, model.decoder.memory(i, features[i]).flatten(1, 2))
            torch.testing.assert_close(query, expected[f"query_layer{i}"], atol=1e-5, rtol=0)
        logits = model(video.transpose(1, 2))
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=0)


def test_official_fixture_intermediates():
    model = load_official_checkpoint(
        OFFICIAL / "official_checkpoint.pth",
        OFFICIAL / "backbone_openai_visual.safetensors",
        backbone_heads=4,
    )
    video = load_file(str(OFFICIAL / "input.safetensors"))["video"].transpose(1, 2)
    reference = load_file(str(OFFICIAL / "intermediates.safetensors"))
    with torch.no_grad():
        features = model.extract_features(video)
        for i, (block, f) in enumerate(zip(model.blocks, features, strict=True)):
            torch.testing.assert_close(f.out, reference[f"backbone_block{block}_out"], atol=5e-5, rtol=0)
            cross = model.decoder.cross_attention[i](f.attn, f.out.shape[1])
            torch.testing.assert_close(cross, reference[f"cross_attention_layer{i}"], atol=5e-5, rtol=0)
            memory = model.decoder.memory(i, f).flatten(1, 2)
            torch.testing.assert_close(memory, reference[f"decoder_memory_layer{i}"], atol=5e-5, rtol=0)


def test_oracle_reproduces_official_fixture():
    """The test oracle itself must match the official numbers before it judges other shapes."""
    visual = load_file(str(OFFICIAL / "backbone_openai_visual.safetensors"))
    decoder = {
        k[len("module.") :]: v for k, v in load_file(str(OFFICIAL / "official_decoder.safetensors")).items()
    }
    video = load_file(str(OFFICIAL / "input.safetensors"))["video"]
    logits = evl_logits(visual, decoder, video, backbone_heads=4, decoder_heads=4, grid=(4, 4))
    expected = load_file(str(OFFICIAL / "expected.safetensors"))["logits"]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "width,heads,backbone_layers,decoder_layers,frames,patch,size,suffix",
    [
        (48, 3, 3, 2, 3, 8, 40, ".pth"),  # odd T, 5x5 grid
        (32, 2, 4, 4, 6, 8, 24, ".safetensors"),  # decoder on every block, 3x3 grid
        (80, 5, 2, 1, 2, 16, 48, ".pth"),  # one decoder layer, T=2
    ],
)
def test_official_import_other_shapes(
    tmp_path, width, heads, backbone_layers, decoder_layers, frames, patch, size, suffix
):
    grid = size // patch
    visual = random_openai_visual(
        width=width, layers=backbone_layers, patch=patch, image_size=size, mlp=2 * width + 3
    )
    decoder = random_official_decoder(
        width=width, layers=decoder_layers, frames=frames, classes=7, grid=(grid, grid), mlp=3 * width
    )
    checkpoint, backbone = _official_files(tmp_path, visual, decoder, suffix)
    model = load_official_checkpoint(checkpoint, backbone, backbone_heads=heads)
    assert model.config.decoder.num_frames == frames and model.config.decoder.num_layers == decoder_layers
    video = moving_video(batch=2, frames=frames, size=size)
    with torch.no_grad():
        ours = model(video.transpose(1, 2))
    expected = evl_logits(
        visual, decoder, video, backbone_heads=heads, decoder_heads=heads, grid=(grid, grid)
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("disabled", ["conv", "pos", "cross"])
def test_official_import_without_a_temporal_module(tmp_path, disabled):
    visual = random_openai_visual()
    decoder = random_official_decoder(**{disabled: False})
    checkpoint, backbone = _official_files(tmp_path, visual, decoder)
    model = load_official_checkpoint(checkpoint, backbone, backbone_heads=3)
    flags = {
        "conv": model.config.decoder.temporal_conv,
        "pos": model.config.decoder.temporal_pos_embed,
        "cross": model.config.decoder.temporal_cross_attention,
    }
    assert flags.pop(disabled) is False and all(flags.values())
    video = moving_video(batch=1, frames=4, size=40)
    with torch.no_grad():
        ours = model(video.transpose(1, 2))
    torch.testing.assert_close(ours, evl_logits(visual, decoder, video, 3, 3, (5, 5)), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ modules


def test_relative_position_index_offsets():
    index = relative_position_index(2, 3)
    # query (row 1, col 2) = patch 5, key (row 0, col 0) = patch 0: offset (+1, +2) -> (1+1)*5 + (2+2) = 14
    assert index[5, 0] == 14
    assert index[0, 5] == (0 - 1 + 1) * 5 + (0 - 2 + 2)
    assert index.max() == 3 * 5 - 1 and index.min() == 0
    assert all(len(set(row.tolist())) == 6 for row in index)  # one bin per key within a query row


@pytest.mark.parametrize(
    "grid,groups,lead",
    [
        ((3, 5), (1, 1), (4,)),
        ((3, 5), (1, 1), (2, 3)),  # one query per group: bins are views of the reversed maps
        ((3, 5), (1, 5), (2, 3)),  # whole rows: the table itself, no column copies
        ((3, 5), (3, 1), (3,)),
        ((3, 5), (3, 5), (2,)),  # one group: every offset bin
        ((4, 6), (2, 3), (3,)),
        ((3, 5), None, (5,)),
        ((14, 14), None, (14,)),  # ViT-B/16 at batch 2: 1x2 groups
    ],
)
def test_grouped_aggregation_equals_gather_with_gradients(grid, groups, lead):
    g = torch.Generator().manual_seed(0)
    h, w = grid
    attn = random_maps(*lead, patches=h * w, generator=g).requires_grad_()
    weight = torch.randn((2 * h - 1) * (2 * w - 1), 7, generator=g, requires_grad=True)
    fast = aggregate_relative(attn, weight, grid, groups)
    slow = aggregate_relative_gather(attn, weight, relative_position_index(h, w))
    assert_same_outputs_and_grads(fast, slow, (attn, weight), ["attn", "weight"])


def test_query_groups_are_the_narrowest_that_fill_a_matmul():
    assert relative_query_groups(14, 14, 14) == (1, 2)  # ViT-B/16, batch 2: 28 rows
    assert relative_query_groups(14, 14, 56) == (1, 1)
    assert relative_query_groups(3, 5, 1) == (1, 5)  # prime width: whole rows
    for h, w, n in [(14, 14, 7), (16, 16, 3), (4, 6, 5)]:
        rows, cols = relative_query_groups(h, w, n)
        assert rows == 1 and w % cols == 0 and (n * cols >= MIN_GROUP_ROWS or cols == w)


# 2 clips x 3 frame pairs: whole-row query groups; 4 x 6 = 24 maps: one query per group
@pytest.mark.parametrize("clips,frames", [(2, 4), (4, 7)])
def test_cross_frame_terms_added_in_place_equal_the_module_output_with_gradients(clips, frames):
    g = torch.Generator().manual_seed(0)
    module = TemporalCrossAttention(6, 3, 5)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    y = torch.randn(clips, frames, 16, 6, generator=g, requires_grad=True)
    attn = random_maps(clips, 2, frames - 1, patches=15, generator=g).requires_grad_()
    fast = module.add_to(y * 1, attn)  # y * 1: a tensor of the caller's own, as the decoder passes
    slow = y + module(attn, frames)
    assert torch.count_nonzero(slow[:, :, 0] - y[:, :, 0]) == 0  # CLS receives nothing
    inputs = (y, attn, module.w_prev, module.w_next)
    assert_same_outputs_and_grads(fast, slow, inputs, ["y", "attn", "w_prev", "w_next"])


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("conv,pos", [(True, True), (True, False), (False, True), (False, False)])
def test_temporal_residual_equals_conv_plus_embedding_with_gradients(conv, pos, kernel):
    g = torch.Generator().manual_seed(0)
    conv_module = TemporalConv(6, kernel) if conv else None
    pos_module = TemporalPosEmbed(5, 6) if pos else None
    params = [p for m in (conv_module, pos_module) if m is not None for p in m.parameters()]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 5, 3, 6, generator=g, requires_grad=True)
    fast = temporal_residual(x, conv_module, pos_module)
    slow = x * 1
    if conv_module is not None:
        slow = slow + conv_module(x)
    if pos_module is not None:
        slow = slow + pos_module()
    assert fast.data_ptr() != x.data_ptr()  # always a new tensor (the cross-frame terms go in place)
    assert_same_outputs_and_grads(fast, slow, (x, *params), ["x", *(str(i) for i in range(len(params)))])


@pytest.mark.parametrize(
    "ablation",
    [{}, {"temporal_conv": False}, {"temporal_pos_embed": False}, {"temporal_cross_attention": False}],
)
def test_decoder_memory_equals_the_sum_of_the_temporal_modules_with_gradients(ablation):
    torch.manual_seed(0)
    decoder = randomize_(EVL(tiny_config(**ablation))).decoder
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 10, 32, generator=g, requires_grad=True)
    attn = random_maps(2, 2, 3, patches=9, generator=g).requires_grad_()
    features = FrameFeatures(x, attn)
    params = list(decoder.parameters())
    fast, slow = decoder.memory(1, features), decoder.memory_reference(1, features)
    names = ["x", "attn", *(n for n, _ in decoder.named_parameters())]
    assert_same_outputs_and_grads(fast, slow, (x, attn, *params), names)


def test_attention_over_normalised_memory_equals_layer_norm_then_attention_with_gradients():
    g = torch.Generator().manual_seed(0)
    norm = LayerNorm(40)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(40, generator=g) * 0.3)
        norm.bias.copy_(torch.randn(40, generator=g) * 0.3)
    keys = torch.randn(3, 5, 40, generator=g, requires_grad=True)
    bias = torch.randn(3, 5, 1, generator=g, requires_grad=True)
    # off-centre, uneven tokens (as a residual stream), more tokens than pieces, batch > 1
    memory = (torch.randn(3, 4 * MEMORY_PIECES + 3, 40, generator=g) * 2 + 1).requires_grad_()
    fast = attend_memory(keys, bias, memory, norm)
    normed = norm(memory)
    slow = (keys @ normed.mT + bias).softmax(-1) @ normed
    inputs = (keys, bias, memory, norm.weight, norm.bias)
    assert_same_outputs_and_grads(fast, slow, inputs, ["keys", "bias", "memory", "norm.weight", "norm.bias"])
    plain = attend_memory(keys, bias, memory)
    assert_same_outputs_and_grads(
        plain, (keys @ memory.mT + bias).softmax(-1) @ memory, (keys, bias, memory), ["k", "b", "m"]
    )


@pytest.mark.parametrize("num_queries,with_norm", [(1, False), (3, False), (1, True)])
def test_folded_decoder_attention_equals_projected_attention_with_gradient(num_queries, with_norm):
    g = torch.Generator().manual_seed(0)
    attention = DecoderAttention(48, 3)
    norm = LayerNorm(48) if with_norm else None
    params = [*attention.parameters(), *(norm.parameters() if norm else [])]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (p.ndim == 1 and norm is not None))
    x = torch.randn(2, num_queries, 48, generator=g, requires_grad=True)
    memory = torch.randn(2, 37, 48, generator=g, requires_grad=True)
    folded = attention(x, memory, folded=True, memory_norm=norm)
    projected = attention(x, memory, folded=False, memory_norm=norm)
    torch.testing.assert_close(folded, projected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(folded.shape, generator=g)
    names = ["x", "memory", *(n for n, _ in attention.named_parameters())]
    names += ["norm.weight", "norm.bias"] if norm else []
    inputs = (x, memory, *params)
    grads_folded = torch.autograd.grad(folded, inputs, upstream)
    grads_projected = torch.autograd.grad(projected, inputs, upstream)
    for name, a, b in zip(names, grads_folded, grads_projected, strict=True):
        scale = b.abs().max().item()
        if name == "k_proj.bias":  # zero in exact arithmetic: both are rounding noise
            assert a.abs().max() < 1e-4 and scale < 1e-4
            continue
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_decoder_attention_folds_only_when_cheaper():
    attention = DecoderAttention(48, 3)
    calls = []
    attention.forward_folded = lambda x, m, norm=None: calls.append(x.shape[1]) or x
    attention(torch.randn(1, 1, 48), torch.randn(1, 5, 48))  # 1 query x 3 heads < 48 channels
    attention(torch.randn(1, 20, 48), torch.randn(1, 5, 48))  # 60 > 48: project
    assert calls == [1]


def test_cross_frame_attention_maps_are_head_averaged_softmax_of_adjacent_frames():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 3, 5, 2, 4, generator=g).unbind(0)  # [B=2, T=3, L=5, H=2, Dh=4]
    maps = cross_frame_attention(q, k, num_patches=4)
    assert maps.shape == (2, 2, 2, 4, 4)
    # batch 1, frame 2 attending to frame 1, head-averaged, patches only
    expected = torch.stack([(q[1, 2, 1:, h] @ k[1, 1, 1:, h].T / 2).softmax(-1) for h in range(2)]).mean(0)
    torch.testing.assert_close(maps[1, 0, 1], expected)
    expected_next = torch.stack([(q[0, 0, 1:, h] @ k[0, 1, 1:, h].T / 2).softmax(-1) for h in range(2)]).mean(
        0
    )
    torch.testing.assert_close(maps[0, 1, 0], expected_next)
    assert cross_frame_attention(q[:, :1], k[:, :1], num_patches=4) is None
    torch.testing.assert_close(maps, all_pairs_cross_frame_attention(q, k))
    out = torch.full_like(maps, float("nan"))
    assert cross_frame_attention(q, k, num_patches=4, out=out) is out
    torch.testing.assert_close(out, maps)


@pytest.mark.parametrize("prefix", [0, 3])
def test_cross_frame_attention_reads_the_last_tokens_as_patches(prefix):
    # SigLIP has no class token (0 before the patches), DINOv2 with 2 registers has 3.
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 2, 3, prefix + 4, 2, 4, generator=g).unbind(0)
    maps = cross_frame_attention(q, k, num_patches=4)
    torch.testing.assert_close(maps, all_pairs_cross_frame_attention(q, k, prefix=prefix))


def test_temporal_conv_is_pytorch_conv_over_time():
    conv = TemporalConv(6)
    x = torch.randn(2, 5, 3, 6)
    ref = torch.nn.Conv1d(6, 6, 3, padding=1, groups=6)
    ref.load_state_dict({"weight": conv.weight, "bias": conv.bias})
    expected = ref(x.permute(0, 2, 3, 1).reshape(6, 6, 5)).reshape(2, 3, 6, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(conv(x), expected)
    assert conv.weight.abs().sum() > 0  # default Conv1d initialisation, not zero


@pytest.mark.parametrize("module", ["temporal_conv", "temporal_pos_embed", "temporal_cross_attention"])
def test_each_temporal_module_changes_the_output(module):
    torch.manual_seed(0)
    full = randomize_(EVL(tiny_config()).eval())
    ablated = EVL(tiny_config(**{module: False})).eval()
    ablated.load_state_dict(full.state_dict(), strict=False)
    video = torch.randn(2, 4, 3, 24, 24)
    with torch.no_grad():
        difference = (full(video) - ablated(video)).abs().max()
    assert difference > 1e-3


def test_temporal_order_matters_only_with_temporal_modules():
    torch.manual_seed(0)
    video = torch.randn(1, 4, 3, 24, 24)
    reversed_video = video.flip(1)
    with torch.no_grad():
        full = randomize_(EVL(tiny_config()).eval())
        assert (full(video) - full(reversed_video)).abs().max() > 1e-3
        none = EVL(
            tiny_config(temporal_conv=False, temporal_pos_embed=False, temporal_cross_attention=False)
        ).eval()
        torch.testing.assert_close(none(video), none(reversed_video), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_trainable_parameter_and_never_the_backbone():
    model = randomize_(EVL(tiny_config()).train())
    video = torch.randn(2, 4, 3, 24, 24)
    loss = torch.nn.functional.cross_entropy(model(video), torch.tensor([1, 3]))
    loss.backward()
    trainable = dict(model.trainable_named_parameters())
    assert trainable and not any(n.startswith("backbone.") for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None, name
        # The attention's key bias shifts every score of a query equally: its gradient is zero in exact
        # arithmetic (only rounding), in the reference as in ours.
        if not name.endswith("attn.k_proj.bias"):
            assert p.grad.abs().sum() > 0, name
    for name, p in model.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None, name


def test_backbone_stays_in_eval_and_out_of_the_trainable_state():
    model = EVL(tiny_config()).train()
    assert model.decoder.training and not model.backbone.training
    state = model.trainable_state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    assert set(state) == {n for n, _ in model.trainable_named_parameters()}


def test_fine_tuned_backbone_gets_gradients():
    config = dataclasses.replace(tiny_config(), freeze_backbone=False)
    model = EVL(config).train()
    loss = model(torch.randn(1, 4, 3, 24, 24)).sum()
    loss.backward()
    assert model.backbone.conv1.weight.grad is not None
    assert any(k.startswith("backbone.") for k in model.trainable_state_dict())


def all_pairs_cross_frame_attention(q, k, prefix=1):
    """All frame pairs at once, as one batched product: the straightforward form of the maps."""
    q = q[:, :, prefix:].transpose(2, 3) * q.shape[-1] ** -0.5  # [B, T, H, P, Dh]
    k = k[:, :, prefix:].transpose(2, 3)
    to_prev = (q[:, 1:] @ k[:, :-1].mT).softmax(-1).mean(2)
    to_next = (q[:, :-1] @ k[:, 1:].mT).softmax(-1).mean(2)
    return torch.stack([to_prev, to_next], dim=1)


@pytest.mark.parametrize("chunk", [None, 2])
def test_chunked_feature_extraction_equals_one_autograd_pass(chunk):
    torch.manual_seed(0)
    model = EVL(tiny_config()).eval()
    model.backbone_chunk = chunk  # None: one clip at a time on CPU; 2: chunks of 2, 1
    video = torch.randn(3, 4, 3, 24, 24)
    with torch.no_grad():
        fast = model.extract_features(video)
    with torch.enable_grad():  # the backbone's plain path (no in-place activations, no MLP pieces)
        blocks = model.backbone.forward_intermediates(video.flatten(0, 1), model.blocks)
    for f, block in zip(fast, blocks, strict=True):
        out, q, k = (x.detach().unflatten(0, (3, 4)) for x in block)
        torch.testing.assert_close(f.out, out, atol=1e-5, rtol=0)
        torch.testing.assert_close(f.attn, all_pairs_cross_frame_attention(q, k), atol=1e-6, rtol=0)


def test_open_backbone_features_equal_frozen_ones_and_carry_gradients():
    torch.manual_seed(0)
    frozen = EVL(tiny_config()).eval()
    open_ = EVL(dataclasses.replace(tiny_config(), freeze_backbone=False)).eval()
    open_.load_state_dict(frozen.state_dict())
    video = torch.randn(2, 4, 3, 24, 24)
    with torch.no_grad():
        expected = frozen.extract_features(video)
    got = open_.extract_features(video)
    assert got[0].attn.requires_grad
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.out.detach(), b.out, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.attn.detach(), b.attn, atol=1e-6, rtol=0)


def test_frame_features_of_one_frame_have_no_maps():
    model = EVL(tiny_config(num_frames=1, temporal_pos_embed=False)).eval()
    with torch.no_grad():
        features = model.extract_features(torch.randn(2, 1, 3, 24, 24))
        assert all(f.attn is None for f in features)
        block = model.backbone.forward_intermediates(torch.randn(2, 3, 24, 24), [1])[0]
    one_frame = block._replace(**{n: x[:, None] for n, x in block._asdict().items()})
    assert frame_features(one_frame, model.config.backbone.num_patches).attn is None


def test_no_in_place_change_of_backbone_features():
    model = randomize_(EVL(tiny_config()).eval())
    with torch.no_grad():
        features = model.extract_features(torch.randn(1, 4, 3, 24, 24))
        before = [f.out.clone() for f in features]
        model.forward_head(features)
    for a, f in zip(before, features, strict=True):
        assert torch.equal(a, f.out)


@pytest.mark.parametrize(
    "shape,message",
    [
        ((2, 3, 24, 24), "expects videos"),
        ((1, 4, 1, 24, 24), "expects videos"),
        ((1, 3, 3, 24, 24), "built for 4 frames"),
        ((1, 4, 3, 32, 32), "takes 24x24 frames"),
    ],
)
def test_wrong_input_shape_is_a_clear_error(shape, message):
    model = EVL(tiny_config()).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_backbone_rejects_wrong_channels_and_sizes():
    model = EVL(tiny_config(temporal_cross_attention=False)).eval()
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model.backbone(torch.randn(1, 3, 20, 24))
    with pytest.raises(ValueError, match=r"images \[N, 3, H, W\]"):
        model.backbone(torch.randn(1, 4, 24, 24))


def test_checkpoint_with_other_width_is_a_clear_error(tmp_path):
    visual = random_openai_visual(width=48)
    decoder = random_official_decoder(width=64, mlp=128)
    checkpoint, backbone = _official_files(tmp_path, visual, decoder)
    with pytest.raises(ValueError, match="decoder width 64 does not match the backbone's width 48"):
        load_official_checkpoint(checkpoint, backbone, backbone_heads=3)


def test_checkpoint_with_other_grid_is_a_clear_error(tmp_path):
    visual = random_openai_visual(width=48, image_size=40, patch=8)  # 5x5 grid
    decoder = random_official_decoder(width=48, grid=(4, 4))
    checkpoint, backbone = _official_files(tmp_path, visual, decoder)
    with pytest.raises(ValueError, match="cross-attention tables have 49 offsets"):
        load_official_checkpoint(checkpoint, backbone, backbone_heads=3)


def test_state_with_other_classes_is_a_clear_error():
    model = EVL(tiny_config(num_classes=5))
    other = EVL(tiny_config(num_classes=9)).trainable_state_dict()
    with pytest.raises(
        ValueError, match=r"head\.fc\.weight has shape \(9, 32\) but the model expects \(5, 32\)"
    ):
        model.load_trainable_state_dict(other)
    with pytest.raises(ValueError, match="missing"):
        model.load_trainable_state_dict(
            {k: v for k, v in model.trainable_state_dict().items() if "query" not in k}
        )


def test_create_model_from_preset_and_random_backbone():
    model = evl.create_model("evl-t16-112", num_classes=3, backbone="random:ViT-T/16@112", num_frames=2)
    assert model.config.backbone.width == 192 and model.config.decoder.num_classes == 3
    with torch.no_grad():
        assert model(torch.randn(1, 2, 3, 112, 112)).shape == (1, 3)
