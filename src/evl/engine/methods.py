"""The method registry: one table (:data:`METHODS`) from a method name to everything the engine does
differently for it: how a run config becomes a model, what the run directory records about it, how it is
optimised, whether and how class names become its classifier, and what its defaults are.

* ``evl``: frozen CLIP image encoder + EVL decoder + linear head (a fixed class list);
* ``vifi``: ViFi-CLIP, both CLIP encoders fine-tuned (or one of them), classes matched by text;
* ``vifi_prompt``: ViFi-CLIP's "bridge and prompt" stage, deep prompts on the frozen towers of a ViFi-CLIP
  run (or of CLIP);
* ``xclip``: X-CLIP, from a CLIP checkpoint (new modules initialised) or an X-CLIP one;
* ``zeroshot``: CLIP as it is, classes matched by text, nothing trained.

Every model built here is a :class:`~evl.models.protocol.VideoModel` (videos [B, T, 3, H, W] -> logits
[B, K]); the text methods' models are :class:`~evl.models.protocol.TextVideoModel` s, so any class list can
be evaluated without retraining. A new method is a model file plus one :class:`MethodSpec` entry here;
nothing else in the engine or the CLI names a method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from evl.config import (
    VISION_PRESETS,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    model_config_from_dict,
    to_dict,
    vision_preset,
)
from evl.engine.optim import adamw, param_groups
from evl.io import atomic_path
from evl.models.attention_maps import EVLAttention, evl_attention
from evl.models.clip_text import TEXT_PRESETS, CLIPTextTransformer
from evl.models.clip_vit import CLIPVisionTransformer
from evl.models.evl import EVL
from evl.models.prompted_clip import PromptedVideoCLIP, prompt_prefix, prompt_template
from evl.models.registry import CLIPTowers, clip_state_dict, create_backbone, create_clip, xclip_from_clip
from evl.models.vificlip import VIFI_BETAS, VIFI_TEMPLATE, ZEROSHOT_TEMPLATE, VideoCLIP, build_prompts
from evl.models.xclip import XCLIP, xclip_param_groups
from evl.models.xclip_weights import is_official_xclip, load_xclip
from evl.tokenizer import default_tokenizer
from evl.weights import VISION_CONFIG_METADATA, read_state_dict

BACKBONE_FILE = "backbone.safetensors"


@dataclass
class BuiltModel:
    """A model and its description for ``config.json`` (``model``), which checkpoints must match."""

    model: nn.Module
    payload: dict[str, Any]


@dataclass(frozen=True)
class MethodSpec:
    """What the engine needs to know about one method; an entry of :data:`METHODS`."""

    name: str  # the key: ``method.name`` in a run config, ``--method`` on the command line
    title: str  # how messages name it
    # (run config, run directory or None, class names, seed) -> the model, its classes not yet set (a text
    # method's class prompts are set by :func:`build_model`) and its description for ``config.json``.
    build: Callable[[RunConfig, Path | None, Sequence[str], int | None], BuiltModel]
    # (model, train config) -> AdamW parameter groups over the trainable parameters, each with its ``lr``.
    param_groups: Callable[[nn.Module, TrainConfig], list[dict[str, Any]]]
    betas: tuple[float, float]  # AdamW betas when ``train.betas`` is not set
    reads_text: bool  # classes are matched by text embeddings: any class list, no fixed classifier
    templates: tuple[str, ...] = ()  # class prompts when ``method.templates`` is not set (text methods)
    # The class prompts of a method whose prompt follows its own settings (it then takes no
    # ``method.templates``): method config -> templates, or a one-line ValueError.
    templates_from: Callable[[MethodConfig], tuple[str, ...]] | None = None
    # What ``method.normalization: auto`` means: "imagenet", "clip", or None for the encoder's own.
    normalization: str | None = None
    trains: bool = True  # False: nothing to train, so no training list, and it can be built from weights
    trains_from_features: bool = False  # can train from an ``evl extract`` feature cache
    # Checks the saved description of a built model (``config.json`` ``model``), failing by field name.
    check_payload: Callable[[dict[str, Any]], object] | None = None
    # Sets ``train.recompute_memory`` on a built model; None: the method has no such choice.
    set_recompute_memory: Callable[[nn.Module, bool], None] | None = None
    # (model, views [B, V, T, 3, S, S]) -> video embeddings [B, D], float32: what the method classifies or
    # matches against class texts, the V views of a video pooled as the method pools (``evl embed``).
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    # (model, videos [B, T, 3, S, S]) -> the attention maps ``evl explain`` draws (EVL's decoder query, the
    # encoder's class token, the cross-frame maps: :class:`~evl.models.attention_maps.EVLAttention`).
    attention_maps: Callable[[nn.Module, torch.Tensor], EVLAttention] | None = None
    # (model, videos [B, T, 3, S, S]) -> [B, T, K]: each frame's cosine similarity with each class's text,
    # what ``evl explain`` draws for the methods that match classes by text.
    frame_similarity: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


# ------------------------------------------------------------------------------------------------ prompts


def templates_for(method: MethodConfig) -> tuple[str, ...]:
    """The class-prompt templates of a text method: the configured ones, or the method's own."""
    spec = method_spec(method.name)
    if spec.templates_from is not None:
        return spec.templates_from(method)
    if method.templates is not None:
        return tuple(method.templates)
    return spec.templates


def normalization_stats(method: MethodConfig) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of the method's input frames, or None for the image encoder's own."""
    return method.normalization_stats(auto=method_spec(method.name).normalization)


def set_classes(model: nn.Module, method: MethodConfig, classes: Sequence[str]) -> None:
    """Make ``classes`` the classes a text method's model predicts (a fixed classifier: the count must
    match its head)."""
    spec = method_spec(method.name)
    if not spec.reads_text:
        if len(classes) != model.num_classes:
            text_methods = [s.name for s in METHODS.values() if s.reads_text]
            raise ValueError(
                f"this {spec.title} model has a classifier of {model.num_classes} classes and cannot predict "
                f"{len(classes)}; a different class list needs a text-matching method "
                f"(method.name {', '.join(text_methods[:-1])} or {text_methods[-1]})"
            )
        return
    templates = templates_for(method)
    prompts = [p for per_class in build_prompts(classes, templates) for p in per_class]
    # A model carries the tokenizer its text encoder was trained with (SigLIP's, MetaCLIP 2's); else CLIP's.
    tokenizer = getattr(model, "tokenizer", None) or default_tokenizer()
    tokens = tokenizer(prompts, context_length=model.context_length)
    model.set_class_tokens(tokens, num_templates=len(templates))


def inference_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """Inside, a text method encodes its class prompts once (even when its text encoder trains)."""
    text_cache = getattr(model, "text_cache", None)
    return text_cache() if text_cache is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------- building


def build_backbone(run: RunConfig, run_dir: Path | None) -> tuple[nn.Module, str]:
    """EVL's image encoder; a random-init one is saved into the run so later commands get the same one."""
    saved = run_dir / BACKBONE_FILE if run_dir is not None else None
    if saved is not None and saved.is_file():
        name = run.backbone.name.removeprefix("random:")
        heads = run.backbone.heads or (vision_preset(name).heads if name in VISION_PRESETS else None)
        module, _ = create_backbone(saved, heads=heads)
        return module, name
    module, name = create_backbone(run.backbone.name, heads=run.backbone.heads)
    if saved is not None and run.backbone.name.startswith("random:"):
        # With its config, so that reading it back needs no guess (heads, family).
        metadata = {VISION_CONFIG_METADATA: json.dumps(to_dict(module.config))}
        _save_atomic(saved, {k: v.contiguous() for k, v in module.state_dict().items()}, metadata)
    return module, name


def model_config_for(run: RunConfig, backbone: nn.Module, num_classes: int, name: str) -> ModelConfig:
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
    towers = create_clip(spec, heads=heads, text_heads=text_heads, mean_std=normalization_stats(method))
    if saved is not None and spec.startswith("random:"):
        _save_atomic(saved, clip_state_dict(towers))
    return towers._replace(name=name if run.backbone.name.startswith("random:") else towers.name)


def _save_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


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


def _build_xclip(
    run: RunConfig, run_dir: Path | None, classes: Sequence[str], seed: int | None
) -> BuiltModel:
    model, name = _xclip_model(run, run_dir, seed)
    return BuiltModel(model, {"xclip": to_dict(model.config), "backbone_name": name})


def _xclip_model(run: RunConfig, run_dir: Path | None, seed: int | None) -> tuple[XCLIP, str]:
    """From an X-CLIP checkpoint as it is, or from CLIP's encoders with the new modules initialised."""
    method, frames = run.method, run.data.num_frames
    spec = run.backbone.name
    if not spec.startswith("random:") and is_xclip_checkpoint(spec):
        model = load_xclip(spec, droppath=method.droppath, freeze_text=method.freeze_text)
        if model.config.num_frames != frames:
            raise ValueError(
                f"{spec}: an X-CLIP model of {model.config.num_frames} frames (one integration-transformer "
                f"position per frame); set data.num_frames={model.config.num_frames}"
            )
        stats = normalization_stats(method)
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


def _build_evl(run: RunConfig, run_dir: Path | None, classes: Sequence[str], seed: int | None) -> BuiltModel:
    backbone, name = build_backbone(run, run_dir)
    config = model_config_for(run, backbone, len(classes), name)
    _seed(seed)
    return BuiltModel(EVL(config, backbone), to_dict(config))


def _build_video_clip(run: RunConfig, run_dir: Path | None, tune: str) -> BuiltModel:
    towers = build_clip(run, run_dir)
    model = VideoCLIP(
        towers.visual,
        towers.text,
        towers.logit_scale,
        tune=tune,
        compute_dtype=run.backbone.dtype,
        logit_bias=towers.logit_bias,
        tokenizer=towers.tokenizer,
    )
    payload = {
        "vision": to_dict(towers.visual.config),
        "text": to_dict(towers.text.config),
        "tune": tune,
        "backbone_name": towers.name,
    }
    return BuiltModel(model, payload)


def _build_vifi(run: RunConfig, run_dir: Path | None, classes: Sequence[str], seed: int | None) -> BuiltModel:
    return _build_video_clip(run, run_dir, run.method.tune)


def _build_zeroshot(
    run: RunConfig, run_dir: Path | None, classes: Sequence[str], seed: int | None
) -> BuiltModel:
    return _build_video_clip(run, run_dir, "none")


def _prompt_templates(method: MethodConfig) -> tuple[str, ...]:
    """vifi_prompt's one class prompt, ``prefix + " {}."``: the prefix's first words are the learned
    context, so no other template fits."""
    if method.templates is not None:
        prefix = prompt_prefix(method.prompt_text_tokens, method.prompt_init)
        raise ValueError(
            f"method.templates: vifi_prompt learns its class prompt's context ({prefix!r} + name), so it "
            "takes no templates; set method.prompt_init or method.prompt_text_tokens instead"
        )
    return (prompt_template(method.prompt_text_tokens, method.prompt_init),)


def _is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory (its config.json a run's, not a Hugging Face model's)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "run" in json.loads(config.read_text())
    except (json.JSONDecodeError, TypeError):
        return False


def _bridge_towers(run: RunConfig, path: Path) -> tuple[CLIPTowers, dict[str, Any]]:
    """The towers of a ViFi-CLIP run at its latest checkpoint (the "bridge"), and what identifies them."""
    # Imported here: evl.engine.run builds every run's model through this module, so a module-level
    # import would be circular; only this method reads another run.
    from evl.engine.run import load_run

    loaded = load_run(path, device="cpu")
    if loaded.run.method.name != "vifi":
        raise ValueError(
            f"backbone.name: {path} is a {method_spec(loaded.run.method.name).title} run; vifi_prompt "
            "starts from a ViFi-CLIP run directory (method vifi) or from CLIP weights"
        )
    model = loaded.model
    visual = model.visual
    stats = normalization_stats(run.method)
    if stats is not None:  # normalisation belongs to this method's input pipeline, not to the bridge's
        visual.config = dataclasses.replace(visual.config, mean=tuple(stats[0]), std=tuple(stats[1]))
    bias = None if model.logit_bias is None else float(model.logit_bias)
    towers = CLIPTowers(
        visual, model.text, float(model.logit_scale.detach()), str(path), bias, model.tokenizer
    )
    return towers, {"run": str(path), "step": loaded.step}


def _prompt_towers(run: RunConfig, run_dir: Path | None) -> tuple[CLIPTowers, dict[str, Any] | None]:
    """The frozen towers of vifi_prompt: a ViFi-CLIP run's (and which run and step) or CLIP's."""
    spec = run.backbone.name
    path = Path(spec)
    if spec.startswith("random:") or (spec in VISION_PRESETS and not path.exists()):
        return build_clip(run, run_dir), None
    if _is_run_dir(path):
        return _bridge_towers(run, path)
    if not path.exists():
        raise FileNotFoundError(
            f"backbone.name: {spec} does not exist; vifi_prompt builds its frozen towers from a ViFi-CLIP "
            "run directory or CLIP weights, and a prompted run rebuilds them from the same place"
        )
    return build_clip(run, run_dir), None


def _check_prompt_towers(method: MethodConfig, towers: CLIPTowers) -> None:
    """CLIP's towers, deep enough for the prompts; otherwise a one-line ValueError naming the field."""
    if not (
        isinstance(towers.visual, CLIPVisionTransformer) and isinstance(towers.text, CLIPTextTransformer)
    ):
        raise ValueError(
            f"backbone.name: vifi_prompt's prompts enter CLIP's image and text encoders; {towers.name} has "
            f"{towers.visual.config.family} towers (method vifi or zeroshot take them)"
        )
    for tower, layers in (("vision", towers.visual.config.layers), ("text", towers.text.config.layers)):
        tokens = getattr(method, f"prompt_{tower}_tokens")
        depth = getattr(method, f"prompt_{tower}_depth")
        if tokens and depth > layers:
            raise ValueError(
                f"method.prompt_{tower}_depth={depth} is more than the {layers} layers of the {tower} encoder"
            )


def _build_vifi_prompt(
    run: RunConfig, run_dir: Path | None, classes: Sequence[str], seed: int | None
) -> BuiltModel:
    method = run.method
    _prompt_templates(method)  # refuses method.templates before anything is built
    towers, bridge = _prompt_towers(run, run_dir)
    _check_prompt_towers(method, towers)
    _seed(seed)
    model = PromptedVideoCLIP(
        towers.visual,
        towers.text,
        towers.logit_scale,
        vision_tokens=method.prompt_vision_tokens,
        vision_depth=method.prompt_vision_depth,
        text_tokens=method.prompt_text_tokens,
        text_depth=method.prompt_text_depth,
        prompt_init=method.prompt_init,
        compute_dtype=run.backbone.dtype,
        tokenizer=towers.tokenizer,
    )
    payload = {
        "vision": to_dict(towers.visual.config),
        "text": to_dict(towers.text.config),
        "tune": "none",
        "backbone_name": towers.name,
        # A ViFi-CLIP run directory and the checkpoint step its towers came from (None: CLIP weights).
        "bridge": bridge,
        "prompts": {
            "vision_tokens": method.prompt_vision_tokens,
            "vision_depth": method.prompt_vision_depth if method.prompt_vision_tokens else 0,
            "text_tokens": method.prompt_text_tokens,
            "text_depth": method.prompt_text_depth if method.prompt_text_tokens else 0,
            "template": model.template,
        },
    }
    return BuiltModel(model, payload)


# ------------------------------------------------------------------------------------------- optimisation


def _evl_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """No decay on biases, norms, embeddings and the query (unless ``train.decay_all``); the head at
    ``train.head_lr_scale``."""
    lr_scale = {"head": cfg.head_lr_scale} if cfg.head_lr_scale != 1.0 else None
    groups = param_groups(model, cfg.weight_decay, lr_scale=lr_scale, decay_all=cfg.decay_all)
    return [{**group, "lr": cfg.lr * group["lr_scale"]} for group in groups]


def _xclip_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The reference's groups: 10x lr on the new modules."""
    return xclip_param_groups(model, cfg.lr, cfg.weight_decay)


def _video_clip_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Every trained parameter (``decay_all`` decays 1-D ones too, as the reference does)."""
    return model.param_groups(cfg.lr, cfg.weight_decay, decay_all=cfg.decay_all)


def _set_evl_recompute_memory(model: nn.Module, recompute: bool) -> None:
    model.decoder.checkpoint_memory = recompute


# --------------------------------------------------------------------------------------------- embeddings


def _pool_views(per_clip: torch.Tensor, views: int, unit: bool) -> torch.Tensor:
    """[B * V, D] -> [B, D]: the mean over each video's views, L2-normalised again for unit embeddings."""
    pooled = per_clip.float().unflatten(0, (-1, views)).mean(dim=1)
    return F.normalize(pooled, dim=-1) if unit else pooled


def _evl_embedding(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """The decoder's final query, before the head (:meth:`EVL.embed`)."""
    return _pool_views(model.embed(views.flatten(0, 1)), views.shape[1], unit=False)


def _video_clip_embedding(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """The L2-normalised mean of the frame embeddings, which the class texts are compared with."""
    return _pool_views(model.encode_video(views.flatten(0, 1)), views.shape[1], unit=True)


def _xclip_embedding(model: nn.Module, views: torch.Tensor) -> torch.Tensor:
    """The integration transformer's output, L2-normalised as it is compared with the prompted texts."""
    video, _ = model.encode_video(views.flatten(0, 1))
    return _pool_views(F.normalize(video.float(), dim=-1), views.shape[1], unit=True)


def _frame_similarity(model: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """Each frame's cosine similarity with each class ([B, T, K]; the model's own ``frame_similarity``)."""
    return model.frame_similarity(video)


# ------------------------------------------------------------------------------------------------ registry

METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            MethodSpec(
                name="evl",
                title="EVL",
                build=_build_evl,
                param_groups=_evl_param_groups,
                betas=(0.9, 0.999),  # EVL's trainer uses torch's defaults
                reads_text=False,
                trains_from_features=True,
                check_payload=model_config_from_dict,
                set_recompute_memory=_set_evl_recompute_memory,
                embed=_evl_embedding,
                attention_maps=evl_attention,
            ),
            MethodSpec(
                name="vifi",
                title="ViFi-CLIP",
                build=_build_vifi,
                param_groups=_video_clip_param_groups,
                betas=VIFI_BETAS,
                reads_text=True,
                templates=(VIFI_TEMPLATE,),
                # NOTE(ref): ViFi-CLIP and X-CLIP normalise with ImageNet statistics although CLIP was
                # trained with its own; EVL and vanilla CLIP use CLIP's (the encoder's).
                normalization="imagenet",
                embed=_video_clip_embedding,
                frame_similarity=_frame_similarity,
            ),
            MethodSpec(
                name="vifi_prompt",
                title="ViFi-CLIP bridge and prompt",
                build=_build_vifi_prompt,
                # NOTE(ref): AdamW over the prompt learner's parameters, every one decayed with the
                # config's weight decay; ViFi-CLIP's betas.
                param_groups=_video_clip_param_groups,
                betas=VIFI_BETAS,
                reads_text=True,
                templates_from=_prompt_templates,
                normalization="imagenet",  # NOTE(ref): the ViFi-CLIP data pipeline's statistics
                embed=_video_clip_embedding,
                frame_similarity=_frame_similarity,
            ),
            MethodSpec(
                name="xclip",
                title="X-CLIP",
                build=_build_xclip,
                param_groups=_xclip_param_groups,
                betas=(0.9, 0.98),
                reads_text=True,
                # NOTE(ref): X-CLIP and vanilla zero-shot CLIP prompt with the bare class name.
                templates=(ZEROSHOT_TEMPLATE,),
                normalization="imagenet",
                embed=_xclip_embedding,
                frame_similarity=_frame_similarity,
            ),
            MethodSpec(
                name="zeroshot",
                title="zero-shot CLIP",
                build=_build_zeroshot,
                param_groups=_video_clip_param_groups,
                betas=VIFI_BETAS,
                reads_text=True,
                templates=(ZEROSHOT_TEMPLATE,),
                trains=False,
                embed=_video_clip_embedding,
                frame_similarity=_frame_similarity,
            ),
        )
    }
)
ZEROSHOT = METHODS["zeroshot"]  # CLIP weights alone: ``evl.zeroshot`` and ``--method zeroshot``


def method_spec(name: str) -> MethodSpec:
    """The registry entry of ``name``; an unknown name is a one-line ValueError listing the known ones."""
    spec = METHODS.get(name)
    if spec is None:
        raise ValueError(f"method.name must be one of {', '.join(METHODS)}, got {name!r}")
    return spec


# ------------------------------------------------------------------------------------------------ dispatch


def build_model(
    run: RunConfig, run_dir: Path | None, classes: Sequence[str], seed: int | None = None
) -> BuiltModel:
    """The run's model (trainable parts freshly initialised), predicting ``classes``.

    ``run_dir`` keeps random-init CLIP weights (saved at the first build, read back later); None builds
    without one. ``seed`` seeds the new modules after the CLIP weights are made, so they start the same
    whether those were drawn at random or read back (a resumed run, a feature cache, another process).
    """
    spec = method_spec(run.method.name)
    built = spec.build(run, run_dir, classes, seed)
    if spec.reads_text:
        set_classes(built.model, run.method, classes)
    return built


def build_feature_model(run: RunConfig, cache_dir: Path, classes: Sequence[str]) -> nn.Module:
    """The model whose frozen backbone fills a feature cache in ``cache_dir``: the run's own when its
    method trains from caches, otherwise the model of the method that does, with the run's backbone and
    decoder settings (what ``evl train --features`` will build). Random-init weights are saved there."""
    spec = method_spec(run.method.name)
    if not spec.trains_from_features:
        spec = next(s for s in METHODS.values() if s.trains_from_features)
        run = dataclasses.replace(run, method=dataclasses.replace(run.method, name=spec.name))
    return spec.build(run, cache_dir, classes, None).model


def has_trainable_parameters(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


def build_method_optimizer(model: nn.Module, run: RunConfig) -> torch.optim.AdamW:
    """AdamW with the method's parameter groups (:attr:`MethodSpec.param_groups`), each group's ``lr``
    already scaled, and the method's betas unless ``train.betas`` is set."""
    cfg, spec = run.train, method_spec(run.method.name)
    betas = tuple(cfg.betas) if cfg.betas is not None else spec.betas
    groups = spec.param_groups(model, cfg)
    if not groups:
        raise ValueError(f"method {spec.name}: the model has no trainable parameters")
    return adamw(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
