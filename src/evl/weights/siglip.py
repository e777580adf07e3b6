"""SigLIP and SigLIP 2 image towers of Hugging Face folders, as (:class:`VisionConfig`, tensors) under the
names of :class:`~evl.models.siglip_vit.SigLIPVisionTransformer`.

``model_type`` "siglip" (``SiglipModel``: the image tower is taken, the text tower left) and
"siglip_vision_model" (``SiglipVisionModel``) hold SigLIP, and SigLIP 2's fixed-resolution releases too.
"siglip2" and "siglip2_vision_model" are SigLIP 2's NaFlex classes, which embed patches flattened by the
image processor and resize their position table to every image's patch grid; they are converted once, at
load, to a fixed square grid:

* the patch embedding, an ``nn.Linear`` over flattened patches, becomes the convolution that computes the
  same on images;
* the position table is resized to the grid exactly as transformers resizes it for an image of that grid,
  so that the encoder's outputs are transformers' at that resolution.

The architecture comes from tensor shapes, completed by the folder's ``config.json`` (heads, activation,
LayerNorm eps, whether there is a pooling head) and ``preprocessor_config.json`` (normalisation, resizing).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from evl.config import SIGLIP_MEAN, SIGLIP_STD, VisionConfig
from evl.positions import resize_position_table, square_grid_side
from evl.weights.files import Tensors, WeightFormatError
from evl.weights.renames import apply_renames, hf_block_renames, merge_qkv

# Hugging Face SigLIP vision tower -> our names. q/k/v are merged into the blocks' fused ``in_proj``; the
# pooling head's attention is an ``nn.MultiheadAttention`` in both, already fused.
_HF_VISION_RENAMES: list[tuple[str, str]] = [
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "position_embedding"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"post_layernorm.\1"),
    (r"vision_model\.head\.probe", "head.probe"),
    (r"vision_model\.head\.attention\.(in_proj_weight|in_proj_bias)", r"head.attention.\1"),
    (r"vision_model\.head\.attention\.out_proj\.(weight|bias)", r"head.attention.out_proj.\1"),
    (r"vision_model\.head\.layernorm\.(weight|bias)", r"head.layernorm.\1"),
    (r"vision_model\.head\.mlp\.fc1\.(weight|bias)", r"head.mlp.c_fc.\1"),
    (r"vision_model\.head\.mlp\.fc2\.(weight|bias)", r"head.mlp.c_proj.\1"),
    *hf_block_renames("vision_model"),
]

# The NaFlex classes (SigLIP 2), whose patch embedding and position table are converted at load.
NAFLEX_MODEL_TYPES = ("siglip2", "siglip2_vision_model")

# NOTE(ref): transformers' ``SiglipVisionConfig`` defaults. Configs saved by transformers 4 leave out the
# values equal to them (e.g. the head count of a 12-head tower), so a missing key means this value.
_HF_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 12,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "num_channels": 3,
    "vision_use_head": True,
}

# transformers' ``hidden_act`` -> ours; ``gelu_new`` is the tanh approximation written out.
_HF_ACTIVATIONS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
}

# PIL resampling codes of ``preprocessor_config.json`` -> interpolation names.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def siglip_vision_state_dict(state: Tensors, source: str = "checkpoint") -> Tensors:
    """The image tower's tensors under Hugging Face names, ``vision_model.`` prefixed; a ``SiglipModel``'s
    text tower and logit scale and bias are left out."""
    if "embeddings.patch_embedding.weight" in state:
        # transformers 5 saves a bare SiglipVisionModel without its ``vision_model.`` prefix.
        state = {f"vision_model.{k}": v for k, v in state.items()}
    vision = {
        k: v for k, v in state.items() if k.startswith("vision_model.") and not k.endswith("position_ids")
    }
    if not vision:
        raise WeightFormatError(
            f"{source}: no SigLIP image tower found (expected keys such as "
            "vision_model.embeddings.patch_embedding.weight)"
        )
    return merge_qkv(apply_renames(vision, _HF_VISION_RENAMES, source), source)


def naflex_patch_to_conv(weight: torch.Tensor, source: str = "checkpoint") -> torch.Tensor:
    """NaFlex patch embedding [C, p*p*3] -> the equivalent convolution weight [C, 3, p, p].

    NOTE(ref): ``Siglip2ImageProcessor`` (``convert_image_to_patches``) flattens each patch channels last,
    (p, p, 3), not in the (3, p, p) order of a convolution's weight.
    """
    if weight.ndim != 2:
        raise WeightFormatError(
            f"{source}: a NaFlex patch embedding is a matrix, got shape {tuple(weight.shape)}"
        )
    width, features = weight.shape
    patch = math.isqrt(features // 3)
    if 3 * patch * patch != features:
        raise WeightFormatError(f"{source}: a patch embedding over {features} values is not one of 3 x p x p")
    return weight.reshape(width, patch, patch, 3).permute(0, 3, 1, 2).contiguous()


def resize_patch_positions(pos: torch.Tensor, grid: int, naflex: bool = False) -> torch.Tensor:
    """Position table [g*g, C] of a square patch grid (no class row) -> [grid*grid, C].

    SigLIP: bicubic, as transformers' ``interpolate_pos_encoding``. SigLIP 2 NaFlex: bilinear with
    antialias, as ``Siglip2VisionEmbeddings.resize_positional_embeddings`` resizes the table for every
    image (an area average when shrinking, plain bilinear when enlarging).
    """
    if naflex:
        return resize_position_table(pos, (grid, grid), mode="bilinear", antialias=True)
    return resize_position_table(pos, (grid, grid))


def infer_siglip_config(tower: Tensors, source: str = "checkpoint", **overrides: Any) -> VisionConfig:
    """Architecture from tensor shapes (the patch embedding already a convolution); ``overrides`` give what
    shapes do not tell (heads, activation, eps, normalisation) and may set the image size (its grid must be
    the table's)."""
    try:
        width, _, patch, _ = tower["patch_embedding.weight"].shape
        positions = tower["position_embedding"].shape[0]
        mlp_width = tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as err:
        raise WeightFormatError(f"{source}: image encoder tensor {err} is missing") from None
    grid = square_grid_side(positions)
    if grid is None:
        raise WeightFormatError(f"{source}: {positions} position embeddings do not form a square grid")
    # The config's size when its grid is the table's (So400m/14: 384 px for 27 patches of 14), else the
    # table's own.
    image_size = overrides.pop("image_size", None)
    if image_size is None or image_size // patch != grid:
        image_size = grid * patch
    fields: dict[str, Any] = dict(
        family="siglip",
        width=width,
        layers=len({k.split(".")[2] for k in tower if k.startswith("transformer.resblocks.")}),
        patch_size=patch,
        image_size=image_size,
        mlp_ratio=mlp_width / width,
        output_dim=None,
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return VisionConfig(**fields)
    except ValueError as err:
        raise WeightFormatError(f"{source}: {err}") from None


def _hf_fields(hf_config: dict[str, Any], preprocessor: dict[str, Any], source: str) -> dict[str, Any]:
    """VisionConfig fields from a folder's ``config.json`` and ``preprocessor_config.json``."""
    vision = {**_HF_DEFAULTS, **hf_config.get("vision_config", hf_config)}
    size = vision.get("image_size")  # absent for NaFlex towers
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise WeightFormatError(
                f"{source}: a tower for {size[0]}x{size[1]} images; only square ones are read"
            )
        size = size[0]
    if vision["num_channels"] != 3:
        raise WeightFormatError(f"{source}: an image tower of {vision['num_channels']} channels, not RGB")
    act = vision["hidden_act"]
    if act not in _HF_ACTIVATIONS:
        raise WeightFormatError(f"{source}: unsupported activation {act!r} ({', '.join(_HF_ACTIVATIONS)})")
    fields: dict[str, Any] = dict(
        heads=vision["num_attention_heads"],
        activation=_HF_ACTIVATIONS[act],
        layer_norm_eps=vision["layer_norm_eps"],
        pool_head=bool(vision["vision_use_head"]),
        image_size=size,
        interpolation="bilinear" if hf_config.get("model_type") in NAFLEX_MODEL_TYPES else "bicubic",
    )
    if preprocessor.get("resample") in _PIL_RESAMPLE:
        fields["interpolation"] = _PIL_RESAMPLE[preprocessor["resample"]]
    if "image_mean" in preprocessor and "image_std" in preprocessor:
        fields["mean"], fields["std"] = tuple(preprocessor["image_mean"]), tuple(preprocessor["image_std"])
    return fields


def siglip_vision_from_state(
    state: Tensors,
    info: dict[str, Any],
    source: str,
    heads: int | None = None,
    activation: str | None = None,
    image_size: int | None = None,
) -> tuple[VisionConfig, Tensors]:
    """A SigLIP or SigLIP 2 image tower of a folder read by :func:`~evl.weights.files.read_state_dict` ->
    its :class:`VisionConfig` and float32 tensors under our names, ready for a strict load.

    ``heads`` and ``activation`` override the folder's config. ``image_size`` resizes the position table
    for another input size; a SigLIP 2 NaFlex tower is fixed at that size (its table's own grid by default).
    """
    hf_config = info.get("hf_config", {})
    naflex = hf_config.get("model_type") in NAFLEX_MODEL_TYPES
    tower = {k: v.float() for k, v in siglip_vision_state_dict(state, source).items()}
    if naflex and "patch_embedding.weight" in tower:
        tower["patch_embedding.weight"] = naflex_patch_to_conv(tower["patch_embedding.weight"], source)
    fields = _hf_fields(hf_config, info.get("hf_preprocessor", {}), source)
    fields.update({k: v for k, v in {"heads": heads, "activation": activation}.items() if v is not None})
    config = infer_siglip_config(tower, source, **fields)
    if image_size is not None and image_size != config.image_size:
        if image_size < config.patch_size:
            raise WeightFormatError(
                f"{source}: image size {image_size} is below the patch {config.patch_size}"
            )
        config = dataclasses.replace(config, image_size=image_size)
    tower["position_embedding"] = resize_patch_positions(
        tower["position_embedding"], config.grid_size, naflex=naflex
    )
    return config, tower
