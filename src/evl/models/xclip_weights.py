"""Loading X-CLIP weights: Hugging Face ``XCLIPModel`` folders and official VideoX/X-CLIP checkpoints.

* A Hugging Face folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, as
  ``save_pretrained`` writes it) maps through one ordered rename table: q/k/v projections are merged into
  ``in_proj`` where the module is CLIP's (image and text blocks, message attention, MIT blocks; not the
  prompt generator, whose q/k/v stay separate as in the official code), and ``visual_projection`` /
  ``text_projection`` are transposed back to OpenAI's [width, dim] matrices. The architecture comes from
  ``config.json``.
* An official checkpoint (``{"model": state}``, optionally with a ``module.`` prefix) already uses our
  names except for the text tower, which sits at the top level there and under ``text.`` here. The file
  does not store head counts: they default to width // 64, as the official ``build_model`` assumes.

Loading is strict: every tensor is used, none is missing, and shapes agree; anything else is a one-line
:class:`evl.weights.WeightFormatError` naming the file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from evl.config import IMAGENET_MEAN, IMAGENET_STD, TextConfig, VisionConfig
from evl.models.xclip import XCLIP, XCLIPConfig
from evl.positions import square_grid_side
from evl.weights import (
    Tensors,
    WeightFormatError,
    apply_renames,
    hf_block_renames,
    merge_qkv,
    read_state_dict,
)

# --------------------------------------------------------------------------------------- Hugging Face


def _block_rows(hf: str, ours: str) -> list[tuple[str, str]]:
    """Rows for one HF encoder (``{hf}.encoder.layers.N``) onto OpenAI-style ``{ours}.resblocks.N``: CLIP's
    block rows plus X-CLIP's message tokens (cross-frame communication) in the image blocks."""
    layer, to = rf"{hf}\.encoder\.layers\.(\d+)\.", rf"{ours}.resblocks.\1."
    return [
        *hf_block_renames(hf, ours),
        (layer + r"(message_fc|message_ln|message_attn\.[qkv]_proj|message_attn\.out_proj)\.(weight|bias)",
         to + r"\2.\3"),
    ]  # fmt: skip


# HF XCLIPModel -> ours. [qkv]_proj of CLIP-style attention are merged afterwards; the projections marked in
# _HF_TRANSPOSED are HF Linear weights [dim, width], OpenAI matrices [width, dim].
_HF_RENAMES: list[tuple[str, str]] = [
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.conv1.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.positional_embedding"),
    (r"vision_model\.pre_layernorm\.(weight|bias)", r"visual.ln_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual.ln_post.\1"),
    *_block_rows("vision_model", "visual.transformer"),
    (r"visual_projection\.weight", "visual.proj"),
    (r"text_model\.embeddings\.token_embedding\.weight", "text.token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "text.positional_embedding"),
    *_block_rows("text_model", "text.transformer"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"text.ln_final.\1"),
    (r"text_projection\.weight", "text.text_projection"),
    (r"mit\.position_embedding", "mit.positional_embedding"),
    *_block_rows("mit", "mit"),
    (r"prompts_visual_layernorm\.(weight|bias)", r"prompts_visual_ln.\1"),
    (r"prompts_visual_projection", "prompts_visual_proj"),  # already [width, dim]: a bare Parameter in HF
    (r"prompts_generator\.layernorm\.(weight|bias)", r"prompts_generator.norm.\1"),
    (r"prompts_generator\.(alpha|decoder\.\d+\.\S+)", r"prompts_generator.\1"),
    (r"logit_scale", "logit_scale"),
]
_HF_TRANSPOSED = ("visual.proj", "text.text_projection")
# CLIP-style attention whose separate q/k/v become one fused in_proj (q, k, v order, as OpenAI's); the
# prompt generator's cross_attn keeps them separate.
_FUSED_ATTENTION = ("attn", "message_attn")


def hf_xclip_state_dict(state: Tensors, source: str = "checkpoint") -> Tensors:
    """A Hugging Face ``XCLIPModel`` state dict -> ours (float32)."""
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # buffers of older saves
    ours = merge_qkv(apply_renames(state, _HF_RENAMES, source), source, _FUSED_ATTENTION)
    for key in _HF_TRANSPOSED:
        if key in ours:
            ours[key] = ours[key].t()
    return {k: v.float().contiguous() for k, v in ours.items()}


# Defaults of transformers' XCLIP configs, for config.json files that leave a field out.
_HF_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
    patch_size=32, num_frames=8, hidden_act="quick_gelu", layer_norm_eps=1e-5, drop_path_rate=0.0,
    mit_hidden_size=512, mit_intermediate_size=2048, mit_num_hidden_layers=1, mit_num_attention_heads=8,
)  # fmt: skip
_HF_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)  # fmt: skip
_HF_DEFAULTS: dict[str, Any] = dict(
    projection_dim=512, prompt_layers=2, prompt_alpha=0.1, prompt_hidden_act="quick_gelu",
    prompt_num_attention_heads=8, logit_scale_init_value=2.6592,
)  # fmt: skip


def _square(value: Any, name: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise WeightFormatError(f"{source}: non-square {name} {value} is not supported")
        value = value[0]
    return int(value)


def xclip_config_from_hf(hf_config: dict[str, Any], source: str = "config.json") -> XCLIPConfig:
    """An :class:`XCLIPConfig` from a Hugging Face ``XCLIPConfig`` (the parsed ``config.json``)."""
    top = {**_HF_DEFAULTS, **hf_config}
    # Older hub files nest the towers as *_config_dict, which take precedence as in transformers.
    vision = {
        **_HF_VISION_DEFAULTS,
        **(top.get("vision_config") or {}),
        **(top.get("vision_config_dict") or {}),
    }
    text = {**_HF_TEXT_DEFAULTS, **(top.get("text_config") or {}), **(top.get("text_config_dict") or {})}
    dim = top["projection_dim"]
    if vision["mit_hidden_size"] != dim:
        raise WeightFormatError(
            f"{source}: mit_hidden_size {vision['mit_hidden_size']} differs from projection_dim {dim}"
        )
    for act in (vision["hidden_act"], text["hidden_act"], top["prompt_hidden_act"]):
        if act not in ("quick_gelu", "gelu"):
            raise WeightFormatError(f"{source}: activation {act!r} is not supported (quick_gelu or gelu)")
    try:
        return XCLIPConfig(
            vision=VisionConfig(
                width=vision["hidden_size"],
                layers=vision["num_hidden_layers"],
                heads=vision["num_attention_heads"],
                patch_size=_square(vision["patch_size"], "patch_size", source),
                image_size=_square(vision["image_size"], "image_size", source),
                mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
                output_dim=dim,
                layer_norm_eps=vision["layer_norm_eps"],
                activation=vision["hidden_act"],
                # The X-CLIP processors normalise with ImageNet statistics.
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
            ),
            text=TextConfig(
                width=text["hidden_size"],
                layers=text["num_hidden_layers"],
                heads=text["num_attention_heads"],
                context_length=text["max_position_embeddings"],
                vocab_size=text["vocab_size"],
                output_dim=dim,
                mlp_ratio=text["intermediate_size"] / text["hidden_size"],
                layer_norm_eps=text["layer_norm_eps"],
                activation=text["hidden_act"],
                # NOTE(ref): XCLIPTextModel pools at argmax(token ids) whatever config.json says; that is
                # the end-of-text token exactly when it is the vocabulary's last id, as in CLIP's BPE.
                eot_token_id=text["vocab_size"] - 1,
            ),
            embed_dim=dim,
            num_frames=vision["num_frames"],
            mit_layers=vision["mit_num_hidden_layers"],
            mit_heads=vision["mit_num_attention_heads"],
            mit_mlp_ratio=vision["mit_intermediate_size"] / dim,
            prompt_layers=top["prompt_layers"],
            prompt_heads=top["prompt_num_attention_heads"],
            prompt_alpha=top["prompt_alpha"],
            prompt_activation=top["prompt_hidden_act"],
            droppath=vision["drop_path_rate"],
            logit_scale_init=top["logit_scale_init_value"],
        )
    except ValueError as err:
        raise WeightFormatError(f"{source}: {err}") from None


# ------------------------------------------------------------------------------------- official X-CLIP

# Official names -> ours: the CLIP text tower moves under ``text.``; everything else keeps its name.
_OFFICIAL_RENAMES: list[tuple[str, str]] = [
    (r"(visual|mit|prompts_generator)\.(\S+)", r"\1.\2"),
    (r"prompts_visual_ln\.(weight|bias)", r"prompts_visual_ln.\1"),
    (r"prompts_visual_proj|logit_scale", r"\g<0>"),
    (r"token_embedding\.weight|positional_embedding|text_projection", r"text.\g<0>"),
    (r"(ln_final\.(?:weight|bias)|transformer\.resblocks\.\S+)", r"text.\1"),
]
# 0-dim entries of OpenAI's archives that some checkpoints carry along; not parameters.
_OFFICIAL_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def is_official_xclip(state: Tensors) -> bool:
    return (
        "prompts_generator.alpha" in state
        and "visual.conv1.weight" in state
        and "mit.positional_embedding" in state
    )


def _count(state: Tensors, prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})


def xclip_config_from_state(state: Tensors, source: str = "checkpoint", **heads: int | None) -> XCLIPConfig:
    """An :class:`XCLIPConfig` from tensor shapes (our names). ``heads`` may set ``vision_heads``,
    ``text_heads``, ``mit_heads`` and ``prompt_heads``; each defaults to width // 64."""
    try:
        width, _, patch, _ = state["visual.conv1.weight"].shape
        num_tokens = state["visual.positional_embedding"].shape[0]
        grid = square_grid_side(num_tokens, prefix=1)
        if grid is None:
            raise ValueError(f"{num_tokens} image position embeddings do not form a square grid")
        text_width = state["text.ln_final.weight"].shape[0]
        dim = state["text.text_projection"].shape[1]
        fields = dict(
            vision=VisionConfig(
                width=width,
                layers=_count(state, "visual.transformer.resblocks."),
                heads=heads.get("vision_heads") or max(width // 64, 1),
                patch_size=patch,
                image_size=grid * patch,
                mlp_ratio=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
                output_dim=state["visual.proj"].shape[1],
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
            ),
            text=TextConfig(
                width=text_width,
                layers=_count(state, "text.transformer.resblocks."),
                heads=heads.get("text_heads") or max(text_width // 64, 1),
                context_length=state["text.positional_embedding"].shape[0],
                vocab_size=state["text.token_embedding.weight"].shape[0],
                output_dim=dim,
                mlp_ratio=state["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
                eot_token_id=state["text.token_embedding.weight"].shape[0] - 1,  # pooled at argmax(ids)
            ),
            embed_dim=dim,
            num_frames=state["mit.positional_embedding"].shape[1],
            mit_layers=_count(state, "mit.resblocks."),
            mit_heads=heads.get("mit_heads") or max(dim // 64, 1),
            mit_mlp_ratio=state["mit.resblocks.0.mlp.c_fc.weight"].shape[0] / dim,
            prompt_layers=_count(state, "prompts_generator.decoder."),
            prompt_heads=heads.get("prompt_heads") or max(dim // 64, 1),
        )
        return XCLIPConfig(**fields)
    except KeyError as err:
        raise WeightFormatError(f"{source}: X-CLIP tensor {err} is missing") from None
    except ValueError as err:
        raise WeightFormatError(f"{source}: {err}") from None


# ------------------------------------------------------------------------------------------------ loading


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
    return path


def _preview(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_xclip_state(model: XCLIP, state: Tensors, source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line :class:`WeightFormatError` instead."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [
            f"missing {_preview(missing)}" if missing else "",
            f"unexpected {_preview(unexpected)}" if unexpected else "",
        ]
        raise WeightFormatError(
            f"{source}: does not match the X-CLIP model: {'; '.join(p for p in parts if p)}"
        )
    for key, tensor in expected.items():
        if tensor.shape != state[key].shape:
            raise WeightFormatError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)


def load_xclip(
    path: str | Path,
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    mit_heads: int | None = None,
    prompt_heads: int | None = None,
    **config_overrides: Any,
) -> XCLIP:
    """An :class:`XCLIP` in eval mode from a Hugging Face ``XCLIPModel`` folder or an official checkpoint.

    Head counts override what the file says (HF) or cannot say (official: width // 64 otherwise);
    ``config_overrides`` replace top-level :class:`XCLIPConfig` fields (e.g. ``droppath``, ``freeze_text``).
    """
    path = Path(path)
    state, info = read_state_dict(path)
    source = str(_weights_file(path))
    heads = dict(
        vision_heads=vision_heads, text_heads=text_heads, mit_heads=mit_heads, prompt_heads=prompt_heads
    )
    if "hf_config" in info:
        model_type = info["hf_config"].get("model_type")
        if model_type != "xclip":
            raise WeightFormatError(f"{source}: a Hugging Face {model_type!r} model, not an XCLIPModel")
        ours = hf_xclip_state_dict(state, source)
        config = xclip_config_from_hf(info["hf_config"], str(path / "config.json"))
        vision = {"heads": vision_heads} if vision_heads else {}
        text = {"heads": text_heads} if text_heads else {}
        extra = {k: v for k, v in (("mit_heads", mit_heads), ("prompt_heads", prompt_heads)) if v}
        try:
            config = dataclasses.replace(
                config,
                vision=dataclasses.replace(config.vision, **vision),
                text=dataclasses.replace(config.text, **text),
                **extra,
            )
        except ValueError as err:
            raise WeightFormatError(f"{source}: {err}") from None
    elif is_official_xclip(state):
        state = {k: v for k, v in state.items() if k not in _OFFICIAL_EXTRAS}
        ours = {k: v.float() for k, v in apply_renames(state, _OFFICIAL_RENAMES, source).items()}
        config = xclip_config_from_state(ours, source, **heads)
    else:
        raise WeightFormatError(
            f"{source}: not an X-CLIP checkpoint (expected a Hugging Face XCLIPModel folder, or official "
            "X-CLIP weights with visual.*, mit.* and prompts_generator.*)"
        )
    if config_overrides:
        try:
            config = dataclasses.replace(config, **config_overrides)
        except (TypeError, ValueError) as err:
            raise ValueError(f"load_xclip: {err}") from None
    model = XCLIP(config)
    load_xclip_state(model, ours, source)
    return model.eval()
