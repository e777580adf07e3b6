"""Configuration as data: frozen dataclasses and preset tables.

Every model is described by a :class:`ModelConfig` (a backbone plus a decoder). Presets are plain dicts;
variations go through :func:`dataclasses.replace`, and the resolved config is saved with every checkpoint
(:func:`to_dict` / :func:`model_config_from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from evl.devices import check_precision

# Normalisation statistics travel with the backbone preset (never a silent default).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SigLIP and SigLIP 2 take pixels scaled to [-1, 1]

# X-CLIP's and ViFi-CLIP's training augmentation (their shared data pipeline): the multi-scale crop's side
# lengths as fractions of the short side (mmaction2 ``MultiScaleCrop``), and the colour jitter's brightness,
# contrast, saturation and hue (torchvision ``ColorJitter(0.4, 0.4, 0.2, 0.1)``).
MULTI_SCALE_CROP = (1.0, 0.875, 0.75, 0.66)
COLOR_JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)


class SettingError(ValueError):
    """A run setting that is missing or does not fit. ``field`` names it as the run config does
    (``data.classes``): the library speaks in config fields, and a front end such as the CLI says how to
    set that field (its flag)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# Image encoder families: how the tokens of an image are laid out and which module computes them.
#   clip:   [CLS, patches]; OpenAI's layout (conv1, class/position embeddings, ln_pre, blocks, ln_post, proj).
#           MetaCLIP 2 is this family.
#   siglip: [patches]; no class token, a pooling head over the last block (SigLIP, SigLIP 2).
#   dinov2: [CLS, registers, patches]; layer scale in every block (DINOv2, with or without registers).
# In every family the patch tokens come last, row-major: EVL's cross-frame attention reads the last P tokens.
VISION_FAMILIES = ("clip", "siglip", "dinov2")
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class VisionConfig:
    """A ViT image encoder: its family (see :data:`VISION_FAMILIES`), shape and input normalisation."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 16
    image_size: int = 224
    mlp_ratio: float = 4.0
    output_dim: int | None = 512  # ``proj`` columns; None for an encoder without projection
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"  # OpenAI CLIP; "gelu" (open_clip, DINOv2); "gelu_tanh" (SigLIP)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"  # used when resizing frames to ``image_size``
    family: str = "clip"
    register_tokens: int = 0  # DINOv2 with registers: extra learned tokens between CLS and the patches
    # SigLIP: the pooled embedding comes from the attention-pooling head; False (``vision_use_head`` false in
    # transformers): a tower without it, pooled by the mean of its final tokens.
    pool_head: bool = True

    def __post_init__(self) -> None:
        if self.family not in VISION_FAMILIES:
            raise ValueError(
                f"VisionConfig: unknown family {self.family!r}; expected one of {', '.join(VISION_FAMILIES)}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"VisionConfig: unknown activation {self.activation!r}; "
                f"expected one of {', '.join(ACTIVATIONS)}"
            )
        if self.register_tokens and self.family != "dinov2":
            raise ValueError(f"VisionConfig: register tokens are DINOv2's, not the {self.family} family's")
        if not self.pool_head and self.family != "siglip":
            raise ValueError(f"VisionConfig: only SigLIP towers go without a pooling head, not {self.family}")
        if self.width % self.heads:
            raise ValueError(f"VisionConfig: width {self.width} is not divisible by heads {self.heads}")
        # NOTE(ref): SigLIP So400m/14 reads 384 px images with 27 patches of 14 px: its patch convolution
        # ("valid" padding) drops the last 6 rows and columns. Other families need whole patches.
        if self.image_size % self.patch_size and self.family != "siglip":
            raise ValueError(
                f"VisionConfig: image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches: CLS (and the registers), none for SigLIP."""
        return 0 if self.family == "siglip" else 1 + self.register_tokens

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.prefix_tokens

    @property
    def mlp_width(self) -> int:
        return round(self.width * self.mlp_ratio)


def _siglip(**shape: Any) -> dict[str, Any]:
    """A SigLIP preset: patches only (no class token), GELU-tanh, LayerNorm eps 1e-6, pixels in [-1, 1], and
    an attention-pooled embedding of the encoder's own width (no projection)."""
    return dict(
        family="siglip",
        output_dim=None,
        layer_norm_eps=1e-6,
        activation="gelu_tanh",
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
        **shape,
    )


def _dinov2(patch_size: int = 14, image_size: int = 224, **shape: Any) -> dict[str, Any]:
    """A DINOv2 preset: CLS and patch tokens (and ``register_tokens``), exact GELU, LayerNorm eps 1e-6,
    ImageNet statistics, and the final-normed CLS token as its embedding (no projection)."""
    return dict(
        family="dinov2",
        patch_size=patch_size,
        image_size=image_size,
        output_dim=None,
        layer_norm_eps=1e-6,
        activation="gelu",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        **shape,
    )


# Real CLIP encoders (OpenAI release) and SigLIP towers (Google), plus small random-init presets for CPU work.
VISION_PRESETS: dict[str, dict[str, Any]] = {
    "ViT-B/32": dict(width=768, layers=12, heads=12, patch_size=32, image_size=224, output_dim=512),
    "ViT-B/16": dict(width=768, layers=12, heads=12, patch_size=16, image_size=224, output_dim=512),
    "ViT-L/14": dict(width=1024, layers=24, heads=16, patch_size=14, image_size=224, output_dim=768),
    "ViT-L/14@336": dict(width=1024, layers=24, heads=16, patch_size=14, image_size=336, output_dim=768),
    "ViT-S/16": dict(width=384, layers=12, heads=6, patch_size=16, image_size=224, output_dim=256),
    "ViT-T/16": dict(width=192, layers=12, heads=3, patch_size=16, image_size=224, output_dim=128),
    # A few seconds per training step on two CPU cores: what the demo and the end-to-end tests use.
    "ViT-T/16@112": dict(width=192, layers=6, heads=3, patch_size=16, image_size=112, output_dim=128),
    "SigLIP-B/16": _siglip(width=768, layers=12, heads=12, patch_size=16, image_size=224),
    "SigLIP-L/16@256": _siglip(width=1024, layers=24, heads=16, patch_size=16, image_size=256),
    # MLP 4304: mlp_width rounds 1152 * (4304 / 1152) back to it exactly.
    "SigLIP-So400m/14@384": _siglip(
        width=1152, layers=27, heads=16, patch_size=14, image_size=384, mlp_ratio=4304 / 1152
    ),
    # SigLIP 2's fixed-resolution towers have SigLIP's shapes; their preprocessing resizes bilinearly.
    "SigLIP2-B/16": _siglip(
        width=768, layers=12, heads=12, patch_size=16, image_size=224, interpolation="bilinear"
    ),
    "SigLIP2-L/16@256": _siglip(
        width=1024, layers=24, heads=16, patch_size=16, image_size=256, interpolation="bilinear"
    ),
    "SigLIP2-So400m/14@384": _siglip(
        width=1152,
        layers=27,
        heads=16,
        patch_size=14,
        image_size=384,
        mlp_ratio=4304 / 1152,
        interpolation="bilinear",
    ),
    "SigLIP-T/16@112": _siglip(width=192, layers=6, heads=3, patch_size=16, image_size=112),
    # DINOv2 (Meta), published at 518 px (37x37 patches) and run here at 224 px (16x16); "-reg": 4 registers.
    "DINOv2-S/14": _dinov2(width=384, layers=12, heads=6),
    "DINOv2-B/14": _dinov2(width=768, layers=12, heads=12),
    "DINOv2-L/14": _dinov2(width=1024, layers=24, heads=16),
    "DINOv2-S/14-reg": _dinov2(width=384, layers=12, heads=6, register_tokens=4),
    "DINOv2-B/14-reg": _dinov2(width=768, layers=12, heads=12, register_tokens=4),
    "DINOv2-L/14-reg": _dinov2(width=1024, layers=24, heads=16, register_tokens=4),
    "DINOv2-T/14@112": _dinov2(width=192, layers=6, heads=3, image_size=112),
}


def _preset(table: dict[str, dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} preset {name!r}; known presets: {', '.join(table)}") from None


def vision_preset(name: str, **overrides: Any) -> VisionConfig:
    """The :class:`VisionConfig` of a named preset, with optional field overrides."""
    return VisionConfig(**{**_preset(VISION_PRESETS, name, "backbone"), **overrides})


@dataclass(frozen=True)
class TextConfig:
    """A CLIP text transformer (OpenAI layout)."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    # ``text_projection`` columns: the joint embedding size. None: no projection (HF ``CLIPTextModel``),
    # the embedding is the pooled width-sized token.
    output_dim: int | None = 512
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    # The end-of-text token, whose output is the sentence embedding. OpenAI's vocabulary puts it last
    # (49407), which is why the reference pools at ``argmax(token_ids)``.
    eot_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"TextConfig: width {self.width} is not divisible by heads {self.heads}")
        if not 0 <= self.eot_token_id < self.vocab_size:
            raise ValueError(
                f"TextConfig: eot_token_id {self.eot_token_id} is outside the vocabulary of {self.vocab_size}"
            )

    @property
    def mlp_width(self) -> int:
        return round(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class SigLIPTextConfig:
    """A SigLIP / SigLIP 2 text transformer: CLIP's fields where they mean the same, without an end-of-text
    token. Its blocks attend both ways, and the sentence embedding is the last position's output through a
    ``head`` Linear (with bias), so a row must be padded to the full ``context_length``.

    Defaults are SigLIP B/16's text tower.
    """

    width: int = 768
    layers: int = 12
    heads: int = 12
    context_length: int = 64
    vocab_size: int = 32000
    output_dim: int = 768  # ``head`` out features: the joint embedding size
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    activation: str = "gelu_tanh"

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"SigLIPTextConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"SigLIPTextConfig: unknown activation {self.activation!r}; "
                f"expected one of {', '.join(ACTIVATIONS)}"
            )

    @property
    def mlp_width(self) -> int:
        return round(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class DecoderConfig:
    """The EVL decoder and classification head.

    ``blocks`` names the backbone blocks (0-based) that feed decoder layers 0..num_layers-1, shallow to deep;
    ``None`` means the official choice, the last ``num_layers`` blocks.
    """

    num_frames: int = 8
    num_layers: int = 4
    num_classes: int = 400
    num_heads: int | None = None  # None: the backbone's head count, as the official code
    mlp_ratio: float = 4.0
    mlp_dropout: float = 0.5
    head_dropout: float = 0.5
    temporal_conv: bool = True
    temporal_pos_embed: bool = True
    temporal_cross_attention: bool = True
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"DecoderConfig: num_layers must be >= 1, got {self.num_layers}")
        if self.num_frames < 1:
            raise ValueError(f"DecoderConfig: num_frames must be >= 1, got {self.num_frames}")
        if self.num_classes < 1:
            raise ValueError(f"DecoderConfig: num_classes must be >= 1, got {self.num_classes}")
        if self.blocks is not None and len(self.blocks) != self.num_layers:
            raise ValueError(
                f"DecoderConfig: {len(self.blocks)} feeding blocks given for {self.num_layers} decoder layers"
            )

    def feeding_blocks(self, backbone_layers: int) -> tuple[int, ...]:
        """Backbone block index read by each decoder layer, validated against the backbone depth."""
        blocks = self.blocks
        if blocks is None:
            if self.num_layers > backbone_layers:
                raise ValueError(
                    f"{self.num_layers} decoder layers need as many backbone blocks, "
                    f"but the backbone has {backbone_layers}"
                )
            blocks = tuple(range(backbone_layers - self.num_layers, backbone_layers))
        blocks = tuple(b + backbone_layers if b < 0 else b for b in blocks)
        for b in blocks:
            if not 0 <= b < backbone_layers:
                raise ValueError(f"feeding block {b} is outside the backbone's {backbone_layers} blocks")
        return blocks


@dataclass(frozen=True)
class ModelConfig:
    """An EVL video classifier: a frozen CLIP ViT and a trainable decoder."""

    backbone: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    backbone_name: str = "ViT-B/16"
    freeze_backbone: bool = True
    # Compute dtype of the frozen backbone: "auto" picks float32 on CPU (half precision is emulated there)
    # and bfloat16 on CUDA; or one of "float32", "float16", "bfloat16".
    backbone_dtype: str = "auto"


# Model presets: the paper's configurations (Table 1 / Table 9 of the EVL paper).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "evl-b16": dict(backbone="ViT-B/16", decoder=dict(num_layers=4)),
    "evl-b16-ssv2": dict(backbone="ViT-B/16", decoder=dict(num_layers=12)),
    "evl-l14": dict(backbone="ViT-L/14", decoder=dict(num_layers=4)),
    "evl-l14-336": dict(backbone="ViT-L/14@336", decoder=dict(num_layers=4)),
    "evl-l14-ssv2": dict(backbone="ViT-L/14", decoder=dict(num_layers=24)),
    "evl-t16": dict(backbone="ViT-T/16", decoder=dict(num_layers=4)),
    "evl-t16-112": dict(backbone="ViT-T/16@112", decoder=dict(num_layers=2)),
}


def model_preset(name: str, **decoder_overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a named model preset; keyword arguments override decoder fields."""
    preset = _preset(MODEL_PRESETS, name, "model")
    decoder = DecoderConfig(**{**preset["decoder"], **decoder_overrides})
    return ModelConfig(
        backbone=vision_preset(preset["backbone"]), decoder=decoder, backbone_name=preset["backbone"]
    )


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass; tuples become lists."""
    return dataclasses.asdict(config)


def _tupled(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _from_fields(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: _tupled(v) for k, v in data.items()})


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`to_dict` for a :class:`ModelConfig`."""
    data = dict(data)
    backbone = _from_fields(VisionConfig, data.pop("backbone"))
    decoder = _from_fields(DecoderConfig, data.pop("decoder"))
    return _from_fields(ModelConfig, {**data, "backbone": backbone, "decoder": decoder})


# ------------------------------------------------------------------------------------------ run configs
# A training run is described by four sections, each a frozen dataclass; YAML recipes in configs/ and
# ``--set section.key=value`` overrides fill them (see evl.recipes). ``decoder.num_frames`` and
# ``decoder.num_classes`` are not set by hand: they follow ``data.num_frames`` and the class list.


@dataclass(frozen=True)
class BackboneSpec:
    """Which CLIP image encoder to use and how to run it."""

    name: str = "ViT-B/16"  # a preset with local weights, a checkpoint path, or random:PRESET
    heads: int | None = None  # override for checkpoints whose head count is not width // 64
    freeze: bool = True
    dtype: str = "auto"  # compute dtype of the frozen backbone: auto | float32 | float16 | bfloat16

    def __post_init__(self) -> None:
        check_precision(self.dtype, "backbone.dtype")


def check_augmentation(
    multi_scale_crop: tuple[float, ...] | None,
    color_jitter: float,
    color_jitter_strength: tuple[float, ...],
    grayscale: float,
    prefix: str = "data.",
) -> None:
    """ValueError (one line, fields named after ``prefix``) for clip augmentations that cannot work."""
    if multi_scale_crop is not None and not (multi_scale_crop and all(0 < s <= 1 for s in multi_scale_crop)):
        raise ValueError(
            f"{prefix}multi_scale_crop needs fractions of the short side in (0, 1], got {multi_scale_crop}"
        )
    for name, p in (("color_jitter", color_jitter), ("grayscale", grayscale)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{prefix}{name} is a probability in [0, 1], got {p}")
    if len(color_jitter_strength) != 4 or min(color_jitter_strength) < 0 or color_jitter_strength[3] > 0.5:
        raise ValueError(
            f"{prefix}color_jitter_strength is (brightness, contrast, saturation, hue), each >= 0 and hue "
            f"<= 0.5, got {color_jitter_strength}"
        )


@dataclass(frozen=True)
class DataConfig:
    """Where videos come from and how clips are cut and augmented."""

    data_root: str | None = None
    train_list: str | None = None
    val_list: str | None = None
    classes: str | None = None  # classes.txt (one per line) or a JSON list
    sampling: str = "dense"  # dense (strided clip) | segment (TSN: one frame per segment)
    num_frames: int = 8
    frame_stride: int = 16
    num_temporal_views: int = 1  # evaluation views along time
    num_spatial_views: int = 1  # evaluation crops: 1 (centre) or 3
    flip: bool = True
    flip_label_map: str | None = None  # JSON file {"class a": "class b", ...} for direction-sensitive labels
    rand_augment: str | None = "rand-m7-n4-mstd0.5-inc1"
    train_scale: tuple[float, float] = (0.08, 1.0)
    # Training crop: null, the Inception random-resized crop (train_scale); fractions of the short side, the
    # multi-scale crop of X-CLIP and ViFi-CLIP ([1.0, 0.875, 0.75, 0.66]) at a corner or the centre.
    multi_scale_crop: tuple[float, ...] | None = None
    # Per clip, the probability of colour jitter (X-CLIP / ViFi-CLIP: 0.8) by up to color_jitter_strength
    # (brightness, contrast, saturation, hue), and of greyscale (0.2); 0 is off. The same for all frames.
    color_jitter: float = 0.0
    color_jitter_strength: tuple[float, float, float, float] = COLOR_JITTER_STRENGTH
    grayscale: float = 0.0
    num_workers: int | None = None  # data-loader workers per process; None: from the CPU count
    on_bad_video: str = "skip"  # skip (counted, logged to the run directory) | error
    # Feature caches made by `evl extract`: train (and validate) the decoder without running the backbone.
    features: str | None = None
    val_features: str | None = None

    def __post_init__(self) -> None:
        if self.sampling not in ("dense", "segment"):
            raise ValueError(f"data.sampling must be 'dense' or 'segment', got {self.sampling!r}")
        if self.on_bad_video not in ("skip", "error"):
            raise ValueError(f"data.on_bad_video must be 'skip' or 'error', got {self.on_bad_video!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 or null, got {self.num_workers}")
        check_augmentation(
            self.multi_scale_crop, self.color_jitter, self.color_jitter_strength, self.grayscale
        )


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation schedule. Steps, not epochs, as the official EVL trainer."""

    steps: int = 50_000
    batch_size: int = 256  # global batch per optimiser step
    batch_split: int = 1  # gradient accumulation: micro-batches per step
    lr: float = 4e-4
    weight_decay: float = 0.05
    decay_all: bool = False  # True: decay every parameter, as the official code does
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    # Autocast of the training forward: auto (float32 on CPUs; on GPUs bfloat16 from compute capability 8.0,
    # else float16 with a gradient scaler) | float32 | bfloat16 | float16 (see evl.devices).
    precision: str = "auto"
    tf32: bool = True  # CUDA: TensorFloat-32 for float32 matmuls and convolutions
    # Rebuild the decoder's memory in backward instead of storing it: less memory, a little more time.
    # None: on for CPUs training from videos, off on GPUs and for cached features.
    recompute_memory: bool | None = None
    eval_every: int = 1000
    save_every: int = 1000
    log_every: int = 10
    keep_last: int = 2
    seed: int = 0
    # Fine-tuning from another run (e.g. UCF-101 from Kinetics): its decoder initialises this one; a
    # classifier of another size stays new and learns head_lr_scale times faster than the rest.
    init_from: str | None = None
    head_lr_scale: float = 1.0
    on_nonfinite: str = "stop"  # a NaN/inf loss: stop (the last good checkpoint stays) | skip the update
    label_smoothing: float = 0.0  # X-CLIP and ViFi-CLIP train with 0.1
    # Mixup and CutMix of each micro-batch with its own reverse (timm's Mixup), trained with soft targets:
    # the Beta(alpha, alpha) of each, 0 turning it off; with both on, CutMix is taken with probability
    # mix_switch_prob. X-CLIP and ViFi-CLIP: 0.8, 1.0 and 0.5. Both 0 (the default): plain cross-entropy.
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_switch_prob: float = 0.5
    betas: tuple[float, float] | None = None  # AdamW betas; None: the method's (EVL 0.999, X-CLIP/ViFi 0.98)
    # torch.compile the training forward and backward: minutes of compilation first; on CUDA it can fuse the
    # decoder's memory-bound passes, on CPU it measured slower (benchmarks/README.md), so off by default.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.batch_split < 1:
            raise ValueError("train.steps, train.batch_size and train.batch_split must be >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"train.mixup and train.cutmix must be >= 0, got {self.mixup}, {self.cutmix}")
        if not 0.0 <= self.mix_switch_prob <= 1.0:
            raise ValueError(f"train.mix_switch_prob must be in [0, 1], got {self.mix_switch_prob}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        check_precision(self.precision, "train.precision")
        if self.batch_size % self.batch_split:
            raise ValueError(
                f"train.batch_size {self.batch_size} is not divisible by train.batch_split {self.batch_split}"
            )


NORMALIZATIONS = ("auto", "clip", "imagenet")


@dataclass(frozen=True)
class MethodConfig:
    """Which video model a run trains, and the settings of the methods that classify by text.

    ``name`` is a key of the method registry (``evl.engine.methods.METHODS``), which checks it and holds
    what "auto" means for each method. ``templates`` are the class prompts (``{}`` is the class name); None
    takes the method's own: ViFi-CLIP ``"a photo of a {}."``, X-CLIP and zero-shot CLIP the bare name.
    ``normalization`` "auto" follows the reference code of each method: CLIP statistics for EVL and
    zero-shot CLIP, ImageNet statistics for ViFi-CLIP and X-CLIP (whose shared data pipeline uses them).
    ``vifi_prompt`` takes no ``templates``: its class prompt is the learned context's (``prompt_*``).
    """

    name: str = "evl"
    templates: tuple[str, ...] | None = None
    normalization: str = "auto"
    text_heads: int | None = None  # text-tower heads, for checkpoints not using width // 64
    tune: str = "both"  # ViFi-CLIP: both | image | text (which encoders train)
    # X-CLIP
    mit_layers: int = 1
    prompt_layers: int = 2
    prompt_alpha: float = 0.1
    droppath: float = 0.0
    freeze_text: bool = True
    # ViFi-CLIP's "bridge and prompt" stage (vifi_prompt): deep prompts in both frozen towers. Tokens per
    # layer and the number of layers that get their own (from the first); the defaults are its few-shot
    # setting. ``prompt_init`` initialises a text context of up to 4 tokens (None: random, prefix "X X ...").
    prompt_vision_tokens: int = 10
    prompt_text_tokens: int = 10
    prompt_vision_depth: int = 12
    prompt_text_depth: int = 12
    prompt_init: str | None = "a photo of a"

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"method.normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}"
            )
        if self.tune not in ("both", "image", "text"):
            raise ValueError(f"method.tune must be both, image or text, got {self.tune!r}")
        for template in self.templates or ():
            if "{}" not in template:
                raise ValueError(f"method.templates: {template!r} has no {{}} for the class name")
        if self.templates is not None and not self.templates:
            raise ValueError("method.templates is empty: give at least one, or leave it unset")
        for name in (
            "prompt_vision_tokens",
            "prompt_text_tokens",
            "prompt_vision_depth",
            "prompt_text_depth",
        ):
            value, least = getattr(self, name), 1 if name.endswith("depth") else 0
            if value < least:
                raise ValueError(f"method.{name} must be at least {least}, got {value}")
        init = self.prompt_init
        if init is not None and (not init.strip() or "{" in init or "}" in init):
            raise ValueError(
                f"method.prompt_init must be words such as 'a photo of a', or null; got {init!r}"
            )

    def normalization_stats(self, auto: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) of this method's input frames, or None for the image encoder's own.

        ``auto`` is what "auto" stands for in this method: "imagenet", "clip", or None (the encoder's own).
        """
        choice = auto if self.normalization == "auto" else self.normalization
        return {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}.get(choice)


@dataclass(frozen=True)
class RunConfig:
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)


RUN_SECTIONS: dict[str, type] = {
    "backbone": BackboneSpec,
    "decoder": DecoderConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "method": MethodConfig,
}


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Inverse of :func:`to_dict` for a :class:`RunConfig` (unknown sections or fields are errors; a
    missing section takes its defaults, so configs saved before a section existed still load)."""
    sections = RUN_SECTIONS
    unknown = set(data) - set(sections)
    if unknown:
        raise ValueError(f"RunConfig: unknown sections {sorted(unknown)}; expected {sorted(sections)}")
    return RunConfig(**{name: _from_fields(cls, data.get(name, {})) for name, cls in sections.items()})
