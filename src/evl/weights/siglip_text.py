"""SigLIP and SigLIP 2 text towers of Hugging Face folders, as (:class:`SigLIPTextConfig`, tensors) under the
names of :class:`~evl.models.siglip_text.SigLIPTextTransformer`, with the model's logit scale and bias.

``model_type`` "siglip" (``SiglipModel``: SigLIP, and SigLIP 2's fixed-resolution releases), "siglip2"
(``Siglip2Model``: SigLIP 2's NaFlex releases, whose text tower is the same) and the text-only
"siglip_text_model" / "siglip2_text_model" folders. Sizes come from the tensors; heads, activation and
LayerNorm eps from ``config.json``.

SigLIP scores an image-text pair as ``sigmoid(exp(logit_scale) * cos + logit_bias)``: whole-model folders
store both numbers, text-only folders neither (they get big_vision's initial values).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from evl.config import SigLIPTextConfig
from evl.weights.files import Tensors, WeightFormatError, read_state_dict
from evl.weights.renames import apply_renames, hf_block_renames, merge_qkv

SIGLIP_TEXT_MODEL_TYPES = ("siglip", "siglip2", "siglip_text_model", "siglip2_text_model")
# NOTE(ref): big_vision's initial temperature and bias, t' = log 10 and b = -10 (the paper's); transformers
# initialises both to zero.
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0

# Hugging Face SigLIP text tower -> our names. q/k/v are merged into the blocks' fused ``in_proj``.
_HF_TEXT_RENAMES: list[tuple[str, str]] = [
    (r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"ln_final.\1"),
    (r"text_model\.head\.(weight|bias)", r"head.\1"),
    *hf_block_renames("text_model"),
]

# NOTE(ref): transformers' ``SiglipTextConfig`` defaults. Configs saved by transformers 4 leave out the values
# equal to them, so a missing key means this value.
_HF_TEXT_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 12,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
# transformers' ``hidden_act`` -> ours; ``gelu_new`` is the tanh approximation written out.
_HF_ACTIVATIONS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
}


def siglip_text_state_dict(state: Tensors, source: str = "checkpoint") -> Tensors:
    """The text tower's tensors under our names (``token_embedding.weight``, ``positional_embedding``,
    ``transformer.resblocks.N.*``, ``ln_final.*``, ``head.*``), as :class:`SigLIPTextTransformer` has."""
    if "embeddings.token_embedding.weight" in state:
        # transformers 5 saves a bare SiglipTextModel without its ``text_model.`` prefix.
        state = {f"text_model.{k}": v for k, v in state.items()}
    text = {k: v for k, v in state.items() if k.startswith("text_model.") and not k.endswith("position_ids")}
    if not text:
        raise WeightFormatError(
            f"{source}: no SigLIP text tower found (a vision-only checkpoint? expected keys such as "
            "text_model.embeddings.token_embedding.weight)"
        )
    return merge_qkv(apply_renames(text, _HF_TEXT_RENAMES, source), source)


def infer_siglip_text_config(text: Tensors, source: str = "checkpoint", **overrides: Any) -> SigLIPTextConfig:
    """Architecture from tensor shapes; ``overrides`` (any :class:`SigLIPTextConfig` field; None values are
    ignored) set what the shapes cannot tell (heads, activation, LayerNorm eps)."""
    try:
        vocab_size, width = text["token_embedding.weight"].shape
        context_length = text["positional_embedding"].shape[0]
        mlp_width = text["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        output_dim = text["head.weight"].shape[0]
    except KeyError as err:
        raise WeightFormatError(f"{source}: text encoder tensor {err} is missing") from None
    fields: dict[str, Any] = dict(
        width=width,
        layers=len({k.split(".")[2] for k in text if k.startswith("transformer.resblocks.")}),
        context_length=context_length,
        vocab_size=vocab_size,
        output_dim=output_dim,
        mlp_ratio=mlp_width / width,
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SigLIPTextConfig(**fields)
    except (TypeError, ValueError) as err:
        raise WeightFormatError(f"{source}: {err}") from None


def _hf_text_fields(hf_config: dict[str, Any], source: str) -> dict[str, Any]:
    text = {**_HF_TEXT_DEFAULTS, **(hf_config.get("text_config") or hf_config)}
    act = text["hidden_act"]
    if act not in _HF_ACTIVATIONS:
        known = ", ".join(_HF_ACTIVATIONS)
        raise WeightFormatError(f"{source}: text activation {act!r} is not supported ({known})")
    return {
        "heads": text["num_attention_heads"],
        "activation": _HF_ACTIVATIONS[act],
        "layer_norm_eps": text["layer_norm_eps"],
    }


def _scalar(state: Tensors, name: str, default: float, source: str) -> float:
    value = state.get(name)
    if value is None:
        return default
    if value.numel() != 1:
        raise WeightFormatError(f"{source}: {name} has shape {tuple(value.shape)}, expected one value")
    return float(value.float().reshape(()))


def read_siglip_text(path: str | Path, **overrides: Any) -> tuple[SigLIPTextConfig, Tensors, float, float]:
    """Read the text tower of a Hugging Face SigLIP or SigLIP 2 folder.

    Returns its :class:`SigLIPTextConfig`, float32 tensors under our names (for a strict
    ``SigLIPTextTransformer.load_state_dict``; :func:`evl.models.registry.load_siglip_text` builds and loads
    the module), and the model's ``logit_scale`` (the log of the temperature, as stored) and ``logit_bias``.
    ``overrides`` set :class:`SigLIPTextConfig` fields that should differ from the folder's.
    """
    source = str(path)
    state, info = read_state_dict(path)
    hf = info.get("hf_config")
    if hf is None:
        raise WeightFormatError(
            f"{source}: SigLIP text towers are read from Hugging Face folders "
            "(config.json + model.safetensors)"
        )
    model_type = hf.get("model_type")
    if model_type not in SIGLIP_TEXT_MODEL_TYPES:
        known = ", ".join(SIGLIP_TEXT_MODEL_TYPES)
        raise WeightFormatError(
            f"{source}: model_type {model_type!r} holds no SigLIP text tower ({known} do)"
        )
    text = siglip_text_state_dict(state, source)
    fields = _hf_text_fields(hf, source)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    config = infer_siglip_text_config(text, source, **fields)
    return (
        config,
        {k: v.float() for k, v in text.items()},
        _scalar(state, "logit_scale", SIGLIP_LOGIT_SCALE_INIT, source),
        _scalar(state, "logit_bias", SIGLIP_LOGIT_BIAS_INIT, source),
    )
