"""Video CLIP classifier: ViFi-CLIP (Rasheed et al., CVPR 2023) and zero-shot CLIP on videos.

Every frame goes through the CLIP image encoder (``ln_post`` + ``proj`` of the CLS token); the frame
embeddings are averaged over time and L2-normalised. Each class is a text prompt through the CLIP text
encoder, normalised (and averaged over templates when several are given). The logits are
``exp(logit_scale) * cosine(video, class)``, plus ``logit_bias`` for towers trained with SigLIP's sigmoid
loss, whose class scores are then sigmoids (each class on its own) rather than a softmax over the classes.
The towers may be CLIP's, MetaCLIP 2's or SigLIP's (any image encoder with a pooled embedding and a text
encoder of the same embedding size).

``tune`` chooses what trains: ``"both"`` (ViFi-CLIP: both towers and ``logit_scale``), ``"image"`` or
``"text"`` (the paper's ablations), ``"none"`` (vanilla zero-shot CLIP). Token embeddings never train: the
reference precomputes them into a buffer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evl.config import VisionConfig
from evl.devices import autocast, check_precision, resolve_precision
from evl.models.layers import TrainableStateModule

__all__ = [
    "TUNE_MODES",
    "VIFI_BETAS",
    "VIFI_TEMPLATE",
    "ZEROSHOT_TEMPLATE",
    "FixedClassVideoCLIP",
    "VideoCLIP",
    "average_frames",
    "build_prompts",
    "class_logits",
]

TUNE_MODES = ("both", "image", "text", "none")

# ViFi-CLIP's prompt: CTX_INIT "a photo of a" + " " + name + "."; zero-shot CLIP uses the bare name.
VIFI_TEMPLATE = "a photo of a {}."
ZEROSHOT_TEMPLATE = "{}"

# ViFi-CLIP's AdamW betas (an optimizer argument, not a parameter-group one).
VIFI_BETAS = (0.9, 0.98)


def build_prompts(class_names: Sequence[str], templates: Sequence[str] = (VIFI_TEMPLATE,)) -> list[list[str]]:
    """One prompt per (class, template): ``[K][M]`` strings, ``templates[j].format(name)``.

    Flattened class-major (``[p for prompts in result for p in prompts]``), the tokenized prompts are what
    :meth:`VideoCLIP.set_class_tokens` takes with ``num_templates=len(templates)``. Names are used as
    given (the reference's label files already spell them with spaces).
    """
    if isinstance(templates, str):
        raise TypeError("templates must be a sequence of strings, not a single string")
    if not templates:
        raise ValueError("build_prompts needs at least one template")
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' placeholder for the class name")
    return [[template.format(name) for template in templates] for name in class_names]


def average_frames(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Frame embeddings [B*T, D] (frames of one video adjacent) -> normalised video embeddings [B, D]
    (float32): averaged over the T frames, then L2-normalised (the reference normalises after the mean,
    not per frame)."""
    return F.normalize(frames.float().unflatten(0, (-1, num_frames)).mean(dim=1), dim=-1)


def class_logits(
    video: torch.Tensor,
    classes: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised video [B, D] and class [K, D] embeddings -> logits [B, K] = exp(logit_scale) * cosine
    (+ ``logit_bias``, SigLIP's)."""
    logits = logit_scale.exp() * video @ classes.t()
    return logits if logit_bias is None else logits + logit_bias


def embedding_dim(config: VisionConfig) -> int:
    """Size of an image encoder's pooled embedding: its projection's, else its width (SigLIP, DINOv2)."""
    return config.output_dim or config.width


def _clear_text_cache_after_load(module: VideoCLIP, incompatible_keys: Any) -> None:
    module.clear_text_cache()


class VideoCLIP(TrainableStateModule):
    """Videos [B, T, 3, H, W] (normalised) -> logits [B, K] against K class prompts.

    Args:
        visual: image encoder whose pooled embedding matches the text embedding (CLIP: with its
            projection, ``output_dim``).
        text: text encoder with the same embedding size (CLIP's, or SigLIP's).
        logit_scale: the log of the logit temperature (CLIP checkpoints store it so; about log(100)).
        logit_bias: SigLIP's learned bias (None for CLIP): the scores become per-class sigmoids.
        tokenizer: what turns class prompts into the text encoder's ids (None: CLIP's BPE).
        tune: which parameters train, one of :data:`TUNE_MODES`.
        compute_dtype: dtype the towers run in, as EVL's ``backbone_dtype``: ``"auto"`` is float32 on CPU
            and bfloat16 autocast on CUDA; or ``"float32"``, ``"bfloat16"``, ``"float16"``.

    Frozen parameters have ``requires_grad=False``, their modules stay in eval mode, and frozen towers run
    without autograd. Call :meth:`set_class_tokens` before the first forward.
    """

    def __init__(
        self,
        visual: nn.Module,
        text: nn.Module,
        logit_scale: float = math.log(1 / 0.07),
        tune: str = "both",
        compute_dtype: str = "auto",
        logit_bias: float | None = None,
        tokenizer: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if tune not in TUNE_MODES:
            raise ValueError(f"unknown tune mode {tune!r}; expected one of {', '.join(TUNE_MODES)}")
        if visual.config.family == "clip" and visual.config.output_dim is None:
            raise ValueError("VideoCLIP needs an image encoder with a projection (VisionConfig.output_dim)")
        if embedding_dim(visual.config) != text.config.output_dim:
            raise ValueError(
                f"image embeddings have {embedding_dim(visual.config)} dims but text embeddings "
                f"{text.config.output_dim}; the towers must come from the same model"
            )
        check_precision(compute_dtype, "backbone.dtype")  # reject a bad name now, not at forward
        self.tune = tune
        self.compute_dtype = compute_dtype
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        # NOTE(ref): SigLIP's bias is learned with its sigmoid loss; under the softmax cross-entropy ViFi-CLIP
        # trains with, a bias shared by every class changes nothing, so it stays as loaded.
        bias = None if logit_bias is None else torch.tensor(float(logit_bias))
        self.register_buffer("logit_bias", bias)
        self.tokenizer = tokenizer  # not a weight: prompts are tokenized before they reach the model
        # Prompts travel with .to(device) but not into checkpoints: the class list is data, not weights.
        self.register_buffer("class_tokens", None, persistent=False)
        self.num_templates = 1
        self._text_cache: torch.Tensor | None = None
        self._text_cache_key: tuple[Any, ...] | None = None
        self._cache_depth = 0

        self.visual.requires_grad_(self.tune_image)
        self.text.requires_grad_(self.tune_text)
        self.text.token_embedding.requires_grad_(False)
        # NOTE(ref): ViFi-CLIP trains logit_scale only when both towers train (USE=both).
        self.logit_scale.requires_grad_(tune == "both")
        for module in self._frozen_modules():
            module.eval()
        # Any load_state_dict may change the text weights behind a cached class embedding.
        self.register_load_state_dict_post_hook(_clear_text_cache_after_load)

    @property
    def vision_config(self) -> VisionConfig:
        """The image encoder's config: input size and normalisation for the data pipeline."""
        return self.visual.config

    # ---------------------------------------------------------------------------------------------- modes
    @property
    def tune_image(self) -> bool:
        return self.tune in ("both", "image")

    @property
    def tune_text(self) -> bool:
        return self.tune in ("both", "text")

    def _frozen_modules(self) -> list[nn.Module]:
        frozen: list[nn.Module] = [] if self.tune_image else [self.visual]
        frozen.append(self.text.token_embedding if self.tune_text else self.text)
        return frozen

    def train(self, mode: bool = True) -> VideoCLIP:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()  # frozen parts never leave eval mode
        return self

    @property
    def _image_path_trains(self) -> bool:
        """Whether a forward needs autograd through the image encoder (a subclass may train inputs to it)."""
        return self.tune_image

    @property
    def _text_path_trains(self) -> bool:
        """Whether the class embeddings change with training, so are cached only inside :meth:`text_cache`
        (a subclass may train inputs to the text encoder)."""
        return self.tune_text

    def is_tuned(self, name: str) -> bool:
        """Whether the parameter called ``name`` trains under this model's ``tune`` mode."""
        if name == "logit_scale":
            return self.tune == "both"
        if name.startswith("visual."):
            return self.tune_image
        if name.startswith("text."):
            return self.tune_text and not name.startswith("text.token_embedding.")
        return False

    # -------------------------------------------------------------------------------------------- classes
    @property
    def num_classes(self) -> int:
        return 0 if self.class_tokens is None else self.class_tokens.shape[0] // self.num_templates

    @property
    def context_length(self) -> int:
        """Tokens per prompt the text tower takes: what class prompts are tokenized to."""
        return self.text.config.context_length

    def set_class_tokens(self, token_ids: torch.Tensor, num_templates: int = 1) -> None:
        """Store the tokenized class prompts, ``[K * num_templates, L]`` class-major (row ``k * M + j`` is
        class k with template j, as :func:`build_prompts` flattened).

        A cached class embedding is dropped when the ids or the template count change.
        """
        if token_ids.ndim != 2 or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ValueError(
                f"class tokens must be integer ids [K * num_templates, L], got {token_ids.dtype} "
                f"of shape {tuple(token_ids.shape)}"
            )
        rows, length = token_ids.shape
        if num_templates < 1 or rows == 0 or rows % num_templates:
            raise ValueError(f"{rows} prompt rows do not split into classes of {num_templates} templates")
        config = self.text.config
        if length > config.context_length:
            raise ValueError(f"prompts of {length} tokens exceed the text context of {config.context_length}")
        if token_ids.min() < 0 or token_ids.max() >= config.vocab_size:
            raise ValueError(
                f"token ids span {int(token_ids.min())}..{int(token_ids.max())}, outside the vocabulary "
                f"of {config.vocab_size}"
            )
        tokens = token_ids.to(device=self.logit_scale.device, dtype=torch.long)
        same = (
            self.class_tokens is not None
            and num_templates == self.num_templates
            and self.class_tokens.shape == tokens.shape
            and torch.equal(self.class_tokens, tokens)
        )
        self.class_tokens = tokens
        self.num_templates = num_templates
        if not same:
            self.clear_text_cache()

    def clear_text_cache(self) -> None:
        """Drop the cached class embeddings (needed only after editing ``self.text`` weights directly)."""
        self._text_cache = None
        self._text_cache_key = None

    @contextlib.contextmanager
    def text_cache(self) -> Iterator[None]:
        """Compute the class embeddings once for the whole block, even when the text encoder trains.

        For evaluation loops: inside, the text tower runs without autograd. With a frozen text encoder the
        embeddings are cached anyway; with a trained one the cache is dropped on exit, since the next
        optimizer step changes them.
        """
        self._cache_depth += 1
        try:
            yield
        finally:
            self._cache_depth -= 1
            if self._cache_depth == 0 and self._text_path_trains:
                self.clear_text_cache()

    # -------------------------------------------------------------------------------------------- forwards
    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return autocast(resolve_precision(self.compute_dtype, device, "backbone.dtype"), device)

    @staticmethod
    def _grad(trainable: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if trainable and torch.is_grad_enabled() else torch.no_grad()

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Videos [B, T, 3, H, W] -> normalised embeddings [B, D] (float32; see :func:`average_frames`)."""
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"VideoCLIP expects videos [B, T, 3, H, W], got shape {tuple(video.shape)}")
        with self._grad(self._image_path_trains), self._autocast(video.device):
            frames = self._encode_frames(video.flatten(0, 1))  # [B*T, D]
        return average_frames(frames, video.shape[1])

    def _encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [N, 3, H, W] -> pooled embeddings [N, D]: the image encoder (a subclass adds prompts)."""
        return self.visual(frames)

    def _encode_prompts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] -> prompt embeddings [N, D]: the text encoder (a subclass adds prompts)."""
        return self.text(tokens)

    def encode_text(self) -> torch.Tensor:
        """The class prompts -> normalised class embeddings [K, D] (float32).

        Several templates per class: the mean of their normalised embeddings, normalised again (CLIP's
        prompt ensembling). Cached while the text encoder is frozen or inside :meth:`text_cache`.
        """
        tokens = self.class_tokens
        if tokens is None:
            raise RuntimeError("no class prompts: call set_class_tokens(token_ids) before encoding text")
        key = (tokens.device, self.compute_dtype, next(self.text.parameters()).dtype)
        cacheable = not self._text_path_trains or self._cache_depth > 0
        if cacheable and self._text_cache is not None and self._text_cache_key == key:
            return self._text_cache
        with self._grad(self._text_path_trains and not cacheable), self._autocast(tokens.device):
            prompts = self._encode_prompts(tokens)  # [K*M, D]
        prompts = F.normalize(prompts.float(), dim=-1).view(self.num_classes, self.num_templates, -1)
        classes = F.normalize(prompts.mean(dim=1), dim=-1)  # [K, D]
        if cacheable:
            self._text_cache, self._text_cache_key = classes.detach(), key
        return classes

    def frame_similarity(self, video: torch.Tensor) -> torch.Tensor:
        """Videos [B, T, 3, H, W] -> cosine similarity of each frame's embedding with each class's, [B, T, K]
        (float32, without autograd): how a class's match builds up over time; the video's own embedding is
        the normalised mean of these frames'."""
        with torch.no_grad(), self._autocast(video.device):
            frames = self._encode_frames(video.flatten(0, 1))  # [B*T, D]
        frames = F.normalize(frames.float(), dim=-1).unflatten(0, tuple(video.shape[:2]))
        return frames @ self.encode_text().detach().t()

    @property
    def score_activation(self) -> str:
        """How logits become class scores: ``"sigmoid"`` for SigLIP's towers, ``"softmax"`` for CLIP's."""
        return "softmax" if self.logit_bias is None else "sigmoid"

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Videos [B, T, 3, H, W] -> logits [B, K] = exp(logit_scale) * cosine (+ logit_bias)."""
        return class_logits(self.encode_video(video), self.encode_text(), self.logit_scale, self.logit_bias)

    def fixed_classes(self) -> FixedClassVideoCLIP:
        """This model over its current class list, without its text tower (:class:`FixedClassVideoCLIP`)."""
        return FixedClassVideoCLIP(self)

    # ----------------------------------------------------------------------------------------------- state
    def _checkpoint_keys(self) -> Callable[[str], bool]:
        """The tuned parameters (and ``logit_scale`` when it trains): what a fine-tuning checkpoint stores.

        Nothing for ``tune="none"``.
        """
        return self.is_tuned

    def _mismatch_notes(self) -> tuple[str, str]:
        return f" (tune={self.tune!r})", " (a different CLIP architecture?)"

    def param_groups(self, lr: float, weight_decay: float, decay_all: bool = True) -> list[dict[str, Any]]:
        """AdamW parameter groups over the trainable parameters, each with ``lr`` set.

        ``decay_all=False`` exempts 1-D and scalar parameters (biases, LayerNorm weights, class embedding,
        ``logit_scale``) from weight decay. Groups hold ``params``, ``param_names``, ``lr``, ``lr_scale``
        and ``weight_decay``; empty groups are left out.
        """
        # NOTE(ref): ViFi-CLIP builds AdamW over model.parameters(), so every parameter is decayed,
        # LayerNorms, biases and logit_scale included; reproduced by default.
        decay: dict[str, Any] = {"params": [], "param_names": [], "weight_decay": weight_decay}
        no_decay: dict[str, Any] = {"params": [], "param_names": [], "weight_decay": 0.0}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            group = decay if decay_all or param.ndim >= 2 else no_decay
            group["params"].append(param)
            group["param_names"].append(name)
        return [{**g, "lr": lr, "lr_scale": 1.0} for g in (decay, no_decay) if g["params"]]


class FixedClassVideoCLIP(nn.Module):
    """A :class:`VideoCLIP` over one class list, as an exported model holds it: the class embeddings [K, D]
    encoded once and kept as a buffer, and no text tower. Videos [B, T, 3, H, W] (normalised) -> logits
    [B, K], the model's own in float32.

    It shares the image encoder and the logit scale with ``model``; the class embeddings are a copy, which
    a later change of the model's classes or text weights does not reach.
    """

    def __init__(self, model: VideoCLIP) -> None:
        super().__init__()
        self.visual = model.visual
        self.logit_scale = model.logit_scale
        self.logit_bias = model.logit_bias
        self.training = model.training  # the model's mode, without changing its modules'
        with torch.no_grad(), model.text_cache():
            classes = model.encode_text()
        self.register_buffer("class_embeddings", classes.detach().clone())

    def _encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [N, 3, H, W] -> pooled embeddings [N, D] (as :meth:`VideoCLIP._encode_frames`)."""
        return self.visual(frames)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        frames = self._encode_frames(video.flatten(0, 1))  # [B*T, D]
        video_embeddings = average_frames(frames, video.shape[1])
        return class_logits(video_embeddings, self.class_embeddings, self.logit_scale, self.logit_bias)
