"""DINOv2 image encoders, with or without registers, as (:class:`VisionConfig`, tensors) under our names.

Reads Hugging Face ``Dinov2Model`` and ``Dinov2WithRegistersModel`` folders (``config.json`` with
``model_type`` ``dinov2`` / ``dinov2_with_registers``, and the weights), the encoder inside a
``Dinov2ForImageClassification`` folder, and the same tensors as a bare state dict. Names map through
:data:`_HF_RENAMES` onto :class:`~evl.models.dinov2_vit.DINOv2VisionTransformer`'s, and q/k/v are fused;
the architecture comes from tensor shapes, the head count and norm epsilon from ``config.json`` where there
is one (else DINOv2's: 64-wide heads, 1e-6).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from evl.config import IMAGENET_MEAN, IMAGENET_STD, VisionConfig
from evl.positions import resize_position_table, square_grid_side
from evl.weights.files import Tensors, WeightFormatError
from evl.weights.renames import apply_renames, merge_qkv

_LAYER, _BLOCK = r"encoder\.layer\.(\d+)", r"blocks.\1"

# Hugging Face DINOv2 -> ours. Files hold the hub's names (``attention.attention.query``); transformers 5
# renames them in memory (``attention.q_proj``), so a state dict taken from a live model has those.
_HF_RENAMES: list[tuple[str, str]] = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "register_tokens"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (rf"{_LAYER}\.norm([12])\.(weight|bias)", rf"{_BLOCK}.norm\2.\3"),
    (rf"{_LAYER}\.attention\.(?:attention\.query|q_proj)\.(weight|bias)", rf"{_BLOCK}.attn.q_proj.\2"),
    (rf"{_LAYER}\.attention\.(?:attention\.key|k_proj)\.(weight|bias)", rf"{_BLOCK}.attn.k_proj.\2"),
    (rf"{_LAYER}\.attention\.(?:attention\.value|v_proj)\.(weight|bias)", rf"{_BLOCK}.attn.v_proj.\2"),
    (rf"{_LAYER}\.attention\.(?:output\.dense|o_proj)\.(weight|bias)", rf"{_BLOCK}.attn.out_proj.\2"),
    (rf"{_LAYER}\.layer_scale([12])\.lambda1", rf"{_BLOCK}.layer_scale\2"),
    (rf"{_LAYER}\.mlp\.(fc[12])\.(weight|bias)", rf"{_BLOCK}.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]

# Tensors a file may hold that the encoder does not use.
_UNUSED = re.compile(
    r"embeddings\.mask_token"  # masked-patch pre-training (iBOT) only
    r"|classifier\..+"  # Dinov2ForImageClassification's linear head
)

# The prefix a task model (``Dinov2ForImageClassification``) puts before the encoder's names.
_TASK_PREFIX = re.compile(r"^dinov2(?:_with_registers)?\.")

# The SwiGLU MLP of the giant model, in hub and in transformers 5 names: refused, by name or by config.
_SWIGLU = re.compile(r".*\.mlp\.(?:weights_in|weights_out|gate_proj|up_proj|down_proj)\..+")
_SWIGLU_REFUSED = "DINOv2 with a SwiGLU MLP (ViT-g) is not supported, only the S/B/L models' GELU MLP"

# Hugging Face ``hidden_act`` -> ours.
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


def dinov2_state_dict(state: Tensors, source: str = "checkpoint") -> Tensors:
    """A Hugging Face DINOv2 encoder's tensors under our names, as stored (q/k/v fused, tables 2-D)."""
    if any(_SWIGLU.fullmatch(k) for k in state):
        raise WeightFormatError(f"{source}: {_SWIGLU_REFUSED}")
    state = {_TASK_PREFIX.sub("", k, count=1): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not _UNUSED.fullmatch(k)}
    out = merge_qkv(apply_renames(state, _HF_RENAMES, source), source)
    # Hugging Face keeps a leading batch axis on the learned tokens and the position table; ours have none.
    if "cls_token" in out:
        out["cls_token"] = out["cls_token"].reshape(-1)  # [1, 1, C] -> [C]
    for name in ("register_tokens", "pos_embed"):
        if name in out:
            out[name] = out[name].flatten(0, -2)  # [1, n, C] -> [n, C]
    return out


def _hf_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """What ``config.json`` tells that tensor shapes do not; refuses what the encoder does not compute."""
    if hf.get("use_swiglu_ffn"):
        raise WeightFormatError(f"{source}: {_SWIGLU_REFUSED} (use_swiglu_ffn)")
    if not hf.get("qkv_bias", True):
        raise WeightFormatError(f"{source}: DINOv2 without q/k/v biases (qkv_bias false) is not supported")
    fields: dict[str, Any] = {}
    if "num_attention_heads" in hf:
        fields["heads"] = hf["num_attention_heads"]
    if "layer_norm_eps" in hf:
        fields["layer_norm_eps"] = hf["layer_norm_eps"]
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_ACTIVATIONS:
        raise WeightFormatError(f"{source}: DINOv2 with hidden_act {act!r} is not supported")
    fields["activation"] = _HF_ACTIVATIONS[act]
    return fields


def infer_dinov2_config(state: Tensors, source: str = "checkpoint", **overrides: Any) -> VisionConfig:
    """Architecture from the shapes of :func:`dinov2_state_dict`'s tensors; ``overrides`` set other fields."""
    try:
        width, channels, patch, patch_w = state["patch_embed.weight"].shape
        num_positions = state["pos_embed"].shape[0]
        mlp_width = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise WeightFormatError(f"{source}: DINOv2 tensor {err} is missing") from None
    if channels != 3 or patch != patch_w:
        raise WeightFormatError(
            f"{source}: a {channels}-channel {patch}x{patch_w} patch embedding (RGB, square patches expected)"
        )
    grid = square_grid_side(num_positions, prefix=1)
    if grid is None:
        raise WeightFormatError(f"{source}: {num_positions} position embeddings do not form a square grid")
    fields: dict[str, Any] = dict(
        family="dinov2",
        width=width,
        layers=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        heads=max(width // 64, 1),
        patch_size=patch,
        image_size=grid * patch,
        mlp_ratio=mlp_width / width,
        output_dim=None,
        layer_norm_eps=1e-6,
        activation="gelu",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        register_tokens=state["register_tokens"].shape[0] if "register_tokens" in state else 0,
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return VisionConfig(**fields)
    except ValueError as err:
        raise WeightFormatError(f"{source}: {err}") from None


def resize_pos_embed(pos: torch.Tensor, grid: int, antialias: bool) -> torch.Tensor:
    """[1 + g*g, C] -> [1 + grid*grid, C], bicubic over the patch grid (CLS row kept).

    NOTE(ref): transformers' rule, which :meth:`DINOv2VisionTransformer.pos_embed_for` follows at run time:
    in float32, antialiased for the register models only.
    """
    return resize_position_table(pos, (grid, grid), prefix=1, antialias=antialias)


def dinov2_vision_from_state(
    state: Tensors,
    info: dict[str, Any],
    source: str,
    heads: int | None = None,
    activation: str | None = None,
    image_size: int | None = None,
) -> tuple[VisionConfig, Tensors]:
    """A DINOv2 file read by :func:`~evl.weights.files.read_state_dict` -> its config and float32 tensors
    under our names; ``image_size`` resizes the patch position embeddings to another input size."""
    fields = _hf_fields(info.get("hf_config", {}), source)
    tensors = {k: v.float() for k, v in dinov2_state_dict(state, source).items()}
    fields.update({k: v for k, v in {"heads": heads, "activation": activation}.items() if v is not None})
    config = infer_dinov2_config(tensors, source, **fields)
    if image_size is not None and image_size != config.image_size:
        if image_size % config.patch_size:
            raise WeightFormatError(
                f"{source}: image size {image_size} is not a multiple of patch {config.patch_size}"
            )
        antialias = config.register_tokens > 0
        tensors["pos_embed"] = resize_pos_embed(
            tensors["pos_embed"], image_size // config.patch_size, antialias
        )
        config = dataclasses.replace(config, image_size=image_size)
    return config, tensors
