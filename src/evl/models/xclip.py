"""X-CLIP: video recognition by matching a video against prompted class-name text embeddings.

Ni et al., "Expanding Language-Image Pretrained Models for General Video Recognition" (ECCV 2022):

    frames, patches = CrossFrameCommunicationTransformer(video)        # [B, T, D], [B, T, N, C]
    video = MultiframeIntegrationTransformer(frames)                     # [B, D]
    text = CLIPText(class names)                                         # [K, D], frozen and cached
    text_b = text + VideoSpecificPrompt(text, mean_T(proj(ln(patches))))  # [B, K, D]
    logits = exp(logit_scale) * cos(video, text_b)                       # [B, K]

Parameter names are OpenAI CLIP's for the CLIP towers (``visual.*``, and the text tower under ``text.``)
and the official X-CLIP names for the rest (``mit``, ``prompts_generator``, ``prompts_visual_ln``,
``prompts_visual_proj``, ``message_*``), so an official checkpoint maps by moving its text tower under
``text.`` (:mod:`evl.models.xclip_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from evl.config import IMAGENET_MEAN, IMAGENET_STD, TextConfig, VisionConfig
from evl.models.clip_text import CLIPTextTransformer
from evl.models.layers import LayerNorm, TrainableStateModule
from evl.models.xclip_parts import (
    CrossFrameCommunicationTransformer,
    MultiframeIntegrationTransformer,
    VideoSpecificPrompt,
)


def _default_vision() -> VisionConfig:
    # X-CLIP B/16; the official pipeline normalises with ImageNet statistics, not CLIP's.
    return VisionConfig(patch_size=16, output_dim=512, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@dataclass(frozen=True)
class XCLIPConfig:
    """An X-CLIP model. Defaults are X-CLIP B/16 with 8 frames as ``xclip.load`` builds it."""

    vision: VisionConfig = field(default_factory=_default_vision)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512  # the joint space: ``proj`` / ``text_projection`` columns, MIT and prompt width
    num_frames: int = 8
    mit_layers: int = 1  # ``xclip.load`` default (``build_model``'s own default of 4 is overridden)
    mit_heads: int = 8  # embed_dim // 64 in the reference
    mit_mlp_ratio: float = 4.0
    prompt_layers: int = 2
    prompt_heads: int = 8  # embed_dim // 64 in the reference
    prompt_alpha: float = 0.1
    prompt_activation: str = "quick_gelu"
    droppath: float = 0.0  # stochastic depth of the last image block (linear from 0 at the first)
    freeze_text: bool = True  # the reference's FIX_TEXT
    logit_scale_init: float = math.log(1 / 0.07)

    def __post_init__(self) -> None:
        if self.vision.output_dim != self.embed_dim or self.text.output_dim != self.embed_dim:
            raise ValueError(
                f"XCLIPConfig: vision output_dim {self.vision.output_dim} and text output_dim "
                f"{self.text.output_dim} must both equal embed_dim {self.embed_dim}"
            )
        for name in ("mit_heads", "prompt_heads"):
            heads = getattr(self, name)
            if self.embed_dim % heads:
                raise ValueError(
                    f"XCLIPConfig: embed_dim {self.embed_dim} is not divisible by {name} {heads}"
                )
        if self.num_frames < 1:
            raise ValueError(f"XCLIPConfig: num_frames must be >= 1, got {self.num_frames}")

    @property
    def mit_mlp_width(self) -> int:
        return round(self.embed_dim * self.mit_mlp_ratio)


class XCLIPOutput(NamedTuple):
    """What ``transformers.XCLIPModel`` returns, for comparisons: logits [B, K], video embeddings [B, D]
    and per-video prompted text embeddings [B, K, D], both L2-normalised."""

    logits_per_video: torch.Tensor
    video_embeds: torch.Tensor
    text_embeds: torch.Tensor


def _clear_text_cache_after_load(module: XCLIP, incompatible_keys: Any) -> None:
    module.clear_text_cache()


class _VideoMatching:
    """X-CLIP's video side and its matching against class text embeddings: what :class:`XCLIP` and
    :class:`FixedClassXCLIP` (which holds class text embeddings instead of a text tower) share."""

    config: XCLIPConfig
    visual: CrossFrameCommunicationTransformer
    mit: MultiframeIntegrationTransformer
    prompts_generator: VideoSpecificPrompt
    prompts_visual_ln: LayerNorm
    prompts_visual_proj: nn.Parameter
    logit_scale: nn.Parameter

    # ----------------------------------------------------------------------------------------------- input
    def check_input(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"X-CLIP expects videos [B, T, 3, H, W], got shape {tuple(video.shape)}")
        if video.shape[1] != self.config.num_frames:
            raise ValueError(
                f"this model was built for {self.config.num_frames} frames per clip, got {video.shape[1]} "
                "(the integration transformer has one position embedding per frame)"
            )

    # ----------------------------------------------------------------------------------------------- video
    def encode_frames(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Videos [B, T, 3, H, W] -> (frame embeddings [B, T, D] after the cross-frame communication,
        prompt visual tokens [B, T, N, D] = ``prompts_visual_ln(patches) @ prompts_visual_proj``)."""
        self.check_input(video)
        frames, patches = self.visual(video)  # [B, T, D], [B, T, N, C]
        return frames, self.prompts_visual_ln(patches) @ self.prompts_visual_proj.to(patches.dtype)

    def encode_video(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Videos [B, T, 3, H, W] -> (video embeddings [B, D], prompt visual tokens [B, T, N, D]): the
        frames of :meth:`encode_frames` through the integration transformer, not normalised."""
        frames, tokens = self.encode_frames(video)
        return self.mit(frames), tokens

    # ------------------------------------------------------------------------------------------- matching
    def prompt_text(self, text: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings [K, D] and visual tokens [B, T, N, D] -> per-video text embeddings [B, K, D]."""
        text = text.to(visual_tokens.dtype).unsqueeze(0).expand(visual_tokens.shape[0], -1, -1)
        return text + self.prompts_generator(text, visual_tokens.mean(dim=1))

    def frame_similarity_to(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Videos [B, T, 3, H, W] and class text embeddings [K, D] -> cosine similarity of each frame's
        embedding (after the cross-frame communication, before the integration transformer) with each
        class's video-specific prompted text, [B, T, K] (float32, without autograd)."""
        with torch.no_grad():
            frames, tokens = self.encode_frames(video)
            prompted = F.normalize(self.prompt_text(text, tokens).float(), dim=-1)  # [B, K, D]
        return torch.einsum("btd,bkd->btk", F.normalize(frames.float(), dim=-1), prompted)

    def match(self, video_embeds: torch.Tensor, text_embeds: torch.Tensor) -> XCLIPOutput:
        """Video [B, D] and per-video text [B, K, D] embeddings -> :class:`XCLIPOutput`."""
        video_embeds = F.normalize(video_embeds, dim=-1)
        text_embeds = F.normalize(text_embeds, dim=-1)
        logits = self.logit_scale.exp() * torch.einsum("bd,bkd->bk", video_embeds, text_embeds)
        return XCLIPOutput(logits, video_embeds, text_embeds)


class XCLIP(_VideoMatching, TrainableStateModule):
    """Videos [B, T, 3, H, W] (normalised) and class-name token ids [K, L] -> logits [B, K]."""

    def __init__(self, config: XCLIPConfig) -> None:
        super().__init__()
        self.config = config
        vision, dim = config.vision, config.embed_dim
        self.visual = CrossFrameCommunicationTransformer(vision, drop_path=config.droppath)
        self.text = CLIPTextTransformer(config.text)
        self.mit = MultiframeIntegrationTransformer(
            config.num_frames,
            dim,
            config.mit_layers,
            config.mit_heads,
            config.mit_mlp_width,
            vision.activation,
            vision.layer_norm_eps,
        )
        self.prompts_generator = VideoSpecificPrompt(
            dim,
            config.prompt_layers,
            config.prompt_heads,
            config.prompt_alpha,
            config.prompt_activation,
            eps=config.text.layer_norm_eps,
            visual_eps=vision.layer_norm_eps,
        )
        self.prompts_visual_ln = LayerNorm(vision.width, eps=vision.layer_norm_eps)
        # NOTE(ref): initialised with std 1 (``torch.randn``), not width**-0.5, as the reference does.
        self.prompts_visual_proj = nn.Parameter(torch.randn(vision.width, dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        if config.freeze_text:
            # NOTE(ref): FIX_TEXT freezes every parameter outside visual/mit/prompts, so the logit scale
            # is frozen along with the text tower; we match it.
            self.text.requires_grad_(False)
            self.logit_scale.requires_grad_(False)
        # Class text features: (key, features). Not a buffer: it is derived data, never saved.
        self._text_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        # The class prompts a plain ``model(video)`` matches against; they follow .to(device) but are not
        # saved: the class list is data, not weights.
        self.register_buffer("class_tokens", None, persistent=False)
        # Loaded weights make the cached class features stale; dropping them at once frees their memory.
        self.register_load_state_dict_post_hook(_clear_text_cache_after_load)

    @property
    def vision_config(self) -> VisionConfig:
        """The image encoder's config: input size and normalisation for the data pipeline."""
        return self.config.vision

    @property
    def num_classes(self) -> int:
        return 0 if self.class_tokens is None else self.class_tokens.shape[0]

    @property
    def context_length(self) -> int:
        """Tokens per prompt the text tower takes: what class prompts are tokenized to."""
        return self.text.config.context_length

    def set_class_tokens(self, token_ids: torch.Tensor, num_templates: int = 1) -> None:
        """Store the tokenized class prompts [K, L] that ``forward(video)`` classifies among (one prompt per
        class: X-CLIP's prompt generator refines one text embedding per class)."""
        if num_templates != 1:
            raise ValueError("X-CLIP takes one prompt template per class")
        if token_ids.ndim != 2 or token_ids.dtype.is_floating_point or token_ids.shape[0] == 0:
            raise ValueError(f"class tokens must be integer ids [K, L], got shape {tuple(token_ids.shape)}")
        self.class_tokens = token_ids.to(device=self.logit_scale.device, dtype=torch.long)

    # ------------------------------------------------------------------------------------------------ text
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [K, L] -> text embeddings [K, D] (not normalised, never cached)."""
        return self.text(token_ids)

    @property
    def text_trainable(self) -> bool:
        return any(p.requires_grad for p in self.text.parameters())

    def _text_cache_key(self, token_ids: torch.Tensor) -> tuple[Any, ...]:
        # In-place updates (load_state_dict, an optimizer step) bump a tensor's version and moves change its
        # storage, so either one invalidates the cache as a new class list does.
        # Features made under inference_mode cannot enter autograd later, so that mode is part of the key.
        weights = tuple((p.data_ptr(), p._version) for p in self.text.parameters())
        return token_ids.device, tuple(token_ids.shape), torch.is_inference_mode_enabled(), weights

    def class_text_features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [K, L] -> text embeddings [K, D], cached while the text tower is frozen.

        The cache is keyed by the token ids (and the text weights), so a new class list recomputes it.
        """
        # NOTE(ref): the reference caches the first class list it sees for good (a new list is ignored) and
        # switches the whole model to train() after encoding, even in evaluation; we do neither.
        if self.text_trainable and torch.is_grad_enabled():
            return self.encode_text(token_ids)
        key = self._text_cache_key(token_ids)
        if self._text_cache is not None:
            (cached_key, cached_ids), features = self._text_cache
            if cached_key == key and torch.equal(cached_ids, token_ids):
                return features
        with torch.no_grad():
            features = self.encode_text(token_ids)
        self._text_cache = ((key, token_ids.detach().clone()), features)
        return features

    def clear_text_cache(self) -> None:
        self._text_cache = None

    # ------------------------------------------------------------------------------------------- forwards
    def forward_outputs(self, video: torch.Tensor, class_token_ids: torch.Tensor) -> XCLIPOutput:
        """Videos [B, T, 3, H, W], class token ids [K, L] -> logits, video and text embeddings (as HF)."""
        video_embeds, visual_tokens = self.encode_video(video)
        text = self.prompt_text(self.class_text_features(class_token_ids), visual_tokens)
        return self.match(video_embeds, text)

    def forward(self, video: torch.Tensor, class_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Videos [B, T, 3, H, W], class token ids [K, L] (default: :meth:`set_class_tokens`') -> logits
        [B, K]."""
        if class_token_ids is None:
            if self.class_tokens is None:
                raise RuntimeError("no class prompts: call set_class_tokens(token_ids) or pass them")
            class_token_ids = self.class_tokens
        return self.forward_outputs(video, class_token_ids).logits_per_video

    def frame_similarity(self, video: torch.Tensor) -> torch.Tensor:
        """Videos [B, T, 3, H, W] -> each frame's cosine similarity with each class, [B, T, K] (see
        :meth:`frame_similarity_to`), against the classes of :meth:`set_class_tokens`."""
        if self.class_tokens is None:
            raise RuntimeError("no class prompts: call set_class_tokens(token_ids) first")
        with torch.no_grad():
            text = self.class_text_features(self.class_tokens)
        return self.frame_similarity_to(video, text)

    def fixed_classes(self) -> FixedClassXCLIP:
        """This model over its current class list without its text tower (see :class:`FixedClassXCLIP`)."""
        return FixedClassXCLIP(self)

    # ----------------------------------------------------------------------------------------- parameters
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Everything but the frozen text tower and logit scale (with ``freeze_text``)."""
        return (p for _, p in self.trainable_named_parameters())

    def _checkpoint_keys(self) -> Callable[[str], bool]:
        """The trained tensors: what a fine-tuning checkpoint stores (the frozen text tower is not)."""
        return {name for name, _ in self.trainable_named_parameters()}.__contains__

    def _mismatch_notes(self) -> tuple[str, str]:
        return " (X-CLIP)", ""


class FixedClassXCLIP(_VideoMatching, nn.Module):
    """An :class:`XCLIP` over one class list, as an exported model holds it: the class text embeddings
    [K, D] encoded once and kept as a buffer, and no text tower. Videos [B, T, 3, H, W] (normalised) ->
    logits [B, K], the model's own (the video-specific prompts still adapt the text to each video).

    It shares every module but the text tower with ``model``; the class embeddings are a copy, which a
    later change of the model's classes or text weights does not reach.
    """

    def __init__(self, model: XCLIP) -> None:
        super().__init__()
        if model.class_tokens is None:
            raise RuntimeError("no class prompts: call set_class_tokens(token_ids) first")
        self.config = model.config
        self.visual = model.visual
        self.mit = model.mit
        self.prompts_generator = model.prompts_generator
        self.prompts_visual_ln = model.prompts_visual_ln
        self.prompts_visual_proj = model.prompts_visual_proj
        self.logit_scale = model.logit_scale
        self.training = model.training  # the model's mode, without changing its modules'
        with torch.no_grad():
            text = model.class_text_features(model.class_tokens)
        self.register_buffer("class_text", text.detach().clone())

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        video_embeds, visual_tokens = self.encode_video(video)
        return self.match(video_embeds, self.prompt_text(self.class_text, visual_tokens)).logits_per_video


# Parameters whose name contains one of these train at 10x the learning rate (the reference's groups).
FAST_KEYWORDS = ("mit", "prompts", "message_")


def xclip_param_groups(model: XCLIP, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as X-CLIP's ``build_optimizer``: CLIP weights at ``lr``; ``mit``, ``prompts`` and
    ``message_`` parameters at ``10 * lr``; no weight decay on 1-D parameters, biases and
    ``positional_embedding``. Frozen parameters are left out.

    Groups come in the reference's order (CLIP, mit, prompts, message; decayed before not decayed), empty
    ones omitted. Each holds ``params``, ``param_names``, ``lr``, ``lr_scale`` and ``weight_decay``.
    """

    def no_decay(name: str, param: torch.Tensor) -> bool:
        return param.ndim == 1 or name.endswith(".bias") or "positional_embedding" in name

    trainable = list(model.trainable_named_parameters())
    selections: list[tuple[float, Any]] = [
        (1.0, lambda n: not any(k in n for k in FAST_KEYWORDS)),
        (10.0, lambda n: "mit" in n),
        (10.0, lambda n: "prompts" in n),
        (10.0, lambda n: "message_" in n),
    ]
    groups: list[dict[str, Any]] = []
    for scale, selected in selections:
        for decayed in (True, False):
            named = [(n, p) for n, p in trainable if selected(n) and no_decay(n, p) != decayed]
            if named:
                groups.append(
                    {
                        "params": [p for _, p in named],
                        "param_names": [n for n, _ in named],
                        "lr": lr * scale,
                        "lr_scale": scale,
                        "weight_decay": weight_decay if decayed else 0.0,
                    }
                )
    return groups
