"""Spatial transforms: crop parameters, train pipeline consistency and flips, eval crops, normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evl.config import CLIP_MEAN, CLIP_STD, vision_preset
from evl.video.transforms import (
    TransformConfig,
    build_eval_transform,
    build_train_transform,
    color_jitter_params,
    multi_scale_crop_params,
    normalize,
    random_resized_crop_params,
    resize_short_side,
    spatial_crop_offsets,
    symmetric_label_map,
    to_tchw,
)

# mean 0 and std 1/255 make normalisation the identity on [0, 255] values, so positions can be read back.
RAW = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}


def _clip(t: int = 3, h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    """Decoder layout: uint8 [T, H, W, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _gradient(h: int, w: int, t: int = 2) -> np.ndarray:
    """uint8 [T, H, W, 3] whose value is the column index (a horizontal gradient)."""
    return np.broadcast_to(np.arange(w, dtype=np.uint8)[None, None, :, None], (t, h, w, 3)).copy()


# ------------------------------------------------------------------------------------------ crop params


@pytest.mark.parametrize(("scale", "ratio"), [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.3, 0.5), (0.5, 2.0))])
def test_crop_params_in_bounds_and_in_range(scale, ratio):
    height, width = 240, 321
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        top, left, h, w = random_resized_crop_params(height, width, scale, ratio, generator=g)
        assert top >= 0 and left >= 0 and h > 0 and w > 0
        assert top + h <= height and left + w <= width
        # rounding w and h to integers moves area and aspect ratio by at most ~1/min(h, w) relative
        slack = 1.0 / min(h, w)
        assert scale[0] * (1 - 2 * slack) <= h * w / (height * width) <= scale[1] * (1 + 2 * slack)
        assert ratio[0] * (1 - 2 * slack) <= w / h <= ratio[1] * (1 + 2 * slack)


def test_crop_params_cover_the_frame():
    g = torch.Generator().manual_seed(0)
    boxes = [random_resized_crop_params(100, 100, generator=g) for _ in range(500)]
    assert min(b[0] for b in boxes) == 0 and max(b[0] + b[2] for b in boxes) == 100
    assert (
        min(b[2] * b[3] for b in boxes) < 0.15 * 100 * 100 < 0.9 * 100 * 100 < max(b[2] * b[3] for b in boxes)
    )


def test_crop_params_fallback_is_centred_with_clamped_ratio():
    # A 10 x 400 strip: no 90-100 % crop with ratio in [3/4, 4/3] fits, so the fallback clamps to 4/3.
    box = random_resized_crop_params(10, 400, (0.9, 1.0), (3 / 4, 4 / 3), generator=torch.Generator())
    assert box == (0, (400 - 13) // 2, 10, 13)
    box = random_resized_crop_params(400, 10, (0.9, 1.0), (3 / 4, 4 / 3), generator=torch.Generator())
    assert box == ((400 - 13) // 2, 0, 13, 10)


def test_crop_params_seeded():
    a = random_resized_crop_params(240, 320, generator=torch.Generator().manual_seed(5))
    b = random_resized_crop_params(240, 320, generator=torch.Generator().manual_seed(5))
    assert a == b


# ------------------------------------------------------------------------------------------ train


def _config(**overrides) -> TransformConfig:
    return TransformConfig(mean=CLIP_MEAN, std=CLIP_STD, size=17, **overrides)


def test_train_output_shape_dtype_and_numpy_or_tensor_input():
    transform = build_train_transform(_config())
    clip = _clip()
    out, label = transform(clip, 3, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 17, 17) and out.dtype == torch.float32 and label == 3
    out_t, _ = transform(torch.from_numpy(clip), 3, torch.Generator().manual_seed(0))
    assert torch.equal(out, out_t)


def test_train_same_parameters_for_every_frame():
    frame = _clip(1)
    clip = np.repeat(frame, 5, axis=0)
    transform = build_train_transform(_config())
    for seed in range(8):
        out, _ = transform(clip, 0, torch.Generator().manual_seed(seed))
        for t in range(1, 5):
            assert torch.equal(out[0], out[t])


def test_train_seeded_determinism():
    transform = build_train_transform(_config())
    clip = _clip()
    a, _ = transform(clip, 0, torch.Generator().manual_seed(4))
    b, _ = transform(clip, 0, torch.Generator().manual_seed(4))
    c, _ = transform(clip, 0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _identity_crop_config(**overrides) -> TransformConfig:
    # Scale 1 and the frame's own aspect ratio: the crop is the whole frame at its own size.
    return TransformConfig(
        size=20, train_scale=(1.0, 1.0), train_ratio=(1.0, 1.0), rand_augment=None, **RAW, **overrides
    )


def test_flip_always_flips_and_remaps_label():
    clip = _gradient(20, 20)
    transform = build_train_transform(_identity_crop_config(flip_prob=1.0), flip_label_map={3: 4})
    out, label = transform(clip, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.from_numpy(clip).permute(0, 3, 1, 2).flip(-1).float())
    assert label == 4
    assert transform(clip, 4, torch.Generator())[1] == 3  # the map is completed to both directions
    assert transform(clip, 5, torch.Generator())[1] == 5  # classes outside the map keep their label


def test_no_flip_keeps_clip_and_label():
    clip = _gradient(20, 20)
    for cfg in (_identity_crop_config(flip_prob=0.0), _identity_crop_config(flip=False, flip_prob=1.0)):
        out, label = build_train_transform(cfg, {3: 4})(clip, 3, torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, torch.from_numpy(clip).permute(0, 3, 1, 2).float())
        assert label == 3


def test_label_remapped_exactly_when_flipped():
    clip = _gradient(20, 20)
    transform = build_train_transform(_identity_crop_config(), flip_label_map={3: 4})
    outcomes = set()
    for seed in range(40):
        out, label = transform(clip, 3, torch.Generator().manual_seed(seed))
        flipped = bool(out[0, 0, 0, 0] == 19)  # the gradient's left edge holds column 19 after a flip
        assert (label == 4) == flipped
        outcomes.add(flipped)
    assert outcomes == {True, False}


def test_symmetric_label_map():
    assert symmetric_label_map({86: 87, 93: 94}) == {86: 87, 87: 86, 93: 94, 94: 93}
    assert symmetric_label_map({1: 2, 2: 1}) == {1: 2, 2: 1}
    with pytest.raises(ValueError, match="pairing"):
        symmetric_label_map({1: 2, 2: 3})


# ------------------------------------------------------------------------------------------ eval


def test_eval_three_crops_along_width():
    clip = _gradient(8, 20)  # short side already 8: the resize is the identity
    out = build_eval_transform(TransformConfig(size=8, num_spatial_views=3, **RAW))(clip)
    assert out.shape == (3, 2, 3, 8, 8)
    # left, centre, right crops start at columns 0, 6 and 12
    torch.testing.assert_close(out[:, 0, 0, 0, 0], torch.tensor([0.0, 6.0, 12.0]))
    torch.testing.assert_close(out[1, 0, 0, 0], torch.arange(6.0, 14.0))


def test_eval_three_crops_along_height():
    clip = np.ascontiguousarray(_gradient(8, 20).transpose(0, 2, 1, 3))  # portrait [T, 20, 8, 3]
    out = build_eval_transform(TransformConfig(size=8, num_spatial_views=3, **RAW))(clip)
    torch.testing.assert_close(out[:, 0, 0, :, 0], torch.arange(8.0) + torch.tensor([[0.0], [6.0], [12.0]]))


def test_eval_single_centre_crop_and_short_side_resize():
    clip = _clip(t=2, h=37, w=53)
    out = build_eval_transform(TransformConfig(size=17, **RAW))(clip)
    assert out.shape == (1, 2, 3, 17, 17)
    resized = resize_short_side(to_tchw(torch.from_numpy(clip)), 17)
    assert resized.shape[-2:] == (17, 53 * 17 // 37)
    left = (resized.shape[-1] - 17) // 2
    torch.testing.assert_close(out[0], resized[..., :, left : left + 17], rtol=1e-5, atol=1e-3)


def test_resize_short_side_shapes():
    assert resize_short_side(torch.zeros(1, 3, 37, 53), 17).shape == (1, 3, 17, 24)
    assert resize_short_side(torch.zeros(1, 3, 53, 37), 17).shape == (1, 3, 24, 17)
    assert resize_short_side(torch.zeros(1, 3, 30, 30), 17).shape == (1, 3, 17, 17)


def test_spatial_crop_offsets():
    assert spatial_crop_offsets(224, 298, 224, 1) == [(0, 37)]
    assert spatial_crop_offsets(224, 298, 224, 3) == [(0, 0), (0, 37), (0, 74)]
    assert spatial_crop_offsets(298, 224, 224, 3) == [(0, 0), (37, 0), (74, 0)]
    with pytest.raises(ValueError, match="cannot cut"):
        spatial_crop_offsets(100, 298, 224, 1)


# ------------------------------------------------------------------------------------- normalisation


def test_normalize_uses_given_mean_and_std():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    clip = torch.full((2, 3, 4, 5), 128, dtype=torch.uint8)
    out = normalize(clip, mean, std)
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(mean, std, strict=True)])
    torch.testing.assert_close(out[1, :, 2, 3], expected)
    assert out.dtype == torch.float32


def test_eval_normalises_with_config_statistics():
    clip = np.full((1, 20, 20, 3), 200, dtype=np.uint8)
    out = build_eval_transform(TransformConfig(size=20, mean=CLIP_MEAN, std=CLIP_STD))(clip)
    expected = [(200 / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    torch.testing.assert_close(out[0, 0, :, 7, 11], torch.tensor(expected), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ config


def test_config_requires_statistics_and_reads_backbone():
    with pytest.raises(TypeError):
        TransformConfig()  # type: ignore[call-arg]
    backbone = vision_preset("ViT-T/16@112")
    cfg = TransformConfig.from_backbone(backbone, num_spatial_views=3)
    assert cfg.mean == backbone.mean and cfg.std == backbone.std and cfg.size == 112
    assert cfg.num_spatial_views == 3


@pytest.mark.parametrize(
    "overrides",
    [
        {"rand_augment": "rand-m7-q2"},
        {"num_spatial_views": 2},
        {"train_scale": (0.5, 0.1)},
        {"std": (1, 0, 1)},
    ],
)
def test_config_rejects_invalid_fields(overrides):
    fields = {"mean": CLIP_MEAN, "std": CLIP_STD, **overrides}
    with pytest.raises(ValueError):
        TransformConfig(**fields)


def test_to_tchw_rejects_wrong_layout():
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        to_tchw(np.zeros((3, 3, 8, 8), dtype=np.uint8))


def test_train_transform_on_a_full_size_clip():
    # A Kinetics-sized clip (8 frames of 256 x 340) through the full default pipeline.
    transform = build_train_transform(TransformConfig(mean=CLIP_MEAN, std=CLIP_STD))
    out, _ = transform(_clip(8, 256, 340), 0, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 224, 224) and math.isfinite(out.abs().max().item())


# ------------------------------------------------------------------ X-CLIP / ViFi-CLIP augmentation


def test_with_the_new_steps_off_the_samples_are_todays_exactly():
    # Today's pipeline written out: RandAugment, Inception crop, flip, normalisation, in this draw order.
    from evl.video.randaugment import parse_rand_augment, rand_augment
    from evl.video.transforms import horizontal_flip, resized_crop

    cfg = _config()
    clip = _clip(4, 37, 53)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        frames = rand_augment(to_tchw(torch.from_numpy(clip)), parse_rand_augment(cfg.rand_augment), g)
        box = random_resized_crop_params(37, 53, cfg.train_scale, cfg.train_ratio, generator=g)
        frames = resized_crop(frames, *box, cfg.size)
        if torch.rand((), generator=g).item() < cfg.flip_prob:
            frames = horizontal_flip(frames)
        expected = normalize(frames, cfg.mean, cfg.std)
        # Strengths alone change nothing while the probabilities are 0.
        for transform in (_config(), _config(color_jitter_strength=(0.9, 0.9, 0.9, 0.4))):
            out, _ = build_train_transform(transform)(clip, 0, torch.Generator().manual_seed(seed))
            assert torch.equal(out, expected)


def test_multi_scale_crop_sizes_and_offsets_are_the_allowed_ones():
    height, width = 240, 320
    sizes = [int(240 * s) for s in (1.0, 0.875, 0.75, 0.66)]  # 240, 210, 180, 158
    g = torch.Generator().manual_seed(0)
    seen_pairs, seen_offsets = set(), set()
    for _ in range(600):
        top, left, h, w = multi_scale_crop_params(height, width, generator=g)
        assert h in sizes and w in sizes and abs(sizes.index(h) - sizes.index(w)) <= 1  # max distort 1
        h_step, w_step = (height - h) // 4, (width - w) // 4
        corners = {
            (0, 0),
            (0, 4 * w_step),
            (4 * h_step, 0),
            (4 * h_step, 4 * w_step),
            (2 * h_step, 2 * w_step),
        }
        assert (top, left) in corners
        assert top + h <= height and left + w <= width
        seen_pairs.add((h, w))
        if h_step and w_step:  # offsets in quarter steps of the slack
            seen_offsets.add((top // h_step, left // w_step))
    assert len(seen_pairs) == 10  # 4 square + 6 neighbouring pairs, each drawn
    assert seen_offsets == {(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)}  # 4 corners and the centre


def test_multi_scale_crop_in_the_train_transform():
    transform = build_train_transform(_config(multi_scale_crop=(1.0, 0.875, 0.75, 0.66), rand_augment=None))
    out, _ = transform(_clip(3, 37, 53), 0, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 17, 17)
    # One scale and the square size: the crop is a square of the short side at a corner or the centre.
    whole = build_train_transform(
        TransformConfig(size=20, multi_scale_crop=(1.0,), rand_augment=None, flip=False, **RAW)
    )
    clip = _gradient(20, 28)
    lefts = set()
    for seed in range(30):
        out, _ = whole(clip, 0, torch.Generator().manual_seed(seed))
        lefts.add(out[0, 0, 0, 0].item())
        torch.testing.assert_close(out[0, 0, 0], torch.arange(20.0) + out[0, 0, 0, 0])
    assert lefts == {0.0, 4.0, 8.0}  # steps of (28 - 20) // 4 = 2: left edge, centre, right edge


def test_color_jitter_params_are_a_random_order_within_the_strengths():
    g = torch.Generator().manual_seed(0)
    orders = set()
    for _ in range(100):
        params = color_jitter_params((0.4, 0.4, 0.2, 0.1), g)
        names = [name for name, _ in params]
        assert sorted(names) == ["brightness", "contrast", "hue", "saturation"]
        orders.add(tuple(names))
        factors = dict(params)
        assert 0.6 <= factors["brightness"] <= 1.4 and 0.6 <= factors["contrast"] <= 1.4
        assert 0.8 <= factors["saturation"] <= 1.2 and -0.1 <= factors["hue"] <= 0.1
    assert len(orders) > 12
    assert [name for name, _ in color_jitter_params((0.4, 0.0, 0.0, 0.1), g)] in (
        ["brightness", "hue"],
        ["hue", "brightness"],
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"color_jitter": 1.0},
        {"grayscale": 1.0},
        {"color_jitter": 0.8, "grayscale": 0.2, "multi_scale_crop": (1.0, 0.875, 0.75, 0.66)},
    ],
)
def test_color_jitter_and_greyscale_are_the_same_for_every_frame_and_reproducible(overrides):
    clip = np.repeat(_clip(1), 4, axis=0)
    transform = build_train_transform(_config(**overrides))
    plain = build_train_transform(_config())
    changed = 0
    for seed in range(8):
        out, _ = transform(clip, 0, torch.Generator().manual_seed(seed))
        for t in range(1, 4):
            assert torch.equal(out[0], out[t])
        again, _ = transform(clip, 0, torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)
        changed += not torch.equal(out, plain(clip, 0, torch.Generator().manual_seed(seed))[0])
    assert changed >= 6  # with these probabilities, most clips differ from the plain pipeline's


def test_greyscale_makes_the_channels_equal_and_jitter_changes_colours():
    clip = _clip(2, 20, 20)
    grey = build_train_transform(_identity_crop_config(grayscale=1.0, flip=False))
    out, _ = grey(clip, 0, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    luma = (0.299 * clip[..., 0] + 0.587 * clip[..., 1] + 0.114 * clip[..., 2]).round()
    torch.testing.assert_close(out[:, 0], torch.from_numpy(luma).float())
    jitter = build_train_transform(_identity_crop_config(color_jitter=1.0, flip=False))
    out, _ = jitter(clip, 0, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 255
    assert not torch.allclose(out, torch.from_numpy(clip).permute(0, 3, 1, 2).float(), atol=1.0)


def test_adjust_hue_turns_the_colour_wheel():
    from evl.video.randaugment import adjust_hue

    red = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    green, blue = torch.tensor([0.0, 255.0, 0.0]), torch.tensor([0.0, 0.0, 255.0])
    torch.testing.assert_close(adjust_hue(red, 1 / 3).flatten(), green, atol=1e-3, rtol=0)
    torch.testing.assert_close(adjust_hue(red, -1 / 3).flatten(), blue, atol=1e-3, rtol=0)
    x = torch.from_numpy(_clip(2, 5, 6)).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(adjust_hue(x, 0.0), x, atol=1e-3, rtol=0)
    torch.testing.assert_close(adjust_hue(adjust_hue(x, 0.1), -0.1), x, atol=1e-3, rtol=0)
    grey = x[:, :1].expand_as(x)
    torch.testing.assert_close(adjust_hue(grey, 0.3), grey, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"multi_scale_crop": ()},
        {"multi_scale_crop": (1.0, 1.2)},
        {"color_jitter": 1.5},
        {"grayscale": -0.1},
        {"color_jitter_strength": (0.4, 0.4, 0.2, 0.6)},
    ],
)
def test_augmentation_settings_are_checked(overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        _config(**overrides)
    from evl.config import DataConfig

    with pytest.raises(ValueError, match=f"data.{next(iter(overrides))}"):
        DataConfig(**overrides)
