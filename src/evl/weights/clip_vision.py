"""The CLIP image encoder of any supported checkpoint, as (:class:`VisionConfig`, tensors) under OpenAI names.

OpenAI's ``model.visual`` names (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.N``, ``ln_post``, ``proj``) are ours, so OpenAI and open_clip files need no table;
Hugging Face ``CLIPModel`` / ``CLIPVisionModel`` folders map through :data:`_HF_VISION_RENAMES`. The
architecture comes from tensor shapes, completed by the folder's JSON config where there is one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evl.config import CLIP_MEAN, CLIP_STD, VisionConfig
from evl.positions import resize_position_table, square_grid_side
from evl.weights.files import Tensors, WeightFormatError, read_state_dict
from evl.weights.renames import apply_renames, hf_block_renames, merge_qkv

# Hugging Face CLIP vision tower -> OpenAI names. q/k/v are merged and the projection transposed separately.
_HF_VISION_RENAMES: list[tuple[str, str]] = [
    (r"vision_model\.embeddings\.class_embedding", "class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "conv1.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"ln_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"ln_post.\1"),
    *hf_block_renames("vision_model"),
]


def _hf_vision_to_openai(state: Tensors, source: str) -> Tensors:
    vision = {
        k: v for k, v in state.items() if k.startswith("vision_model.") and not k.endswith("position_ids")
    }
    out = merge_qkv(apply_renames(vision, _HF_VISION_RENAMES, source), source)
    if "visual_projection.weight" in state:
        out["proj"] = state["visual_projection.weight"].t().contiguous()
    return out


def clip_visual_state_dict(state: Tensors, source: str = "checkpoint") -> Tensors:
    """The image encoder's tensors under OpenAI ``model.visual`` names (no ``visual.`` prefix)."""
    if "embeddings.patch_embedding.weight" in state:
        # transformers 5 saves a bare CLIPVisionModel without its ``vision_model.`` prefix.
        state = {k if k.startswith("visual_projection") else f"vision_model.{k}": v for k, v in state.items()}
    if any(k.startswith("vision_model.") for k in state):
        return _hf_vision_to_openai(state, source)
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if "conv1.weight" in state and "positional_embedding" in state:
        return dict(state)
    if "visual.trunk.patch_embed.proj.weight" in state or any(".trunk." in k for k in state):
        raise WeightFormatError(f"{source}: a timm-trunk open_clip model; only CLIP ViTs are supported")
    raise WeightFormatError(
        f"{source}: no CLIP image encoder found (expected keys such as visual.conv1.weight, "
        "vision_model.embeddings.patch_embedding.weight or conv1.weight)"
    )


def infer_vision_config(visual: Tensors, source: str = "checkpoint", **overrides: Any) -> VisionConfig:
    """Architecture from tensor shapes; heads default to width // 64 as OpenAI and open_clip build them."""
    try:
        width, _, patch, _ = visual["conv1.weight"].shape
        num_tokens = visual["positional_embedding"].shape[0]
        mlp_width = visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as err:
        raise WeightFormatError(f"{source}: image encoder tensor {err} is missing") from None
    grid = square_grid_side(num_tokens, prefix=1)
    if grid is None:
        raise WeightFormatError(f"{source}: {num_tokens} position embeddings do not form a square grid")
    layers = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
    fields: dict[str, Any] = dict(
        width=width,
        layers=layers,
        heads=max(width // 64, 1),
        patch_size=patch,
        image_size=grid * patch,
        mlp_ratio=mlp_width / width,
        output_dim=visual["proj"].shape[1] if "proj" in visual else None,
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return VisionConfig(**fields)
    except ValueError as err:
        raise WeightFormatError(f"{source}: {err}") from None


def _hf_vision_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    vision = hf_config.get("vision_config", hf_config)
    fields: dict[str, Any] = {"heads": vision.get("num_attention_heads")}
    if "layer_norm_eps" in vision:
        fields["layer_norm_eps"] = vision["layer_norm_eps"]
    act = vision.get("hidden_act")
    if act in ("quick_gelu", "gelu"):
        fields["activation"] = act
    return fields


def _open_clip_vision_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    model_cfg = cfg.get("model_cfg", {})
    vision = model_cfg.get("vision_cfg", {})
    fields: dict[str, Any] = {}
    if "width" in vision:
        fields["heads"] = vision["width"] // vision.get("head_width", 64)
    fields["activation"] = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    pre = cfg.get("preprocess_cfg", {})
    if "mean" in pre and "std" in pre:
        fields["mean"], fields["std"] = tuple(pre["mean"]), tuple(pre["std"])
    return fields


def resize_positional_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g*g, C] -> [1 + grid*grid, C], bicubic over the patch grid (CLS row kept)."""
    return resize_position_table(pos, (grid, grid), prefix=1)


def load_clip_vision(
    path: str | Path,
    heads: int | None = None,
    activation: str | None = None,
    image_size: int | None = None,
) -> tuple[VisionConfig, Tensors]:
    """Read a CLIP image encoder from any supported format.

    Returns its :class:`VisionConfig` and a float32 state dict under OpenAI names, ready for a strict
    ``CLIPVisionTransformer.load_state_dict``. ``heads`` and ``activation`` override what the file cannot
    tell (OpenAI and open_clip files store neither); ``image_size`` resizes the position embeddings.
    """
    state, info = read_state_dict(path)
    return clip_vision_from_state(state, info, str(path), heads, activation, image_size)


def clip_vision_from_state(
    state: Tensors,
    info: dict[str, Any],
    source: str,
    heads: int | None = None,
    activation: str | None = None,
    image_size: int | None = None,
) -> tuple[VisionConfig, Tensors]:
    """:func:`load_clip_vision` on a file already read by :func:`~evl.weights.files.read_state_dict`."""
    visual = clip_visual_state_dict(state, source)
    fields: dict[str, Any] = {"mean": CLIP_MEAN, "std": CLIP_STD}
    if "hf_config" in info:
        fields.update(_hf_vision_fields(info["hf_config"]))
    if "open_clip_config" in info:
        fields.update(_open_clip_vision_fields(info["open_clip_config"]))
    fields.update({k: v for k, v in {"heads": heads, "activation": activation}.items() if v is not None})
    config = infer_vision_config(visual, source, **fields)
    # OpenAI's archives are mixed precision (fp16 matmul weights): compute in float32 unless told otherwise.
    visual = {k: v.float() for k, v in visual.items()}
    if image_size is not None and image_size != config.image_size:
        if image_size % config.patch_size:
            raise WeightFormatError(
                f"{source}: image size {image_size} is not a multiple of patch {config.patch_size}"
            )
        visual["positional_embedding"] = resize_positional_embedding(
            visual["positional_embedding"], image_size // config.patch_size
        )
        config = VisionConfig(**{**config.__dict__, "image_size": image_size})
    return config, visual
