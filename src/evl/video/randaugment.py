"""RandAugment for video clips, in plain torch, with timm's ``rand-m{M}-n{N}-mstd{S}-inc{0|1}`` semantics.

Every op works on a float clip [T, C, H, W] with values in [0, 255] and returns the same shape and range; the
frames are a batch, so one op call transforms the whole clip. Colour ops follow PIL's ``ImageOps`` /
``ImageEnhance`` (a blend with a degenerate image); statistics such as the histogram of ``equalize`` are per
frame, as PIL sees one frame at a time. Affine ops use PIL's convention: the matrix maps output pixel
coordinates to input pixel coordinates, and uncovered pixels get a grey fill.

A clip draws its ops once (:func:`sample_ops`) and every frame gets the same op, magnitude and sign.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_LEVEL = 10.0
# NOTE(ref): the official loader passes no image mean to timm's RandAugment, so uncovered pixels are grey.
FILL = 128.0

# ITU-R 601-2 luma, PIL's RGB -> "L" conversion.
_LUMA = (0.299, 0.587, 0.114)


# ---------------------------------------------------------------------------------------------------------
# Colour ops
# ---------------------------------------------------------------------------------------------------------


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """[T, 3, H, W] -> [T, 1, H, W] luma, rounded to a level as in PIL's 8-bit "L" image."""
    r, g, b = x.unbind(dim=-3)
    return torch.round(_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, x, factor)``: 1 gives ``x``, 0 ``degenerate``; beyond extrapolates."""
    return (degenerate + factor * (x - degenerate)).clamp(0.0, 255.0)


def auto_contrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each frame's channels to span [0, 255]; flat channels are left as they are."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, 1.0, 255.0 / (hi - lo).clamp(min=1e-6))
    return ((x - torch.where(flat, 0.0, lo)) * scale).clamp(0.0, 255.0)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize`` per frame and channel: histogram equalisation with PIL's lookup table."""
    t, c, h, w = x.shape
    levels = x.round().clamp(0, 255).long().reshape(t * c, h * w)
    rows = torch.arange(t * c).unsqueeze(1)
    hist = torch.bincount((levels + rows * 256).flatten(), minlength=t * c * 256).reshape(t * c, 256)
    # PIL's step ignores the last occupied bin so that the brightest level maps to 255.
    last_bin = torch.where(hist > 0, torch.arange(256), -1).amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last_bin)) // 255
    below = hist.cumsum(dim=1) - hist  # pixels strictly darker than each level
    lut = ((below + step // 2) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256))  # a single occupied level: identity, as PIL
    return lut.gather(1, levels).reshape(t, c, h, w).to(x.dtype)


def invert(x: torch.Tensor) -> torch.Tensor:
    """Negative image."""
    return 255.0 - x


def posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the ``bits`` most significant bits of each 8-bit value; ``bits >= 8`` is the identity."""
    if bits >= 8:
        return x
    quantum = float(2 ** (8 - bits))
    return torch.floor(x / quantum) * quantum


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert values ``>= threshold``; ``threshold = 256`` is the identity."""
    return torch.where(x >= threshold, 255.0 - x, x)


def solarize_add(x: torch.Tensor, add: float, threshold: float = 128.0) -> torch.Tensor:
    """Add ``add`` to values below ``threshold`` (saturating at 255)."""
    return torch.where(x < threshold, (x + add).clamp(max=255.0), x)


def adjust_color(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``ImageEnhance.Color``: blend with the grayscale frame (0 = grey, 1 = identity)."""
    return _blend(_grayscale(x), x, factor)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with a flat frame at the frame's mean luma (rounded, as PIL)."""
    mean = torch.floor(_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True) + 0.5)
    return _blend(mean, x, factor)


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``ImageEnhance.Brightness``: blend with black."""
    return (x * factor).clamp(0.0, 255.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL ``convert("L")`` and back to RGB (torchvision ``Grayscale(num_output_channels=3)``): every
    channel becomes the frame's luma. [T, 3, H, W] -> [T, 3, H, W]."""
    return _grayscale(x).expand_as(x).clone()


def adjust_hue(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Turn every pixel's hue by ``factor`` of a full turn (in [-0.5, 0.5]), keeping saturation and value.

    RGB -> HSV -> RGB in floating point, as torchvision's tensor ``adjust_hue``. NOTE(ref): the references
    jitter PIL images, whose HSV planes are 8-bit; the hues here are not quantised to 256 levels.
    """
    rgb = x / 255.0
    r, g, b = rgb.unbind(dim=-3)
    value = rgb.amax(dim=-3)
    delta = value - rgb.amin(dim=-3)
    saturation = torch.where(value > 0, delta / value.clamp(min=1e-12), 0.0)
    # Hue in sixths of a turn from whichever channel is largest; grey pixels (delta 0) have hue 0.
    safe = torch.where(delta > 0, delta, 1.0)
    rc, gc, bc = (value - r) / safe, (value - g) / safe, (value - b) / safe
    hue = torch.where(value == r, bc - gc, torch.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    hue = (hue + factor) % 1.0
    sector = hue * 6.0
    i = torch.floor(sector)
    f = sector - i
    i = i.long() % 6
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * f)
    t = value * (1.0 - saturation * (1.0 - f))
    # Per sector of the hue circle, which of (value, q, p, t) each output channel takes.
    table = torch.stack([value, q, p, t])  # [4, T, H, W]
    picks = torch.tensor(  # sector -> the picks of r, g, b
        [[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=x.device
    )
    channels = [table.gather(0, picks[:, c][i].unsqueeze(0)).squeeze(0) for c in range(3)]
    return (torch.stack(channels, dim=-3) * 255.0).clamp(0.0, 255.0)


def adjust_sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend with the ``SMOOTH``-filtered frame (PIL keeps the border)."""
    if min(x.shape[-2:]) < 3:
        return x
    # SMOOTH = [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (3x3 box sum + 4 * centre) / 13; the box sum is
    # separable, which is much faster than a conv2d on CPU.
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth = torch.round((box + 4.0 * x[..., 1:-1, 1:-1]) / 13.0)  # PIL's filtered image is 8-bit
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


# ---------------------------------------------------------------------------------------------------------
# Affine ops
# ---------------------------------------------------------------------------------------------------------


def affine(
    x: torch.Tensor, matrix: Sequence[Sequence[float]], fill: float = FILL, mode: str = "bilinear"
) -> torch.Tensor:
    """Warp every frame by one 2x3 ``matrix`` mapping output pixel coordinates to input pixel coordinates.

    Coordinates are continuous with pixel ``i`` covering ``[i, i + 1)`` (PIL's convention); output pixels
    whose centre maps outside the frame get ``fill``. [T, C, H, W] -> [T, C, H, W].

    The official video loader resamples with PIL's bicubic filter; bilinear is the default here because it
    is several times faster on CPU, and ``mode="bicubic"`` is available.
    """
    t, _, h, w = x.shape
    (a, b, c), (d, e, f) = matrix
    # Source point of every output pixel centre, in float64 so that points on the frame's edge are
    # classified exactly; one [H, W] grid serves every frame.
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij"
    )
    src_x, src_y = a * u + b * v + c, d * u + e * v + f
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)  # [H, W]
    # grid_sample's coordinates (align_corners=False): -1 and 1 are the outer edges of the frame.
    grid = torch.stack([src_x * (2.0 / w) - 1.0, src_y * (2.0 / h) - 1.0], dim=-1).to(x.dtype)
    warped = F.grid_sample(x, grid.expand(t, h, w, 2), mode=mode, padding_mode="border", align_corners=False)
    # As PIL: a point inside the frame interpolates from clamped neighbours, a point outside gets the fill.
    return torch.where(inside, warped, fill)


def rotate(x: torch.Tensor, degrees: float, fill: float = FILL) -> torch.Tensor:
    """PIL ``Image.rotate``: counter-clockwise by ``degrees`` about the frame centre."""
    h, w = x.shape[-2:]
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    cx, cy = w / 2.0, h / 2.0
    matrix = [[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy]]
    return affine(x, matrix, fill)


def shear_x(x: torch.Tensor, factor: float, fill: float = FILL) -> torch.Tensor:
    """Horizontal shear about the top-left corner: output (u, v) reads input (u + factor * v, v)."""
    return affine(x, [[1.0, factor, 0.0], [0.0, 1.0, 0.0]], fill)


def shear_y(x: torch.Tensor, factor: float, fill: float = FILL) -> torch.Tensor:
    """Vertical shear about the top-left corner: output (u, v) reads input (u, v + factor * u)."""
    return affine(x, [[1.0, 0.0, 0.0], [factor, 1.0, 0.0]], fill)


def translate_x_rel(x: torch.Tensor, fraction: float, fill: float = FILL) -> torch.Tensor:
    """Shift content left by ``fraction`` of the width (right when negative)."""
    return affine(x, [[1.0, 0.0, fraction * x.shape[-1]], [0.0, 1.0, 0.0]], fill)


def translate_y_rel(x: torch.Tensor, fraction: float, fill: float = FILL) -> torch.Tensor:
    """Shift content up by ``fraction`` of the height (down when negative)."""
    return affine(x, [[1.0, 0.0, 0.0], [0.0, 1.0, fraction * x.shape[-2]]], fill)


# ---------------------------------------------------------------------------------------------------------
# Magnitude (level in [0, 10]) to op arguments, as timm's ``*_level_to_arg``
# ---------------------------------------------------------------------------------------------------------

LevelToArgs = Callable[[float, torch.Generator], tuple]


def _random_sign(value: float, generator: torch.Generator) -> float:
    # timm negates when random() > 0.5.
    return -value if torch.rand((), generator=generator).item() > 0.5 else value


def _no_args(level: float, generator: torch.Generator) -> tuple:
    return ()


def _rotate_args(level: float, generator: torch.Generator) -> tuple:
    return (_random_sign(level / MAX_LEVEL * 30.0, generator),)


def _shear_args(level: float, generator: torch.Generator) -> tuple:
    return (_random_sign(level / MAX_LEVEL * 0.3, generator),)


def _translate_rel_args(level: float, generator: torch.Generator) -> tuple:
    return (_random_sign(level / MAX_LEVEL * 0.45, generator),)


def _enhance_args(level: float, generator: torch.Generator) -> tuple:
    return (level / MAX_LEVEL * 1.8 + 0.1,)


def _enhance_increasing_args(level: float, generator: torch.Generator) -> tuple:
    # Strength grows with the level on both sides of the identity factor 1: [0.1, 1.9].
    return (1.0 + _random_sign(level / MAX_LEVEL * 0.9, generator),)


def _posterize_args(level: float, generator: torch.Generator) -> tuple:
    return (int(level / MAX_LEVEL * 4),)


def _posterize_increasing_args(level: float, generator: torch.Generator) -> tuple:
    return (4 - int(level / MAX_LEVEL * 4),)


def _solarize_args(level: float, generator: torch.Generator) -> tuple:
    return (int(level / MAX_LEVEL * 256),)


def _solarize_increasing_args(level: float, generator: torch.Generator) -> tuple:
    return (256 - int(level / MAX_LEVEL * 256),)


def _solarize_add_args(level: float, generator: torch.Generator) -> tuple:
    return (int(level / MAX_LEVEL * 110),)


OPS: dict[str, tuple[Callable[..., torch.Tensor], LevelToArgs]] = {
    "AutoContrast": (auto_contrast, _no_args),
    "Equalize": (equalize, _no_args),
    "Invert": (invert, _no_args),
    "Rotate": (rotate, _rotate_args),
    "Posterize": (posterize, _posterize_args),
    "PosterizeIncreasing": (posterize, _posterize_increasing_args),
    "Solarize": (solarize, _solarize_args),
    "SolarizeIncreasing": (solarize, _solarize_increasing_args),
    "SolarizeAdd": (solarize_add, _solarize_add_args),
    "Color": (adjust_color, _enhance_args),
    "ColorIncreasing": (adjust_color, _enhance_increasing_args),
    "Contrast": (adjust_contrast, _enhance_args),
    "ContrastIncreasing": (adjust_contrast, _enhance_increasing_args),
    "Brightness": (adjust_brightness, _enhance_args),
    "BrightnessIncreasing": (adjust_brightness, _enhance_increasing_args),
    "Sharpness": (adjust_sharpness, _enhance_args),
    "SharpnessIncreasing": (adjust_sharpness, _enhance_increasing_args),
    "ShearX": (shear_x, _shear_args),
    "ShearY": (shear_y, _shear_args),
    "TranslateXRel": (translate_x_rel, _translate_rel_args),
    "TranslateYRel": (translate_y_rel, _translate_rel_args),
}

_GEOMETRIC = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", *_GEOMETRIC,
)  # fmt: skip
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    *_GEOMETRIC,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandAugmentConfig:
    """``num_ops`` ops drawn uniformly with replacement per clip, each applied with probability ``prob`` at a
    magnitude drawn from N(``magnitude``, ``magnitude_std``) clamped to [0, 10]."""

    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False
    prob: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.magnitude <= MAX_LEVEL:
            raise ValueError(f"RandAugment magnitude must be in [0, {MAX_LEVEL:g}], got {self.magnitude}")
        if self.num_ops < 0 or self.magnitude_std < 0 or not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"invalid RandAugment settings: {self}")

    @property
    def op_names(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


_SPEC_PART = re.compile(r"(mstd|inc|m|n)(\d+(?:\.\d*)?)")
_SPEC_FORM = (
    "'rand-m{M}-n{N}-mstd{S}-inc{0|1}' (every part after 'rand' optional, e.g. 'rand-m7-n4-mstd0.5-inc1')"
)


def parse_rand_augment(spec: str) -> RandAugmentConfig:
    """Read a timm RandAugment spec such as ``"rand-m7-n4-mstd0.5-inc1"``.

    Defaults for missing parts are timm's: m=10, n=2, mstd=0, inc=0.
    """
    head, *parts = spec.split("-")
    if head != "rand":
        raise ValueError(
            f"malformed RandAugment spec {spec!r}: it must start with 'rand'; expected {_SPEC_FORM}"
        )
    values: dict[str, str] = {}
    for part in parts:
        match = _SPEC_PART.fullmatch(part)
        if match is None:
            raise ValueError(
                f"malformed RandAugment spec {spec!r}: cannot read {part!r}; expected {_SPEC_FORM}"
            )
        key, value = match.groups()
        if key in values:
            raise ValueError(f"malformed RandAugment spec {spec!r}: {key!r} is given twice")
        if key in ("n", "inc") and not value.isdigit():
            raise ValueError(f"malformed RandAugment spec {spec!r}: {key!r} needs an integer, got {value!r}")
        values[key] = value
    if values.get("inc", "0") not in ("0", "1"):
        raise ValueError(f"malformed RandAugment spec {spec!r}: 'inc' must be 0 or 1")
    # The official video code reads inc0 as increasing too (bool("0") is True); we honour the 0.
    return RandAugmentConfig(
        magnitude=float(values.get("m", MAX_LEVEL)),
        num_ops=int(values.get("n", 2)),
        magnitude_std=float(values.get("mstd", 0.0)),
        increasing=values.get("inc", "0") == "1",
    )


def sample_ops(config: RandAugmentConfig, generator: torch.Generator) -> list[tuple[str, tuple]]:
    """Draw one clip's ops: a list of (op name, op arguments), skipped ops left out."""
    names = config.op_names
    chosen = torch.randint(len(names), (config.num_ops,), generator=generator).tolist()
    ops = []
    for index in chosen:
        # timm skips an op when random() > prob.
        if torch.rand((), generator=generator).item() > config.prob:
            continue
        magnitude = config.magnitude
        if config.magnitude_std > 0:
            magnitude += config.magnitude_std * torch.randn((), generator=generator).item()
        magnitude = min(MAX_LEVEL, max(0.0, magnitude))
        _, level_to_args = OPS[names[index]]
        ops.append((names[index], level_to_args(magnitude, generator)))
    return ops


def apply_ops(clip: torch.Tensor, ops: Sequence[tuple[str, tuple]]) -> torch.Tensor:
    """Apply (name, args) ops to every frame. [T, C, H, W] uint8 or float in [0, 255] -> same dtype, shape."""
    x = clip.float()
    for name, args in ops:
        fn, _ = OPS[name]
        x = fn(x, *args)
    if clip.dtype == torch.uint8:
        return x.round().to(torch.uint8)
    return x.to(clip.dtype)


def rand_augment(clip: torch.Tensor, config: RandAugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """RandAugment one clip, the same ops for all frames. [T, C, H, W] in [0, 255] -> same dtype and shape."""
    return apply_ops(clip, sample_ops(config, generator))
