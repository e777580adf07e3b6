"""The CLIP text encoder of any supported checkpoint, as (:class:`TextConfig`, tensors) under OpenAI names.

OpenAI's ``CLIP`` keeps the text tower at the top level of its state dict (``token_embedding``,
``positional_embedding``, ``transformer.resblocks.N``, ``ln_final``, ``text_projection``): those names are
ours. open_clip files use them too (``text.`` first in a ``CustomTextCLIP``); Hugging Face ``CLIPModel``,
``CLIPTextModel`` and ``CLIPTextModelWithProjection`` folders map through :data:`_HF_TEXT_RENAMES`, and so do
MetaCLIP 2's (``MetaClip2Model``, ``MetaClip2TextModel(WithProjection)``: CLIP's tower on an XLM-R
vocabulary, pooled at its ``</s>``). Which token is pooled, the activation and the head count come from the
folder's JSON config where there is one.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from evl.config import TextConfig
from evl.weights.files import Tensors, WeightFormatError, read_state_dict
from evl.weights.renames import apply_renames, hf_block_renames, merge_qkv

# Hugging Face CLIP text tower -> OpenAI names (the top level of OpenAI's ``CLIP``). q/k/v are merged and
# ``text_projection`` transposed afterwards.
_HF_TEXT_RENAMES: list[tuple[str, str]] = [
    (r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"ln_final.\1"),
    *hf_block_renames("text_model"),
    (r"text_projection\.weight", "text_projection"),
]
# The text tower's names at the top level of OpenAI and open_clip state dicts.
_OPENAI_TEXT_KEY = re.compile(
    r"(token_embedding|ln_final|transformer)\..+|positional_embedding|text_projection"
)
# CLIP's logit temperature at initialisation, ln(1 / 0.07), for formats that store none.
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)


def _hf_text_to_openai(state: Tensors, source: str) -> Tensors:
    text = {
        k: v
        for k, v in state.items()
        if (k.startswith("text_model.") and not k.endswith("position_ids")) or k == "text_projection.weight"
    }
    out = merge_qkv(apply_renames(text, _HF_TEXT_RENAMES, source), source)
    if "text_projection" in out:
        out["text_projection"] = out["text_projection"].t().contiguous()  # Linear [D, W] -> matrix [W, D]
    return out


def clip_text_state_dict(state: Tensors, source: str = "checkpoint") -> Tensors:
    """The text encoder's tensors under OpenAI names (``token_embedding.weight``, ``positional_embedding``,
    ``transformer.resblocks.N.*``, ``ln_final.*``, ``text_projection``), as :class:`CLIPTextTransformer` has.
    """
    if "embeddings.token_embedding.weight" in state:
        # transformers 5 saves a bare CLIPTextModel without its ``text_model.`` prefix.
        state = {k if k.startswith("text_projection") else f"text_model.{k}": v for k, v in state.items()}
    if any(k.startswith("text_model.") for k in state):
        return _hf_text_to_openai(state, source)
    if "text.token_embedding.weight" in state:
        # open_clip's CustomTextCLIP keeps the same tower under ``text.``; every key there must fit.
        return {
            k[len("text.") :]: v for k, v in state.items() if k.startswith("text.") and k != "text.attn_mask"
        }
    if "token_embedding.weight" in state:
        return {k: v for k, v in state.items() if _OPENAI_TEXT_KEY.fullmatch(k)}
    if any(k.startswith("text.") for k in state):
        raise WeightFormatError(f"{source}: an open_clip text tower that is not CLIP's transformer")
    raise WeightFormatError(
        f"{source}: no CLIP text encoder found (a vision-only checkpoint? expected keys such as "
        "token_embedding.weight or text_model.embeddings.token_embedding.weight)"
    )


def infer_text_config(text: Tensors, source: str = "checkpoint", **overrides: Any) -> TextConfig:
    """Architecture from tensor shapes; heads default to width // 64 as OpenAI and open_clip build them.

    ``overrides`` (any :class:`TextConfig` field; None values are ignored) win over what the shapes say.
    """
    try:
        vocab_size, width = text["token_embedding.weight"].shape
        context_length = text["positional_embedding"].shape[0]
        mlp_width = text["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as err:
        raise WeightFormatError(f"{source}: text encoder tensor {err} is missing") from None
    fields: dict[str, Any] = dict(
        width=width,
        layers=len({k.split(".")[2] for k in text if k.startswith("transformer.resblocks.")}),
        heads=max(width // 64, 1),
        context_length=context_length,
        vocab_size=vocab_size,
        output_dim=text["text_projection"].shape[1] if "text_projection" in text else None,
        mlp_ratio=mlp_width / width,
        # NOTE(ref): OpenAI and open_clip pool at argmax(token ids): the end-of-text token exactly when it is
        # the vocabulary's last id, as 49407 is in CLIP's BPE. Pooling at that id reproduces them.
        eot_token_id=vocab_size - 1,
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TextConfig(**fields)
    except (TypeError, ValueError) as err:
        raise WeightFormatError(f"{source}: {err}") from None


# Hugging Face model types whose text tower pools at the first ``eos_token_id`` as written, 2 included.
# NOTE(ref): MetaCLIP 2's configs say 2, the ``</s>`` of its XLM-R vocabulary, and transformers' MetaClip2
# text model pools there, without CLIP's exception for 2.
_EOS_AS_WRITTEN_MODEL_TYPES = ("metaclip_2", "metaclip_2_text_model")
# Hugging Face model types that hold a text tower of another design, and where it is read instead.
_OTHER_TEXT_TOWERS = {
    "siglip": "a SigLIP text tower (evl.models.registry.load_siglip_text)",
    "siglip2": "a SigLIP 2 text tower (evl.models.registry.load_siglip_text)",
    "siglip_text_model": "a SigLIP text tower (evl.models.registry.load_siglip_text)",
    "siglip2_text_model": "a SigLIP 2 text tower (evl.models.registry.load_siglip_text)",
}


def _hf_text_fields(hf_config: dict[str, Any], source: str) -> dict[str, Any]:
    model_type = hf_config.get("model_type")
    if model_type in _OTHER_TEXT_TOWERS:
        raise WeightFormatError(
            f"{source}: model_type {model_type!r} holds {_OTHER_TEXT_TOWERS[model_type]}, not CLIP's"
        )
    if "text_config" in hf_config or "text_config_dict" in hf_config:
        # Older hub files nest the tower as text_config_dict, which wins as in transformers.
        text = {**(hf_config.get("text_config") or {}), **(hf_config.get("text_config_dict") or {})}
    else:
        text = hf_config  # a CLIPTextModel(WithProjection) config
    fields: dict[str, Any] = {
        "heads": text.get("num_attention_heads"),
        "layer_norm_eps": text.get("layer_norm_eps"),
    }
    act = text.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise WeightFormatError(f"{source}: text activation {act!r} is not supported (quick_gelu or gelu)")
    fields["activation"] = act
    eos = text.get("eos_token_id")
    # NOTE(ref): transformers pools CLIP at the first ``eos_token_id``, except when it is 2 (configs written
    # before its fix, e.g. openai/clip-vit-base-patch32): then at argmax(token ids), which the default of
    # infer_text_config (the vocabulary's last id, CLIP's end-of-text) reproduces.
    if isinstance(eos, int) and (eos != 2 or model_type in _EOS_AS_WRITTEN_MODEL_TYPES):
        fields["eot_token_id"] = eos
    return fields


# open_clip text options that change the computation in ways CLIPTextTransformer does not model.
_OPEN_CLIP_TEXT_UNSUPPORTED = (
    "hf_model_name",
    "embed_cls",
    "no_causal_mask",
    "final_ln_after_pool",
    "qk_norm",
)


def _open_clip_text_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    model_cfg = cfg.get("model_cfg", cfg)
    text = model_cfg.get("text_cfg") or {}
    if not text:
        return {}
    for option in _OPEN_CLIP_TEXT_UNSUPPORTED:
        if text.get(option):
            raise WeightFormatError(
                f"{source}: open_clip text option {option}={text[option]!r} is not supported"
            )
    fields: dict[str, Any] = {
        "heads": text.get("heads", 8),  # open_clip's CLIPTextCfg default
        "activation": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "layer_norm_eps": (text.get("norm_kwargs") or {}).get("eps"),
    }
    pool = text.get("pool_type", "argmax")
    if pool == "eos":
        fields["eot_token_id"] = text.get("eos_id", 2)
    elif pool != "argmax":
        raise WeightFormatError(
            f"{source}: open_clip text pool_type {pool!r} is not supported (argmax or eos)"
        )
    return fields


def _logit_scale(state: Tensors, source: str) -> float:
    value = state.get("logit_scale")
    if value is None:
        return DEFAULT_LOGIT_SCALE
    if value.numel() != 1:
        raise WeightFormatError(f"{source}: logit_scale has shape {tuple(value.shape)}, expected one value")
    return float(value.float().reshape(()))


def read_clip_text(path: str | Path, **overrides: Any) -> tuple[TextConfig, Tensors, float]:
    """Read a CLIP text encoder from any supported format.

    Returns its :class:`TextConfig`, a float32 state dict under OpenAI names (for a strict
    ``CLIPTextTransformer.load_state_dict``; :func:`evl.models.registry.load_clip_text` builds and loads
    the module) and the checkpoint's ``logit_scale``: the log of the logit temperature as stored (about
    ln 100 for trained models), or CLIP's initial ln(1 / 0.07) when the format stores none (e.g.
    ``CLIPTextModel``). ``overrides`` set
    :class:`TextConfig` fields the file cannot tell or that should differ (``heads``, ``activation``,
    ``eot_token_id``, ...); OpenAI and open_clip files store neither heads nor activation.
    """
    state, info = read_state_dict(path)
    source = str(path)
    fields: dict[str, Any] = {}
    # The configs first: they tell a tower of another design before its tensors fail to map.
    if "hf_config" in info:
        fields.update(_hf_text_fields(info["hf_config"], source))
    if "open_clip_config" in info:
        fields.update(_open_clip_text_fields(info["open_clip_config"], source))
    text = clip_text_state_dict(state, source)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    config = infer_text_config(text, source, **fields)
    # OpenAI's archives are mixed precision (fp16 matmul weights): compute in float32.
    text = {k: v.float() for k, v in text.items()}
    return config, text, _logit_scale(state, source)
