"""RandAugment: spec parsing, each op against its definition (and PIL where installed), clip consistency."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evl.video import randaugment as ra
from evl.video.randaugment import (
    OPS,
    RAND_INCREASING_TRANSFORMS,
    RandAugmentConfig,
    apply_ops,
    parse_rand_augment,
    rand_augment,
    sample_ops,
)

H, W = 37, 53  # odd, non-square frames expose swapped axes


def _image(seed: int = 0) -> np.ndarray:
    """A uint8 [H, W, 3] image with gradients (for affine ops) and noise (for histogram ops)."""
    yy, xx = np.mgrid[0:H, 0:W]
    noise = np.random.default_rng(seed).integers(0, 40, (H, W, 3))
    return ((np.stack([xx * 4, yy * 6, (xx + yy) * 2], -1) % 200) + noise).astype(np.uint8)


def _clip(num_frames: int = 3) -> torch.Tensor:
    """float [T, 3, H, W] in [0, 255], distinct frames."""
    return torch.stack([torch.from_numpy(_image(s)).permute(2, 0, 1) for s in range(num_frames)]).float()


# --------------------------------------------------------------------------------------------- parsing


def test_parse_official_spec():
    cfg = parse_rand_augment("rand-m7-n4-mstd0.5-inc1")
    assert cfg == RandAugmentConfig(magnitude=7.0, num_ops=4, magnitude_std=0.5, increasing=True)
    assert cfg.op_names == RAND_INCREASING_TRANSFORMS
    assert len(cfg.op_names) == 15 and "SolarizeIncreasing" in cfg.op_names


def test_parse_defaults_and_order():
    assert parse_rand_augment("rand") == RandAugmentConfig(magnitude=10.0, num_ops=2)
    assert parse_rand_augment("rand-n3-m9") == RandAugmentConfig(magnitude=9.0, num_ops=3)
    assert not parse_rand_augment("rand-m9-inc0").increasing


@pytest.mark.parametrize(
    "spec",
    [
        "rnd-m7-n4",
        "rand-m7-x3",
        "rand-mfoo",
        "rand-n2.5",
        "rand-inc2",
        "rand-m11",
        "rand-m7-m8",
        "rand-m7-",
        "",
    ],
)
def test_parse_malformed_specs_raise(spec):
    with pytest.raises(ValueError, match="RandAugment"):
        parse_rand_augment(spec)


# ------------------------------------------------------------------------------------------ single ops


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_preserves_shape_dtype_and_range(name):
    x = _clip()
    fn, level_to_args = OPS[name]
    for level in (0.0, 5.0, 10.0):
        y = fn(x, *level_to_args(level, torch.Generator().manual_seed(1)))
        assert y.shape == x.shape and y.dtype == torch.float32
        assert y.min() >= 0 and y.max() <= 255


@pytest.mark.parametrize(
    "name",
    [
        "Rotate", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
        "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    ],
)  # fmt: skip
def test_increasing_ops_are_identity_at_magnitude_zero(name):
    x = _clip()
    fn, level_to_args = OPS[name]
    for seed in range(4):  # both signs
        y = fn(x, *level_to_args(0.0, torch.Generator().manual_seed(seed)))
        torch.testing.assert_close(y, x, atol=1e-3, rtol=0)


def test_invert_twice_is_identity():
    x = _clip()
    torch.testing.assert_close(ra.invert(ra.invert(x)), x, atol=0, rtol=0)


def test_posterize_eight_bits_is_identity_and_keeps_msbs():
    x = _clip()
    assert torch.equal(ra.posterize(x, 8), x)
    y = ra.posterize(x, 2)
    assert set(torch.unique(y).tolist()) <= {0.0, 64.0, 128.0, 192.0}


def test_solarize_threshold():
    x = torch.tensor([0.0, 100.0, 127.0, 128.0, 255.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert ra.solarize(x, 128)[0, 0, 0].tolist() == [0.0, 100.0, 127.0, 127.0, 0.0]
    assert ra.solarize_add(x, 50)[0, 0, 0].tolist() == [50.0, 150.0, 177.0, 128.0, 255.0]


def test_rotate_90_matches_rot90_counter_clockwise():
    x = _clip()[..., :H]  # square, odd: the centre is a pixel centre, so bilinear sampling is exact
    torch.testing.assert_close(ra.rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-3, rtol=0)


def test_translate_moves_content_and_fills():
    x = _clip()
    k = 5
    y = ra.translate_x_rel(x, k / W)  # content moves left by k pixels
    torch.testing.assert_close(y[..., : W - k], x[..., k:], atol=1e-3, rtol=0)
    assert torch.all(y[..., W - k :] == ra.FILL)
    y = ra.translate_y_rel(x, -k / H)  # content moves down by k pixels
    torch.testing.assert_close(y[..., k:, :], x[..., : H - k, :], atol=1e-3, rtol=0)


def test_statistics_are_per_frame():
    x = _clip(2)
    x[1] = x[1] * 0.5  # a darker second frame: per-clip statistics would differ from per-frame ones
    for fn in (ra.equalize, ra.auto_contrast, lambda c: ra.adjust_contrast(c, 1.5)):
        together = fn(x)
        torch.testing.assert_close(together[1:], fn(x[1:]))
        torch.testing.assert_close(together[:1], fn(x[:1]))


def test_flat_frame_is_left_alone_by_histogram_ops():
    x = torch.full((1, 3, 5, 7), 77.0)
    assert torch.equal(ra.equalize(x), x) and torch.equal(ra.auto_contrast(x), x)


# ---------------------------------------------------------------------------------------- PIL parity

_PIL_TOLERANCE = {"exact": 0.0, "rounding": 1.001}  # PIL quantises each result to uint8


def _pil_cases():
    from PIL import Image, ImageEnhance, ImageOps

    kw = {"fillcolor": (128, 128, 128), "resample": Image.BILINEAR}

    def affine(matrix):
        return lambda im: im.transform(im.size, Image.AFFINE, matrix, **kw)

    return [
        ("equalize", ra.equalize, ImageOps.equalize, "exact"),
        ("invert", ra.invert, ImageOps.invert, "exact"),
        ("posterize", lambda x: ra.posterize(x, 3), lambda im: ImageOps.posterize(im, 3), "exact"),
        ("solarize", lambda x: ra.solarize(x, 100), lambda im: ImageOps.solarize(im, 100), "exact"),
        ("autocontrast", ra.auto_contrast, ImageOps.autocontrast, "rounding"),
        (
            "color",
            lambda x: ra.adjust_color(x, 0.3),
            lambda im: ImageEnhance.Color(im).enhance(0.3),
            "rounding",
        ),
        (
            "contrast",
            lambda x: ra.adjust_contrast(x, 1.6),
            lambda im: ImageEnhance.Contrast(im).enhance(1.6),
            "rounding",
        ),
        (
            "brightness",
            lambda x: ra.adjust_brightness(x, 1.6),
            lambda im: ImageEnhance.Brightness(im).enhance(1.6),
            "rounding",
        ),
        (
            "sharpness",
            lambda x: ra.adjust_sharpness(x, 1.9),
            lambda im: ImageEnhance.Sharpness(im).enhance(1.9),
            "rounding",
        ),
        ("rotate", lambda x: ra.rotate(x, -23.0), lambda im: im.rotate(-23.0, **kw), "rounding"),
        ("shear_x", lambda x: ra.shear_x(x, 0.25), affine((1, 0.25, 0, 0, 1, 0)), "rounding"),
        ("shear_y", lambda x: ra.shear_y(x, -0.2), affine((1, 0, 0, -0.2, 1, 0)), "rounding"),
        ("translate_x", lambda x: ra.translate_x_rel(x, 0.3), affine((1, 0, 0.3 * W, 0, 1, 0)), "rounding"),
        ("translate_y", lambda x: ra.translate_y_rel(x, -0.3), affine((1, 0, 0, 0, 1, -0.3 * H)), "rounding"),
    ]


def test_ops_match_pil():
    pil = pytest.importorskip("PIL.Image")
    image = _image()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    for name, ours, theirs, tolerance in _pil_cases():
        expected = np.asarray(theirs(pil.fromarray(image))).astype(np.float32)
        got = ours(x)[0].permute(1, 2, 0).numpy()
        err = np.abs(got - expected).max()
        assert err <= _PIL_TOLERANCE[tolerance], f"{name}: max abs error {err} vs PIL"


# --------------------------------------------------------------------------------------------- policy


def test_sample_ops_draws_from_the_op_set():
    cfg = RandAugmentConfig(magnitude=7, num_ops=4, magnitude_std=0.5, increasing=True, prob=1.0)
    ops = sample_ops(cfg, torch.Generator().manual_seed(0))
    assert len(ops) == 4 and all(name in RAND_INCREASING_TRANSFORMS for name, _ in ops)
    cfg = RandAugmentConfig(num_ops=4, prob=0.0)
    assert sample_ops(cfg, torch.Generator().manual_seed(0)) == []


def test_sample_ops_applies_about_half():
    cfg = parse_rand_augment("rand-m7-n4-mstd0.5-inc1")
    g = torch.Generator().manual_seed(0)
    counts = [len(sample_ops(cfg, g)) for _ in range(400)]
    assert 1.8 < np.mean(counts) < 2.2


def test_rand_augment_same_ops_for_every_frame_and_keeps_uint8():
    frame = torch.from_numpy(_image()).permute(2, 0, 1)
    clip = frame.expand(4, 3, H, W).contiguous()
    cfg = RandAugmentConfig(magnitude=9, num_ops=4, magnitude_std=0.5, increasing=True, prob=1.0)
    for seed in range(5):
        out = rand_augment(clip, cfg, torch.Generator().manual_seed(seed))
        assert out.dtype == torch.uint8 and out.shape == clip.shape
        assert all(torch.equal(out[0], out[t]) for t in range(1, 4))


def test_rand_augment_seeded_determinism():
    clip = _clip().to(torch.uint8)
    cfg = parse_rand_augment("rand-m7-n4-mstd0.5-inc1")
    a = rand_augment(clip, cfg, torch.Generator().manual_seed(3))
    b = rand_augment(clip, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    outs = {rand_augment(clip, cfg, torch.Generator().manual_seed(s)).sum().item() for s in range(6)}
    assert len(outs) > 1


def test_apply_ops_without_ops_is_identity():
    clip = _clip().to(torch.uint8)
    assert torch.equal(apply_ops(clip, []), clip)
