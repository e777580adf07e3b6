"""Reading checkpoints in every real CLIP format, and mapping them onto this project's parameter names.

Formats, detected from the file itself (never from its name alone):

* OpenAI CLIP TorchScript archive (``ViT-B-16.pt`` as OpenAI ships it) and OpenAI plain state dicts;
* open_clip checkpoints (``.bin``/``.pt``/``.safetensors``, with or without a ``state_dict`` wrapper or a
  ``module.`` prefix) and open_clip hub folders (``open_clip_model.safetensors`` + ``open_clip_config.json``);
* Hugging Face ``transformers`` CLIP folders (``CLIPModel``, ``CLIPVisionModel``, ``CLIPTextModel`` or
  ``CLIPTextModelWithProjection``: ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``);
* official EVL training checkpoints (``{'model': {'module.decoder...', 'module.proj...'}}``).

The image encoder (:func:`load_clip_vision`) and the text encoder (:func:`load_clip_text`) are read from
each CLIP format. Pickles are opened with ``torch.load(weights_only=True)``: a file that would need to run
code is refused. Every other naming scheme maps to ours through one ordered rename table per source.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors

from evl.config import CLIP_MEAN, CLIP_STD, DecoderConfig, VisionConfig
from evl.models.clip_text import CLIPTextTransformer, TextConfig

Tensors = dict[str, torch.Tensor]


class WeightFormatError(ValueError):
    """A checkpoint that cannot be read, or does not hold what the caller asked for."""


# ----------------------------------------------------------------------------------------- raw reading

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    # A TorchScript archive carries its compiled code; a torch.save zip only data.pkl and tensors.
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightFormatError(
            f"{path}: refused to load: the pickle needs to run code or build objects that are not plain "
            f"tensors ({first}). Only safetensors and tensor-only pickles are accepted."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise WeightFormatError(f"{path}: not a readable PyTorch checkpoint ({err})") from None


def _read_torchscript(path: Path) -> Tensors:
    try:
        with warnings.catch_warnings():
            # torch.jit is deprecated, yet it is the only reader of OpenAI's published archives.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise WeightFormatError(f"{path}: damaged TorchScript archive ({str(err).splitlines()[0]})") from None
    # The three 0-dim integer entries of OpenAI's archives are not parameters.
    return {
        k: v
        for k, v in module.state_dict().items()
        if k not in ("input_resolution", "context_length", "vocab_size")
    }


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def read_state_dict(path: str | Path) -> tuple[Tensors, dict[str, Any]]:
    """Read any supported file or folder into (flat tensor dict, side information).

    Side information holds ``format`` and, for folders, the parsed JSON config (``hf_config`` or
    ``open_clip_config``). Wrappers (``state_dict``, ``model``) and a DDP ``module.`` prefix are removed.
    """
    path = Path(path)
    if not path.exists():
        raise WeightFormatError(f"{path}: no such file or directory")
    info: dict[str, Any] = {}
    if path.is_dir():
        if (path / "config.json").is_file() and (weights := _first_existing(path, _HF_WEIGHT_FILES)):
            info.update(format="huggingface", hf_config=json.loads((path / "config.json").read_text()))
        elif weights := _first_existing(path, _OPEN_CLIP_WEIGHT_FILES):
            info["format"] = "open_clip"
            if (cfg := path / "open_clip_config.json").is_file():
                info["open_clip_config"] = json.loads(cfg.read_text())
        else:
            raise WeightFormatError(
                f"{path}: a folder without CLIP weights (expected config.json + model.safetensors or "
                "pytorch_model.bin, or open_clip_model.safetensors)"
            )
        path = weights
    if path.stat().st_size == 0:
        raise WeightFormatError(f"{path}: empty file")
    with path.open("rb") as f:
        magic = f.read(8)
    if path.suffix == ".safetensors":
        try:
            obj: Any = load_safetensors(str(path))
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise WeightFormatError(f"{path}: damaged safetensors file ({err})") from None
        info.setdefault("format", "safetensors")
    elif _is_torchscript(path):
        obj = _read_torchscript(path)
        info.setdefault("format", "openai-torchscript")
    elif magic[:2] == b"PK" or magic[:1] == b"\x80":
        obj = _torch_load(path)
        info.setdefault("format", "pickle")
    else:
        raise WeightFormatError(
            f"{path}: unrecognised file (not safetensors, a PyTorch checkpoint or a TorchScript archive)"
        )
    return _unwrap(obj, path), info


def _unwrap(obj: Any, path: Path) -> Tensors:
    """Peel training-checkpoint wrappers down to one flat {name: tensor} dict."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise WeightFormatError(f"{path}: holds no state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightFormatError(f"{path}: holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def apply_renames(state: Tensors, table: list[tuple[str, str]], source: str) -> Tensors:
    """Rename every key through the first matching (regex, replacement) row; an unmatched key is an error."""
    out: Tensors = {}
    for key, value in state.items():
        for pattern, replacement in table:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise WeightFormatError(f"{source}: unexpected key {key!r}")
    return out


# ------------------------------------------------------------------ Hugging Face names (both towers)


def _hf_block_renames(tower: str) -> list[tuple[str, str]]:
    """Rows for one HF CLIP encoder's blocks (``tower`` is ``vision_model`` or ``text_model``)."""
    layer, block = rf"{tower}\.encoder\.layers\.(\d+)", r"transformer.resblocks.\1"
    return [
        (rf"{layer}\.layer_norm1\.(weight|bias)", rf"{block}.ln_1.\2"),
        (rf"{layer}\.layer_norm2\.(weight|bias)", rf"{block}.ln_2.\2"),
        (rf"{layer}\.mlp\.fc1\.(weight|bias)", rf"{block}.mlp.c_fc.\2"),
        (rf"{layer}\.mlp\.fc2\.(weight|bias)", rf"{block}.mlp.c_proj.\2"),
        (rf"{layer}\.self_attn\.out_proj\.(weight|bias)", rf"{block}.attn.out_proj.\2"),
        (rf"{layer}\.self_attn\.([qkv])_proj\.(weight|bias)", rf"{block}.attn.\2_proj.\3"),
    ]


def _merge_qkv(state: Tensors) -> Tensors:
    """Separate ``attn.{q,k,v}_proj`` -> OpenAI's fused ``attn.in_proj_{weight,bias}`` (q, k, v stacked)."""
    out = dict(state)
    for prefix in sorted({k.rsplit(".attn.", 1)[0] for k in out if re.search(r"\.attn\.[qkv]_proj\.", k)}):
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{prefix}.attn.{n}_proj.{kind}") for n in "qkv"]
            out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return out


# ------------------------------------------------------------------------------ CLIP image encoder

# Hugging Face CLIP vision tower -> OpenAI names. q/k/v are merged and the projection transposed separately.
_HF_VISION_RENAMES: list[tuple[str, str]] = [
    (r"vision_model\.embeddings\.class_embedding", "class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "conv1.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"ln_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"ln_post.\1"),
    *_hf_block_renames("vision_model"),
]


def _hf_vision_to_openai(state: Tensors, source: str) -> Tensors:
    vision = {
        k: v for k, v in state.items() if k.startswith("vision_model.") and not k.endswith("position_ids")
    }
    out = _merge_qkv(apply_renames(vision, _HF_VISION_RENAMES, source))
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
    grid = round((num_tokens - 1) ** 0.5)
    if grid * grid != num_tokens - 1:
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


def _open_clip_fields(cfg: dict[str, Any]) -> dict[str, Any]:
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
    old = round((pos.shape[0] - 1) ** 0.5)
    if old == grid:
        return pos
    patch = pos[1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
    return torch.cat([pos[:1], patch], dim=0)


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
    source = str(path)
    visual = clip_visual_state_dict(state, source)
    fields: dict[str, Any] = {"mean": CLIP_MEAN, "std": CLIP_STD}
    if "hf_config" in info:
        fields.update(_hf_vision_fields(info["hf_config"]))
    if "open_clip_config" in info:
        fields.update(_open_clip_fields(info["open_clip_config"]))
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


# ------------------------------------------------------------------------------- CLIP text encoder

# Hugging Face CLIP text tower -> OpenAI names (the top level of OpenAI's ``CLIP``). q/k/v are merged and
# ``text_projection`` transposed afterwards.
_HF_TEXT_RENAMES: list[tuple[str, str]] = [
    (r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"ln_final.\1"),
    *_hf_block_renames("text_model"),
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
    out = _merge_qkv(apply_renames(text, _HF_TEXT_RENAMES, source))
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


def _hf_text_fields(hf_config: dict[str, Any], source: str) -> dict[str, Any]:
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
    # NOTE(ref): transformers pools at the first ``eos_token_id``, except when it is 2 (configs written before
    # its fix, e.g. openai/clip-vit-base-patch32): then at argmax(token ids), which the default of
    # infer_text_config (the vocabulary's last id, CLIP's end-of-text) reproduces.
    if isinstance(eos, int) and eos != 2:
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


def read_logit_scale(path: str | Path) -> float:
    """A CLIP checkpoint's ``logit_scale``: the log of the logit temperature as stored (about ln 100 for
    trained models), or CLIP's initial ln(1 / 0.07) when the format stores none (e.g. ``CLIPTextModel``)."""
    state, _ = read_state_dict(path)
    return _logit_scale(state, str(path))


def load_clip_text(path: str | Path, **overrides: Any) -> tuple[CLIPTextTransformer, float]:
    """Read a CLIP text encoder from any supported format and load it strict.

    Returns the float32 module and the checkpoint's ``logit_scale`` (see :func:`read_logit_scale`).
    ``overrides`` set :class:`TextConfig` fields the file cannot tell or that should differ (``heads``,
    ``activation``, ``eot_token_id``, ...); OpenAI and open_clip files store neither heads nor activation.
    """
    state, info = read_state_dict(path)
    source = str(path)
    text = clip_text_state_dict(state, source)
    fields: dict[str, Any] = {}
    if "hf_config" in info:
        fields.update(_hf_text_fields(info["hf_config"], source))
    if "open_clip_config" in info:
        fields.update(_open_clip_text_fields(info["open_clip_config"], source))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    config = infer_text_config(text, source, **fields)
    model = CLIPTextTransformer(config)
    # OpenAI's archives are mixed precision (fp16 matmul weights): compute in float32.
    text = {k: v.float() for k, v in text.items()}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(text)), sorted(set(text) - expected)
    if missing or unexpected:
        raise WeightFormatError(
            f"{source}: the text encoder does not fit CLIP's text transformer "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    try:
        model.load_state_dict(text, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise WeightFormatError(f"{source}: text encoder tensors have the wrong shapes ({detail})") from None
    return model, _logit_scale(state, source)


# ------------------------------------------------------------------------------- official EVL checkpoints

# Official EVL names -> ours (after the DDP ``module.`` prefix is gone).
_OFFICIAL_EVL_RENAMES: list[tuple[str, str]] = [
    (r"decoder\.cls_token", "decoder.query"),
    (r"decoder\.decoder_layers\.(\d+)\.(.+)", r"decoder.layers.\1.\2"),
    (r"decoder\.temporal_conv\.(\d+)\.(weight|bias)", r"decoder.temporal_conv.\1.\2"),
    (r"decoder\.temporal_pos_embed\.(\d+)", r"decoder.temporal_pos_embed.\1.embed"),
    (r"decoder\.cross_attention\.(\d+)\.w1", r"decoder.cross_attention.\1.w_prev"),
    (r"decoder\.cross_attention\.(\d+)\.w2", r"decoder.cross_attention.\1.w_next"),
    (r"proj\.0\.(weight|bias)", r"head.norm.\1"),
    (r"proj\.2\.(weight|bias)", r"head.fc.\1"),
]


def is_official_evl(state: Tensors) -> bool:
    return "decoder.cls_token" in state and any(k.startswith("proj.") for k in state)


def load_official_evl(path: str | Path) -> tuple[Tensors, dict[str, Any]]:
    """An official EVL checkpoint -> (our decoder/head state dict, inferred :class:`DecoderConfig` fields)."""
    state, _ = read_state_dict(path)
    source = str(path)
    if not is_official_evl(state):
        raise WeightFormatError(
            f"{source}: not an official EVL checkpoint (expected module.decoder.cls_token and module.proj.*)"
        )
    ours = {k: v.float() for k, v in apply_renames(state, _OFFICIAL_EVL_RENAMES, source).items()}
    return ours, infer_decoder_fields(ours, source)


def infer_decoder_fields(state: Tensors, source: str = "checkpoint") -> dict[str, Any]:
    """DecoderConfig fields readable from a decoder/head state dict (ours)."""
    layers = {int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise WeightFormatError(f"{source}: decoder layers are missing or not numbered 0..M-1")
    width = state["decoder.query"].shape[0]
    fields: dict[str, Any] = dict(
        num_layers=len(layers),
        num_classes=state["head.fc.weight"].shape[0],
        mlp_ratio=state["decoder.layers.0.mlp.fc1.weight"].shape[0] / width,
        temporal_conv="decoder.temporal_conv.0.weight" in state,
        temporal_pos_embed="decoder.temporal_pos_embed.0.embed" in state,
        temporal_cross_attention="decoder.cross_attention.0.w_prev" in state,
    )
    if fields["temporal_pos_embed"]:
        fields["num_frames"] = state["decoder.temporal_pos_embed.0.embed"].shape[0]
    DecoderConfig(**fields)  # validates
    return fields
