"""The four video methods as the engine sees them: how a run config becomes a model, what the run directory
records about it, how it is optimised, and how class names become its classifier.

* ``evl``: frozen CLIP image encoder + EVL decoder + linear head (a fixed class list);
* ``vifi``: ViFi-CLIP, both CLIP encoders fine-tuned (or one of them), classes matched by text;
* ``xclip``: X-CLIP, from a CLIP checkpoint (new modules initialised) or an X-CLIP one;
* ``zeroshot``: CLIP as it is, classes matched by text, nothing trained.

Every model built here takes videos [B, T, 3, H, W] and returns logits [B, K], and exposes
``vision_config``, ``num_classes``, ``trainable_state_dict`` and ``load_trainable_state_dict``; the text
methods also ``set_class_tokens``, so any class list can be evaluated without retraining.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from evl.config import VISION_PRESETS, MethodConfig, ModelConfig, RunConfig, to_dict, vision_preset
from evl.engine.optim import adamw, build_optimizer
from evl.io import atomic_path
from evl.models.clip_text import TEXT_PRESETS
from evl.models.clip_vit import CLIPVisionTransformer
from evl.models.evl import EVL
from evl.models.registry import CLIPTowers, clip_state_dict, create_backbone, create_clip, xclip_from_clip
from evl.models.vificlip import VIFI_BETAS, VIFI_TEMPLATE, ZEROSHOT_TEMPLATE, VideoCLIP, build_prompts
from evl.models.xclip import XCLIP, xclip_param_groups
from evl.models.xclip_weights import is_official_xclip, load_xclip
from evl.tokenizer import default_tokenizer
from evl.weights import read_state_dict

BACKBONE_FILE = "backbone.safetensors"

# AdamW betas when train.betas is not set: EVL's trainer uses torch's defaults; X-CLIP and ViFi-CLIP 0.98.
DEFAULT_BETAS = {"evl": (0.9, 0.999), "vifi": VIFI_BETAS, "xclip": (0.9, 0.98), "zeroshot": VIFI_BETAS}


@dataclass
class BuiltModel:
    """A model and its description for ``config.json`` (``model``), which checkpoints must match."""

    model: nn.Module
    payload: dict[str, Any]


# ------------------------------------------------------------------------------------------------ prompts


def templates_for(method: MethodConfig) -> tuple[str, ...]:
    """The class-prompt templates of a text method: the configured ones, or the method's own."""
    if method.templates is not None:
        return tuple(method.templates)
    # NOTE(ref): X-CLIP and vanilla zero-shot CLIP prompt with the bare class name; ViFi-CLIP with
    # "a photo of a {}.".
    return (VIFI_TEMPLATE,) if method.name == "vifi" else (ZEROSHOT_TEMPLATE,)


def set_classes(model: nn.Module, method: MethodConfig, classes: Sequence[str]) -> None:
    """Make ``classes`` the classes a text method's model predicts (EVL: the count must match its head)."""
    if not method.uses_text:
        if len(classes) != model.num_classes:
            raise ValueError(
                f"this EVL model has a classifier of {model.num_classes} classes and cannot predict "
                f"{len(classes)}; a different class list needs a text-matching method "
                "(--method vifi, xclip or zeroshot)"
            )
        return
    templates = templates_for(method)
    prompts = [p for per_class in build_prompts(classes, templates) for p in per_class]
    context = model.text.config.context_length
    tokens = default_tokenizer()(prompts, context_length=context)
    model.set_class_tokens(tokens, num_templates=len(templates))


def inference_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """Inside, a text method encodes its class prompts once (even when its text encoder trains)."""
    text_cache = getattr(model, "text_cache", None)
    return text_cache() if text_cache is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------- building


def build_backbone(run: RunConfig, run_dir: Path | None) -> tuple[CLIPVisionTransformer, str]:
    """EVL's image encoder; a random-init one is saved into the run so later commands get the same one."""
    saved = run_dir / BACKBONE_FILE if run_dir is not None else None
    if saved is not None and saved.is_file():
        name = run.backbone.name.removeprefix("random:")
        heads = run.backbone.heads or (vision_preset(name).heads if name in VISION_PRESETS else None)
        module, _ = create_backbone(saved, heads=heads)
        return module, name
    module, name = create_backbone(run.backbone.name, heads=run.backbone.heads)
    if saved is not None and run.backbone.name.startswith("random:"):
        _save_atomic(saved, {k: v.contiguous() for k, v in module.state_dict().items()})
    return module, name


def model_config_for(
    run: RunConfig, backbone: CLIPVisionTransformer, num_classes: int, name: str
) -> ModelConfig:
    decoder = dataclasses.replace(run.decoder, num_frames=run.data.num_frames, num_classes=num_classes)
    return ModelConfig(
        backbone=backbone.config,
        decoder=decoder,
        backbone_name=name,
        freeze_backbone=run.backbone.freeze,
        backbone_dtype=run.backbone.dtype,
    )


def build_clip(run: RunConfig, run_dir: Path | None) -> CLIPTowers:
    """Both CLIP encoders of a text method; random-init ones are saved into the run (OpenAI layout)."""
    saved = run_dir / BACKBONE_FILE if run_dir is not None else None
    spec, method = run.backbone.name, run.method
    name = spec.removeprefix("random:")
    heads, text_heads = run.backbone.heads, method.text_heads
    if saved is not None and saved.is_file():
        heads = heads or (vision_preset(name).heads if name in VISION_PRESETS else None)
        text_heads = text_heads or (TEXT_PRESETS[name]["heads"] if name in TEXT_PRESETS else None)
        spec = str(saved)
    # Normalisation belongs to the method's input pipeline, not to any weight.
    towers = create_clip(spec, heads=heads, text_heads=text_heads, mean_std=method.normalization_stats())
    if saved is not None and spec.startswith("random:"):
        _save_atomic(saved, clip_state_dict(towers))
    return towers._replace(name=name if run.backbone.name.startswith("random:") else towers.name)


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def is_xclip_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a whole X-CLIP model (Hugging Face ``XCLIPModel`` folder or official)."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "xclip"
    if not path.is_file():
        return False
    state, _ = read_state_dict(path)
    return is_official_xclip(state)


def _seed(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def _build_xclip(run: RunConfig, run_dir: Path | None, seed: int | None) -> tuple[XCLIP, str]:
    method, frames = run.method, run.data.num_frames
    spec = run.backbone.name
    if not spec.startswith("random:") and is_xclip_checkpoint(spec):
        model = load_xclip(spec, droppath=method.droppath, freeze_text=method.freeze_text)
        if model.config.num_frames != frames:
            raise ValueError(
                f"{spec}: an X-CLIP model of {model.config.num_frames} frames (one integration-transformer "
                f"position per frame); set data.num_frames={model.config.num_frames}"
            )
        stats = method.normalization_stats()
        if stats is not None:
            # Normalisation is not a weight: only the description the data pipeline reads changes.
            vision = dataclasses.replace(model.config.vision, mean=stats[0], std=stats[1])
            model.config = dataclasses.replace(model.config, vision=vision)
        return model.train(), spec
    towers = build_clip(run, run_dir)
    _seed(seed)
    model = xclip_from_clip(
        towers,
        frames,
        mit_layers=method.mit_layers,
        prompt_layers=method.prompt_layers,
        prompt_alpha=method.prompt_alpha,
        droppath=method.droppath,
        freeze_text=method.freeze_text,
    )
    return model, towers.name


def build_model(
    run: RunConfig, run_dir: Path | None, classes: Sequence[str], seed: int | None = None
) -> BuiltModel:
    """The run's model (trainable parts freshly initialised), predicting ``classes``.

    ``run_dir`` keeps random-init CLIP weights (saved at the first build, read back later); None builds
    without one. ``seed`` seeds the new modules after the CLIP weights are made, so they start the same
    whether those were drawn at random or read back (a resumed run, a feature cache, another process).
    """
    method = run.method
    if method.name == "evl":
        backbone, name = build_backbone(run, run_dir)
        config = model_config_for(run, backbone, len(classes), name)
        _seed(seed)
        return BuiltModel(EVL(config, backbone), to_dict(config))
    if method.name == "xclip":
        model, name = _build_xclip(run, run_dir, seed)
        set_classes(model, method, classes)
        return BuiltModel(model, {"xclip": to_dict(model.config), "backbone_name": name})
    towers = build_clip(run, run_dir)
    tune = "none" if method.name == "zeroshot" else method.tune
    model = VideoCLIP(
        towers.visual, towers.text, towers.logit_scale, tune=tune, compute_dtype=run.backbone.dtype
    )
    set_classes(model, method, classes)
    payload = {
        "vision": to_dict(towers.visual.config),
        "text": to_dict(towers.text.config),
        "tune": tune,
        "backbone_name": towers.name,
    }
    return BuiltModel(model, payload)


# ------------------------------------------------------------------------------------------- optimisation


def has_trainable_parameters(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


def build_method_optimizer(model: nn.Module, run: RunConfig) -> torch.optim.AdamW:
    """AdamW with the method's parameter groups, each group's ``lr`` already scaled.

    EVL: no decay on biases, norms, embeddings and the query (unless ``train.decay_all``), and the head at
    ``train.head_lr_scale``; ViFi-CLIP: every trained parameter (``decay_all`` decays 1-D ones too, as the
    reference does); X-CLIP: the reference's groups, 10x lr on the new modules.
    """
    cfg, name = run.train, run.method.name
    betas = tuple(cfg.betas) if cfg.betas is not None else DEFAULT_BETAS[name]
    if name == "evl":
        lr_scale = {"head": cfg.head_lr_scale} if cfg.head_lr_scale != 1.0 else None
        return build_optimizer(
            model, cfg.lr, cfg.weight_decay, betas=betas, decay_all=cfg.decay_all, lr_scale=lr_scale
        )
    if name == "xclip":
        groups = xclip_param_groups(model, cfg.lr, cfg.weight_decay)
    else:
        groups = model.param_groups(cfg.lr, cfg.weight_decay, decay_all=cfg.decay_all)
    if not groups:
        raise ValueError(f"--method {name}: the model has no trainable parameters")
    return adamw(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
