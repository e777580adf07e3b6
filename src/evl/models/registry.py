"""Building models from names, paths and checkpoints: the one place that turns a spec into a module."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from evl.config import (
    MODEL_PRESETS,
    VISION_PRESETS,
    DecoderConfig,
    ModelConfig,
    VisionConfig,
    model_preset,
    vision_preset,
)
from evl.models.clip_text import TEXT_PRESETS, CLIPTextTransformer, text_preset
from evl.models.clip_vit import CLIPVisionTransformer
from evl.models.encoders import create_encoder
from evl.models.evl import EVL
from evl.models.siglip_text import SigLIPTextTransformer
from evl.models.xclip import XCLIP, XCLIPConfig
from evl.text_tokenizers import TokenizerFormatError, load_tokenizer
from evl.tokenizer import default_tokenizer
from evl.weights import (
    DEFAULT_LOGIT_SCALE,
    SIGLIP_TEXT_MODEL_TYPES,
    WeightFormatError,
    load_clip_vision,
    load_official_evl,
    read_clip_text,
    read_siglip_text,
    read_vision,
)

# File names OpenAI publishes its checkpoints under (and ``clip.load`` caches them as).
OPENAI_FILE_NAMES = {
    "ViT-B/32": "ViT-B-32.pt",
    "ViT-B/16": "ViT-B-16.pt",
    "ViT-L/14": "ViT-L-14.pt",
    "ViT-L/14@336": "ViT-L-14-336px.pt",
}


# Hugging Face repositories of the other encoder presets: found offline as a folder named after the
# repository (``siglip-base-patch16-224/``) in a search directory, or in the Hugging Face hub cache.
HF_REPOS = {
    "SigLIP-B/16": "google/siglip-base-patch16-224",
    "SigLIP-L/16@256": "google/siglip-large-patch16-256",
    "SigLIP-So400m/14@384": "google/siglip-so400m-patch14-384",
    "SigLIP2-B/16": "google/siglip2-base-patch16-224",
    "SigLIP2-L/16@256": "google/siglip2-large-patch16-256",
    "SigLIP2-So400m/14@384": "google/siglip2-so400m-patch14-384",
    "DINOv2-S/14": "facebook/dinov2-small",
    "DINOv2-B/14": "facebook/dinov2-base",
    "DINOv2-L/14": "facebook/dinov2-large",
    "DINOv2-S/14-reg": "facebook/dinov2-with-registers-small",
    "DINOv2-B/14-reg": "facebook/dinov2-with-registers-base",
    "DINOv2-L/14-reg": "facebook/dinov2-with-registers-large",
}


class OfflineWeightsError(FileNotFoundError):
    """Pretrained weights were asked for by name and no local copy exists (nothing is downloaded)."""


def weight_search_dirs() -> list[Path]:
    """Where a preset name is looked up: $EVL_WEIGHTS_DIR, then the cache folder OpenAI's ``clip`` uses."""
    dirs = [Path(p) for p in os.environ.get("EVL_WEIGHTS_DIR", "").split(os.pathsep) if p]
    return [*dirs, Path.home() / ".cache" / "clip"]


def hf_hub_cache() -> Path:
    """The Hugging Face hub's download cache ($HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def _hub_snapshot(repo: str) -> Path | None:
    """The newest downloaded snapshot of ``repo`` in the hub cache (models--ORG--NAME/snapshots/REV)."""
    snapshots = hf_hub_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"
    found = [d for d in snapshots.glob("*") if (d / "config.json").is_file()] if snapshots.is_dir() else []
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


def find_local_weights(name: str) -> Path:
    """The local copy of a preset's published weights; nothing is downloaded."""
    if name in HF_REPOS:
        return _find_hf_folder(name, HF_REPOS[name])
    file_name = OPENAI_FILE_NAMES.get(name)
    if file_name is None:
        raise OfflineWeightsError(
            f"no pretrained weights are published for {name!r}; "
            f"use 'random:{name}' for a random-init backbone"
        )
    for folder in weight_search_dirs():
        if (folder / file_name).is_file():
            return folder / file_name
    searched = ", ".join(str(d) for d in weight_search_dirs())
    raise OfflineWeightsError(
        f"pretrained {name} weights not found locally ({file_name} in {searched}); evl does not download: "
        f"fetch OpenAI's {file_name} (or any open_clip / Hugging Face CLIP checkpoint) and pass its path, "
        f"or set EVL_WEIGHTS_DIR, or use 'random:{name}'"
    )


def _find_hf_folder(name: str, repo: str) -> Path:
    folder_name = repo.split("/")[-1]
    for folder in weight_search_dirs():
        if (folder / folder_name / "config.json").is_file():
            return folder / folder_name
    if (snapshot := _hub_snapshot(repo)) is not None:
        return snapshot
    searched = ", ".join(str(d) for d in [*weight_search_dirs(), hf_hub_cache()])
    raise OfflineWeightsError(
        f"pretrained {name} weights not found locally ({folder_name}/ in {searched}); evl does not download: "
        f"fetch the Hugging Face folder {repo} (config.json and model.safetensors) and pass its path, "
        f"or put it in EVL_WEIGHTS_DIR as {folder_name}/, or use 'random:{name}'"
    )


def create_backbone(
    spec: str | Path,
    heads: int | None = None,
    activation: str | None = None,
    image_size: int | None = None,
) -> tuple[nn.Module, str]:
    """An image encoder from ``NAME`` (local pretrained copy), ``random:NAME`` or a checkpoint ``PATH`` of
    any supported family (:func:`evl.weights.read_vision`).

    Returns the module and a display name. Loading is strict: every tensor is used and none is missing.
    """
    spec = str(spec)
    overrides = {"heads": heads, "activation": activation, "image_size": image_size}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if spec.startswith("random:"):
        name = spec[len("random:") :]
        return create_encoder(vision_preset(name, **overrides)), name
    if spec in VISION_PRESETS and not Path(spec).exists():
        path = find_local_weights(spec)
    else:
        path = Path(spec)
        if not path.exists():
            known = ", ".join(VISION_PRESETS)
            raise FileNotFoundError(
                f"backbone {spec!r} is neither a file or folder nor a preset name ({known}); "
                "random-init backbones are written random:NAME"
            )
    config, state = read_vision(path, heads=heads, activation=activation, image_size=image_size)
    module = create_encoder(config)
    load_strict(module, state, str(path), "image encoder")
    return module, str(path)


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """``module.load_state_dict(state, strict=True)``; a mismatch is one :class:`WeightFormatError` line."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightFormatError(
            f"{source}: the {what} does not fit its {type(module).__name__} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise WeightFormatError(f"{source}: {what} tensors have the wrong shapes ({detail})") from None


def create_model(
    name: str = "evl-b16",
    num_classes: int = 400,
    backbone: str | Path | nn.Module | None = None,
    **decoder_overrides: Any,
) -> EVL:
    """An EVL model from a preset, e.g. ``create_model("evl-b16", num_classes=400, backbone="ViT-B-16.pt")``.

    ``backbone`` may be a path, a preset name with local weights, ``random:NAME``, or a module; ``None``
    gives the preset's backbone at random initialisation.
    """
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_PRESETS)}")
    config = model_preset(name, num_classes=num_classes, **decoder_overrides)
    module: nn.Module | None
    if backbone is None:
        module = None
    elif isinstance(backbone, nn.Module):
        module = backbone
    else:
        module, backbone_name = create_backbone(backbone)
        config = dataclasses.replace(config, backbone_name=backbone_name)
    if module is not None:
        config = dataclasses.replace(config, backbone=module.config)
    return EVL(config, module)


def load_official_checkpoint(
    checkpoint: str | Path,
    backbone: str | Path | nn.Module,
    backbone_heads: int | None = None,
    **decoder_overrides: Any,
) -> EVL:
    """An official EVL training checkpoint plus its CLIP backbone -> an :class:`EVL` in eval mode.

    The decoder's shape (layers, frames, classes, which temporal modules) is read from the checkpoint; the
    decoder's head count (not stored) defaults to the backbone's, as the official code builds it.
    """
    state, fields = load_official_evl(checkpoint)
    if isinstance(backbone, nn.Module):
        module, backbone_name = backbone, "module"
    else:
        module, backbone_name = create_backbone(backbone, heads=backbone_heads)
    vision: VisionConfig = module.config
    width = state["decoder.query"].shape[0]
    if width != vision.width:
        raise ValueError(
            f"{checkpoint}: decoder width {width} does not match the backbone's width {vision.width} "
            f"({backbone_name})"
        )
    if "decoder.cross_attention.0.w_prev" in state:
        rows = state["decoder.cross_attention.0.w_prev"].shape[0]
        expected = (2 * vision.grid_size - 1) ** 2
        if rows != expected:
            raise ValueError(
                f"{checkpoint}: cross-attention tables have {rows} offsets, the backbone's "
                f"{vision.grid_size}x{vision.grid_size} grid needs {expected} "
                "(different image size or patch?)"
            )
    decoder = DecoderConfig(**{**fields, **decoder_overrides})
    config = ModelConfig(backbone=vision, decoder=decoder, backbone_name=backbone_name)
    model = EVL(config, module)
    model.load_trainable_state_dict(state, source=str(checkpoint))
    return model.eval()


# ------------------------------------------------------------------------------------- both CLIP towers


class CLIPTowers(NamedTuple):
    """An image-text model's two encoders (CLIP's, MetaCLIP 2's or SigLIP's), its logit scale (log of the
    logit temperature), SigLIP's logit bias (None for CLIP) and the tokenizer its text encoder reads."""

    visual: nn.Module
    text: nn.Module
    logit_scale: float
    name: str
    logit_bias: float | None = None
    tokenizer: Callable[..., torch.Tensor] | None = None  # None: CLIP's BPE (evl.tokenizer)


def load_clip_text(path: str | Path, **overrides: Any) -> tuple[CLIPTextTransformer, float]:
    """A CLIP text encoder from any format :func:`evl.weights.read_clip_text` reads, loaded strict.

    Returns the float32 module and the checkpoint's ``logit_scale`` (see
    :func:`evl.weights.read_clip_text`). ``overrides`` set :class:`TextConfig` fields the file cannot tell
    or that should differ (``heads``, ``activation``, ``eot_token_id``, ...); OpenAI and open_clip files
    store neither heads nor activation. Any mismatch with the module is a one-line :class:`WeightFormatError`.
    """
    config, text, logit_scale = read_clip_text(path, **overrides)
    model = CLIPTextTransformer(config)
    load_strict(model, text, str(path), "text encoder")
    return model, logit_scale


def load_siglip_text(path: str | Path, **overrides: Any) -> tuple[SigLIPTextTransformer, float, float]:
    """The text encoder of a Hugging Face SigLIP or SigLIP 2 folder, loaded strict.

    Returns the float32 module, the model's ``logit_scale`` and its ``logit_bias`` (see
    :func:`evl.weights.read_siglip_text`). Any mismatch with the module is a one-line
    :class:`WeightFormatError`.
    """
    config, text, logit_scale, logit_bias = read_siglip_text(path, **overrides)
    model = SigLIPTextTransformer(config)
    load_strict(model, text, str(path), "text encoder")
    return model, logit_scale, logit_bias


class TextTower(NamedTuple):
    """A checkpoint's text encoder with the tokenizer it was trained with and the scale (and bias) of its
    image-text scores."""

    text: nn.Module  # token ids [N, L] -> embeddings [N, D] (CLIPTextTransformer or SigLIPTextTransformer)
    tokenizer: Callable[..., torch.Tensor]  # texts -> ids [N, context_length], called as CLIP's tokenizer
    logit_scale: float  # log of the logit temperature
    # SigLIP: scores are sigmoid(exp(logit_scale) * cos + logit_bias), per pair. None: CLIP's softmax over
    # the candidates of exp(logit_scale) * cos.
    logit_bias: float | None
    name: str


# Hugging Face model types of CLIP-like towers that need the folder's own tokenizer (another vocabulary than
# CLIP's BPE). SigLIP folders always use theirs.
_FOLDER_TOKENIZER_MODEL_TYPES = ("metaclip_2", "metaclip_2_text_model")


def _folder_model_type(path: Path) -> str | None:
    """A Hugging Face folder's ``model_type`` (None for anything else)."""
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        return None


def _folder_tokenizer(path: Path, text: nn.Module, pooled_id: int | None) -> Callable[..., torch.Tensor]:
    """The folder's tokenizer, checked against the text tower it feeds."""
    try:
        tokenizer = load_tokenizer(path, context_length=text.config.context_length)
    except TokenizerFormatError as err:
        raise WeightFormatError(str(err)) from None
    if tokenizer.vocab_size > text.config.vocab_size:
        raise WeightFormatError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} ids, the text encoder embeds "
            f"{text.config.vocab_size}; they do not belong together"
        )
    if pooled_id is not None and tokenizer.eos_token_id != pooled_id:
        raise WeightFormatError(
            f"{path}: the text encoder pools at token id {pooled_id}, but the tokenizer ends texts with "
            f"{tokenizer.eos_token_id}"
        )
    return tokenizer


def load_text_tower(path: str | Path) -> TextTower:
    """A checkpoint's text side, ready to score class names: the text encoder (loaded strict), its tokenizer
    and the logit scale and bias, from

    * a Hugging Face SigLIP / SigLIP 2 folder: :class:`SigLIPTextTransformer`, the folder's tokenizer
      (``spiece.model`` or ``tokenizer.json``) padding to the tower's 64 positions, scale and bias;
    * a Hugging Face MetaCLIP 2 folder: :class:`CLIPTextTransformer` pooled at ``</s>``, the folder's XLM-R
      ``tokenizer.json``, the scale;
    * any other file :func:`load_clip_text` reads: CLIP's text encoder and CLIP's BPE tokenizer
      (:func:`evl.tokenizer.default_tokenizer`), the scale.

    Nothing is downloaded; a missing or mismatched part is a one-line :class:`WeightFormatError`.
    """
    path = Path(path)
    model_type = _folder_model_type(path)
    if model_type in SIGLIP_TEXT_MODEL_TYPES:
        siglip, logit_scale, logit_bias = load_siglip_text(path)
        return TextTower(siglip, _folder_tokenizer(path, siglip, None), logit_scale, logit_bias, str(path))
    text, logit_scale = load_clip_text(path)
    if model_type in _FOLDER_TOKENIZER_MODEL_TYPES:
        tokenizer = _folder_tokenizer(path, text, text.config.eot_token_id)
    else:
        tokenizer = default_tokenizer()
    return TextTower(text, tokenizer, logit_scale, None, str(path))


def create_clip(
    spec: str | Path,
    heads: int | None = None,
    text_heads: int | None = None,
    mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> CLIPTowers:
    """Both encoders of a CLIP model from ``NAME`` (local pretrained copy), ``random:NAME`` or a ``PATH``
    in any format :func:`evl.weights.load_clip_vision` reads (OpenAI, open_clip, Hugging Face ``CLIPModel``).

    ``mean_std`` replaces the image encoder's normalisation statistics (a method choice, not a weight).
    """
    spec = str(spec)
    if spec.startswith("random:"):
        name = spec[len("random:") :]
        if name not in TEXT_PRESETS:
            raise ValueError(f"no text encoder preset for {name!r}; known: {', '.join(TEXT_PRESETS)}")
        vision = vision_preset(name, **({"heads": heads} if heads else {}))
        text = text_preset(name, **({"heads": text_heads} if text_heads else {}))
        visual = CLIPVisionTransformer(_with_mean_std(vision, mean_std))
        # Rounded to float32, as a saved checkpoint stores it: the same value drawn or read back.
        logit_scale = float(torch.tensor(DEFAULT_LOGIT_SCALE, dtype=torch.float32))
        return CLIPTowers(visual, CLIPTextTransformer(text), logit_scale, name)
    path = find_local_weights(spec) if spec in VISION_PRESETS and not Path(spec).exists() else Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"CLIP weights {spec!r} are neither a file or folder nor a preset name "
            f"({', '.join(VISION_PRESETS)}); random-init models are written random:NAME"
        )
    if _folder_model_type(path) in _TOWER_FOLDER_MODEL_TYPES:
        return _towers_from_folder(path, mean_std)
    config, state = load_clip_vision(path, heads=heads)
    visual = CLIPVisionTransformer(_with_mean_std(config, mean_std))
    visual.load_state_dict(state, strict=True)
    try:
        text, logit_scale = load_clip_text(path, **({"heads": text_heads} if text_heads else {}))
    except WeightFormatError as err:
        raise WeightFormatError(
            f"{err} (this method matches videos against class names: it needs a full CLIP checkpoint "
            "with its text encoder, not an image encoder alone)"
        ) from None
    return CLIPTowers(visual, text, logit_scale, str(path))


# Hugging Face image-text folders that ship their own tokenizer (and, for SigLIP, a logit bias).
_TOWER_FOLDER_MODEL_TYPES = ("siglip", "siglip2", "metaclip_2")


def _towers_from_folder(
    path: Path, mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None
) -> CLIPTowers:
    """Both towers of a SigLIP, SigLIP 2 or MetaCLIP 2 folder, with its tokenizer and scale (and bias)."""
    config, state = read_vision(path)
    visual = create_encoder(_with_mean_std(config, mean_std))
    load_strict(visual, state, str(path), "image encoder")
    tower = load_text_tower(path)
    return CLIPTowers(visual, tower.text, tower.logit_scale, str(path), tower.logit_bias, tower.tokenizer)


def _with_mean_std(
    config: VisionConfig, mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None
) -> VisionConfig:
    if mean_std is None:
        return config
    return dataclasses.replace(config, mean=tuple(mean_std[0]), std=tuple(mean_std[1]))


def clip_state_dict(towers: CLIPTowers) -> dict[str, torch.Tensor]:
    """Both towers as one OpenAI-layout state dict (``visual.*``, the text tower at the top level,
    ``logit_scale``): what :func:`create_clip` reads back from a file."""
    state = {f"visual.{k}": v for k, v in towers.visual.state_dict().items()}
    state.update(towers.text.state_dict())
    state["logit_scale"] = torch.tensor(float(towers.logit_scale))
    return {k: v.detach().contiguous() for k, v in state.items()}


def xclip_from_clip(towers: CLIPTowers, num_frames: int, **fields: Any) -> XCLIP:
    """An X-CLIP model initialised from CLIP, as X-CLIP starts training: the image and text encoders and
    the logit scale from ``towers``; the message tokens, integration transformer and prompt generator new.

    ``fields`` set other :class:`XCLIPConfig` fields (``mit_layers``, ``prompt_alpha``, ...).
    """
    vision, text = towers.visual.config, towers.text.config
    visual, text_tower = towers.visual, towers.text
    if not (isinstance(visual, CLIPVisionTransformer) and isinstance(text_tower, CLIPTextTransformer)):
        # Its cross-frame message tokens run inside CLIP's image blocks, and its prompts feed CLIP's text.
        raise ValueError(
            f"X-CLIP is built on CLIP's image and text encoders; {towers.name} has a {vision.family} image "
            "encoder (its text towers take zero-shot and ViFi-CLIP tuning: method.name zeroshot or vifi)"
        )
    if vision.output_dim is None or text.output_dim != vision.output_dim:
        raise ValueError(
            f"X-CLIP needs image and text embeddings of one size; this CLIP has {vision.output_dim} "
            f"and {text.output_dim}"
        )
    dim = vision.output_dim
    config = XCLIPConfig(
        vision=vision,
        text=text,
        embed_dim=dim,
        num_frames=num_frames,
        # The reference gives both small transformers embed_dim // 64 heads.
        mit_heads=max(1, dim // 64),
        prompt_heads=max(1, dim // 64),
        logit_scale_init=towers.logit_scale,
        **fields,
    )
    model = XCLIP(config)
    missing, unexpected = model.visual.load_state_dict(towers.visual.state_dict(), strict=False)
    new = [k for k in missing if ".message_" not in k]
    if new or unexpected:
        raise RuntimeError(
            f"CLIP image encoder does not fit X-CLIP's: missing {new[:3]}, unexpected {unexpected[:3]}"
        )
    model.text.load_state_dict(towers.text.state_dict(), strict=True)
    return model
