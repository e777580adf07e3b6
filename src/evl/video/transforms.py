"""Spatial transforms for video clips, with the same random parameters for every frame of a clip.

Train: RandAugment on the full-resolution frames -> Inception random-resized crop (or X-CLIP's multi-scale
crop) to ``size`` -> horizontal flip (with an optional label remap for direction-sensitive classes) -> colour
jitter -> greyscale -> ``/255`` and normalisation. Each step is optional; by default RandAugment, the
Inception crop and the flip are on, colour jitter and greyscale off.
Eval: resize the short side to ``size`` -> 1 centre crop or 3 crops along the long side -> normalisation.

Clips enter as the decoder's uint8 [T, H, W, 3] (numpy or torch) and leave as float32 [T, 3, S, S]
(train) or [V, T, 3, S, S] (eval). Frames are processed as one batch. Mean and std always come from the
backbone preset (:meth:`TransformConfig.from_backbone`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from evl.config import COLOR_JITTER_STRENGTH, MULTI_SCALE_CROP, VisionConfig, check_augmentation
from evl.video.randaugment import (
    RandAugmentConfig,
    adjust_brightness,
    adjust_color,
    adjust_contrast,
    adjust_hue,
    parse_rand_augment,
    rand_augment,
)
from evl.video.randaugment import grayscale as to_grayscale

Clip = np.ndarray | torch.Tensor


@dataclass(frozen=True, kw_only=True)
class TransformConfig:
    """Spatial preprocessing. ``mean`` and ``std`` (per RGB channel, for [0, 1] pixels) have no default.

    Training crop: ``multi_scale_crop`` None takes the Inception random-resized crop (``train_scale``,
    ``train_ratio``); a tuple of fractions of the short side takes the multi-scale crop. ``color_jitter`` and
    ``grayscale`` are the probabilities that a clip is jittered (by up to ``color_jitter_strength``:
    brightness, contrast, saturation, hue) or turned grey; 0 leaves them out.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int = 224
    train_scale: tuple[float, float] = (0.08, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    flip_prob: float = 0.5
    rand_augment: str | None = "rand-m7-n4-mstd0.5-inc1"
    num_spatial_views: int = 1
    multi_scale_crop: tuple[float, ...] | None = None
    color_jitter: float = 0.0
    color_jitter_strength: tuple[float, float, float, float] = COLOR_JITTER_STRENGTH
    grayscale: float = 0.0

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"TransformConfig: need 3 means and 3 positive stds, got {self.mean}, {self.std}"
            )
        if self.size < 1:
            raise ValueError(f"TransformConfig: size must be >= 1, got {self.size}")
        if not 0 < self.train_scale[0] <= self.train_scale[1] <= 1:
            raise ValueError(
                f"TransformConfig: train_scale must satisfy 0 < lo <= hi <= 1, got {self.train_scale}"
            )
        if not 0 < self.train_ratio[0] <= self.train_ratio[1]:
            raise ValueError(
                f"TransformConfig: train_ratio must satisfy 0 < lo <= hi, got {self.train_ratio}"
            )
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"TransformConfig: flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.num_spatial_views not in (1, 3):
            raise ValueError(
                f"TransformConfig: num_spatial_views must be 1 or 3, got {self.num_spatial_views}"
            )
        if self.rand_augment is not None:
            parse_rand_augment(self.rand_augment)  # fail at construction, not in a data-loader worker
        check_augmentation(
            self.multi_scale_crop,
            self.color_jitter,
            self.color_jitter_strength,
            self.grayscale,
            prefix="TransformConfig: ",
        )

    @classmethod
    def from_backbone(cls, backbone: VisionConfig, **overrides: Any) -> TransformConfig:
        """The backbone preset's mean, std and input size, with optional field overrides.

        Resizing is bilinear whatever ``backbone.interpolation`` says: EVL trains and evaluates with
        bilinear resizes of the clip tensor, and the decoder is trained on what that produces.
        """
        fields = {"mean": tuple(backbone.mean), "std": tuple(backbone.std), "size": backbone.image_size}
        return cls(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------


def to_tchw(clip: Clip) -> torch.Tensor:
    """Decoder layout [T, H, W, 3] (numpy or torch) -> a [T, 3, H, W] view of the same values and dtype."""
    frames = torch.from_numpy(np.ascontiguousarray(clip)) if isinstance(clip, np.ndarray) else clip
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected a clip [T, H, W, 3], got shape {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2)


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Inception crop box ``(top, left, crop_height, crop_width)``.

    Up to 10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio (w / h) in
    ``ratio``; if none fits, the largest centred crop whose aspect ratio is clamped into ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (1,), generator=generator))
            left = int(torch.randint(width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def multi_scale_crop_params(
    height: int,
    width: int,
    scales: tuple[float, ...] = MULTI_SCALE_CROP,
    max_distort: int = 1,
    *,
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Multi-scale crop box ``(top, left, crop_height, crop_width)``, as mmaction2's ``MultiScaleCrop`` with
    ``random_crop=False`` and 5 fixed crops (X-CLIP's and ViFi-CLIP's training crop).

    Height and width are each ``int(short side * scale)`` for scales at most ``max_distort`` places apart in
    ``scales`` (so the aspect ratio stays near 1), drawn uniformly among those pairs; the box then sits at
    one of the 4 corners or the centre, drawn uniformly, on a grid of quarter steps of the slack.
    """
    base = min(height, width)
    sizes = [int(base * s) for s in scales]
    pairs = [(h, w) for i, h in enumerate(sizes) for j, w in enumerate(sizes) if abs(i - j) <= max_distort]
    # NOTE(ref): the reference resizes frames to a short side of 256 (for 224 px inputs) first and snaps a
    # side within 2 px of 224 to 224. We crop the decoded frames and resize once; at the reference's scale
    # the snap only ever meets 0.875 * 256, which is 224 already, so it is left out.
    crop_h, crop_w = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
    h_step, w_step = (height - crop_h) // 4, (width - crop_w) // 4
    offsets = [(0, 0), (0, 4 * w_step), (4 * h_step, 0), (4 * h_step, 4 * w_step), (2 * h_step, 2 * w_step)]
    top, left = offsets[int(torch.randint(len(offsets), (1,), generator=generator))]
    return top, left, crop_h, crop_w


def color_jitter_params(
    strength: tuple[float, float, float, float], generator: torch.Generator
) -> list[tuple[str, float]]:
    """One clip's colour jitter, as torchvision ``ColorJitter.get_params``: the four adjustments in a random
    order, with factors uniform in [max(0, 1 - s), 1 + s] (brightness, contrast, saturation) and
    [-s, s] (hue). Returns ``[(name, factor), ...]`` in the order to apply."""
    names = ("brightness", "contrast", "saturation", "hue")
    order = torch.randperm(4, generator=generator).tolist()
    factors = {}
    for name, s in zip(names, strength, strict=True):
        lo, hi = (-s, s) if name == "hue" else (max(0.0, 1.0 - s), 1.0 + s)
        factors[name] = lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64).item()
    # A zero strength leaves its adjustment out, as torchvision does for a None range.
    return [(names[i], factors[names[i]]) for i in order if strength[i] > 0]


_COLOR_OPS = {
    "brightness": adjust_brightness,  # PIL ImageEnhance.Brightness, as torchvision on PIL images
    "contrast": adjust_contrast,  # ImageEnhance.Contrast (the mean luma of each frame)
    "saturation": adjust_color,  # ImageEnhance.Color
    "hue": adjust_hue,
}


def color_jitter(clip: torch.Tensor, params: list[tuple[str, float]]) -> torch.Tensor:
    """Apply :func:`color_jitter_params`' adjustments to every frame. Float [T, 3, H, W] in [0, 255]."""
    for name, factor in params:
        clip = _COLOR_OPS[name](clip, factor)
    return clip


def resized_crop(clip: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """Crop a box of every frame and resize it to ``size`` x ``size``. [T, C, H, W] -> float [T, C, S, S]."""
    crop = clip[..., top : top + height, left : left + width].float()
    # NOTE(ref): bilinear without antialiasing, as the official crop (F.interpolate on the clip tensor).
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)


def horizontal_flip(clip: torch.Tensor) -> torch.Tensor:
    """Mirror every frame left-right. [..., H, W] -> [..., H, W]."""
    return clip.flip(-1)


def symmetric_label_map(flip_label_map: Mapping[int, int]) -> dict[int, int]:
    """Complete a flip map so that ``a -> b`` also gives ``b -> a``; a contradiction raises ValueError."""
    full = {int(a): int(b) for a, b in flip_label_map.items()}
    for a, b in list(full.items()):
        if full.setdefault(b, a) != a:
            raise ValueError(f"flip_label_map is not a pairing: {a} -> {b} but {b} -> {full[b]}")
    return full


def normalize(clip: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(clip / 255 - mean) / std`` over the channel axis -3. [..., 3, H, W] in [0, 255] -> float32."""
    mean_255 = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
    std_255 = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0
    return (clip.float() - mean_255) / std_255


def resize_short_side(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the short side is ``size`` (bilinear). [T, C, H, W] -> float [T, C, H', W']."""
    h, w = clip.shape[-2:]
    # NOTE(ref): the long side is floored (w * size // h) and there is no antialiasing, as the official
    # evaluation; the training crops are resized the same way.
    new_h, new_w = (size, w * size // h) if h < w else (h * size // w, size)
    return F.interpolate(clip.float(), size=(new_h, new_w), mode="bilinear", align_corners=False)


def spatial_crop_offsets(height: int, width: int, size: int, num_views: int) -> list[tuple[int, int]]:
    """(top, left) of 1 centre crop, or of 3 crops at the start, middle and end of the long side."""
    if height < size or width < size:
        raise ValueError(f"cannot cut {size}x{size} crops from {height}x{width} frames")
    top, left = (height - size) // 2, (width - size) // 2
    if num_views == 1:
        return [(top, left)]
    if num_views == 3:
        if height > width:  # portrait: top / middle / bottom
            return [(0, left), (top, left), (height - size, left)]
        return [(top, 0), (top, left), (top, width - size)]
    raise ValueError(f"num_views must be 1 or 3, got {num_views}")


def spatial_crops(clip: torch.Tensor, size: int, num_views: int) -> torch.Tensor:
    """Cut ``num_views`` square crops from every frame. [T, C, H, W] -> [V, T, C, S, S]."""
    offsets = spatial_crop_offsets(clip.shape[-2], clip.shape[-1], size, num_views)
    return torch.stack([clip[..., t : t + size, l : l + size] for t, l in offsets])


# ---------------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------------


class TrainTransform:
    """``(clip uint8 [T, H, W, 3], label, generator) -> (float32 [T, 3, S, S], label)``.

    Random draws, in order and all from ``generator``: RandAugment, crop box, flip, colour jitter, greyscale.
    A step that is off draws nothing, so the default settings draw (and return) what they always did. Every
    draw is made once per clip: all its frames get the same crop, flip, jitter and greyscale.
    A plain class rather than a closure so that data-loader workers can pickle it.
    """

    def __init__(self, config: TransformConfig, flip_label_map: Mapping[int, int] | None = None) -> None:
        self.config = config
        self.rand_augment: RandAugmentConfig | None = (
            parse_rand_augment(config.rand_augment) if config.rand_augment else None
        )
        self.flip_label_map = symmetric_label_map(flip_label_map or {})

    def __call__(self, clip: Clip, label: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        cfg = self.config
        frames = to_tchw(clip)
        if self.rand_augment is not None:
            # NOTE(ref): RandAugment sees the full-resolution frames before cropping, as the official loader.
            frames = rand_augment(frames, self.rand_augment, generator)
        height, width = frames.shape[-2:]
        if cfg.multi_scale_crop is not None:
            # NOTE(ref): as X-CLIP / ViFi-CLIP, the box is resized to size x size whatever its aspect ratio.
            box = multi_scale_crop_params(height, width, cfg.multi_scale_crop, generator=generator)
        else:
            box = random_resized_crop_params(
                height, width, cfg.train_scale, cfg.train_ratio, generator=generator
            )
        frames = resized_crop(frames, *box, cfg.size)
        # The official loader stores a mirror flag but never flips; we flip, as the paper's recipe says.
        if cfg.flip and torch.rand((), generator=generator).item() < cfg.flip_prob:
            frames = horizontal_flip(frames)
            label = self.flip_label_map.get(label, label)
        # Colour ops after the crop: on size x size frames, as the references (and cheaper than full size).
        # NOTE(ref): X-CLIP / ViFi-CLIP call torchvision's ColorJitter once per frame, so each frame of a clip
        # gets its own factors and order (a flicker no video has); we draw them once per clip, as every other
        # augmentation here. Greyscale is all-or-nothing per clip in both.
        if cfg.color_jitter > 0 and torch.rand((), generator=generator).item() < cfg.color_jitter:
            frames = color_jitter(frames, color_jitter_params(cfg.color_jitter_strength, generator))
        if cfg.grayscale > 0 and torch.rand((), generator=generator).item() < cfg.grayscale:
            frames = to_grayscale(frames)
        # The official loader normalises before cropping; crop and bilinear resize are linear, so normalising
        # the smaller cropped clip gives the same values for less work.
        return normalize(frames, cfg.mean, cfg.std).contiguous(), label


class EvalTransform:
    """``clip uint8 [T, H, W, 3] -> float32 [V, T, 3, S, S]`` with V = ``config.num_spatial_views``."""

    def __init__(self, config: TransformConfig) -> None:
        self.config = config

    def __call__(self, clip: Clip) -> torch.Tensor:
        cfg = self.config
        frames = resize_short_side(to_tchw(clip), cfg.size)
        views = spatial_crops(frames, cfg.size, cfg.num_spatial_views)
        # Normalising after the (linear) resize and crop equals the official normalise-first order.
        return normalize(views, cfg.mean, cfg.std).contiguous()


def build_train_transform(
    config: TransformConfig, flip_label_map: Mapping[int, int] | None = None
) -> TrainTransform:
    """The training transform; ``flip_label_map`` pairs classes that swap under a horizontal flip."""
    return TrainTransform(config, flip_label_map)


def build_eval_transform(config: TransformConfig) -> EvalTransform:
    """The evaluation transform (short-side resize, 1 or 3 crops)."""
    return EvalTransform(config)
