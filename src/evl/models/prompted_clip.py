"""Deep vision-language prompts on frozen CLIP towers: ViFi-CLIP's "bridge and prompt" stage.

ViFi-CLIP (Rasheed et al., CVPR 2023) adapts CLIP to a low-data video task in two steps: first the whole
model is fine-tuned on a large video dataset (the *bridge*: a ViFi-CLIP run, see :mod:`evl.models.vificlip`),
then both towers are frozen and only prompt vectors learn the new task. The reference calls the prompting
scheme IVLP (independent vision-language prompting): each tower gets its own deep prompts, with no coupling
between them.

* Image encoder: ``n_v`` prompt tokens are appended after the CLS and patch tokens; before each block
  ``1 <= i < depth_v`` they are replaced by that block's own vectors, and deeper blocks carry them on as
  the blocks made them. The embedding is CLIP's (``ln_post`` of CLS, projected); the prompt tokens are
  dropped first.
* Text encoder: class prompts are ``prefix + " " + name + "."``. The ``n_t`` word embeddings after the
  start-of-text token are replaced by learned context vectors (positional embeddings added as usual), and
  before each block ``1 <= i < depth_t`` those positions are replaced by that block's own vectors. Pooling
  at end-of-text is CLIP's.

Everything else (both towers, ``logit_scale``) is frozen: only the prompt vectors train, and only they go
into checkpoints. Frames are averaged and normalised, and the logits are ``exp(logit_scale) * cosine``,
exactly as :class:`~evl.models.vificlip.VideoCLIP`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from evl.models.clip_text import CLIPTextTransformer
from evl.models.clip_vit import CLIPVisionTransformer
from evl.models.vificlip import FixedClassVideoCLIP, VideoCLIP
from evl.tokenizer import default_tokenizer

__all__ = [
    "PROMPT_INIT_MAX_TOKENS",
    "DeepPrompts",
    "FixedClassPromptedVideoCLIP",
    "PromptedVideoCLIP",
    "encode_prompted_images",
    "prompt_prefix",
    "prompt_template",
    "text_prompt_hook",
    "vision_prompt_hook",
]

# NOTE(ref): the reference initialises the text context from its CTX_INIT words only when there are at
# most 4 context tokens; with more, the vectors are random and the prompt text is "X X ... X".
PROMPT_INIT_MAX_TOKENS = 4
PROMPT_STD = 0.02  # the reference's normal initialisation of every prompt vector

BeforeBlock = Callable[[int, torch.Tensor], torch.Tensor]


def prompt_prefix(num_tokens: int, init: str | None) -> str:
    """The text before the class name, whose first ``num_tokens`` words the learned context replaces:
    ``init`` when given and ``num_tokens <= 4``, else ``num_tokens`` placeholder words ``"X X ... X"``."""
    if init is not None and num_tokens <= PROMPT_INIT_MAX_TOKENS:
        return init.replace("_", " ")  # NOTE(ref): CTX_INIT is written with underscores in its configs
    return " ".join(["X"] * num_tokens)


def prompt_template(num_tokens: int, init: str | None) -> str:
    """The class-prompt template: ``prefix + " {}."`` (NOTE(ref): the reference builds
    ``prompt_prefix + " " + name + "."``)."""
    return prompt_prefix(num_tokens, init) + " {}."


class DeepPrompts(nn.Module):
    """The learnable prompt vectors of one tower: ``vectors`` [depth, num_tokens, width].

    Row 0 enters with the input tokens (the image encoder's appended prompts, the text encoder's context);
    row i, ``1 <= i < depth``, replaces the prompt tokens before block i. Every row is drawn from
    N(0, 0.02^2); ``context`` [num_tokens, width], when given, initialises row 0 instead.
    """

    def __init__(self, num_tokens: int, depth: int, width: int, context: torch.Tensor | None = None) -> None:
        super().__init__()
        if num_tokens < 1 or depth < 1:
            raise ValueError(
                f"deep prompts need at least one token and one layer, got {num_tokens} and {depth}"
            )
        self.vectors = nn.Parameter(torch.empty(depth, num_tokens, width))
        nn.init.normal_(self.vectors, std=PROMPT_STD)
        if context is not None:
            if tuple(context.shape) != (num_tokens, width):
                raise ValueError(
                    f"context init has shape {tuple(context.shape)}, expected ({num_tokens}, {width})"
                )
            with torch.no_grad():
                self.vectors[0].copy_(context)

    @property
    def depth(self) -> int:
        return self.vectors.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.vectors.shape[1]

    def layer(self, block: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """Row ``block`` for a batch: [batch, num_tokens, width] in ``dtype`` (a view, no copy per row)."""
        return self.vectors[block].to(dtype).expand(batch, -1, -1)


def vision_prompt_hook(prompts: DeepPrompts, norm: nn.Module | None = None) -> BeforeBlock:
    """``before_block`` for :meth:`ImageEncoder.forward_features`: tokens [N, L, C] -> [N, L + n, C].

    Before block 0 the prompts are appended after every token, through ``norm`` (the encoder's ``ln_pre``,
    which its ``embed`` has already applied to the other tokens); before block ``1 <= i < depth`` the last
    n tokens are replaced by row i; deeper blocks get the tokens as they are.
    """
    n = prompts.num_tokens

    def before_block(block: int, x: torch.Tensor) -> torch.Tensor:
        if block == 0:
            # NOTE(ref): the reference appends the prompts after the position embeddings and before
            # ln_pre; a LayerNorm acts on each token alone, so normalising them apart is the same.
            first = prompts.vectors[0]
            first = norm(first) if norm is not None else first
            return torch.cat([x, first.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        if block < prompts.depth:
            return torch.cat([x[:, :-n], prompts.layer(block, x.shape[0], x.dtype)], dim=1)
        return x

    return before_block


def text_prompt_hook(prompts: DeepPrompts, positional_embedding: torch.Tensor) -> BeforeBlock:
    """``before_block`` for :func:`~evl.models.clip_text.encode_tokens`: tokens [N, L, C] -> [N, L, C].

    Before block 0 positions 1..n (the prefix's words after start-of-text) become the context (row 0) plus
    their positional embeddings; before block ``1 <= i < depth`` they become row i; deeper blocks get the
    tokens as they are.
    """
    n = prompts.num_tokens

    def before_block(block: int, x: torch.Tensor) -> torch.Tensor:
        if block == 0:
            # NOTE(ref): the reference concatenates [SOS embedding, context, suffix embeddings] and then
            # adds the positional embeddings; replacing the summed tokens adds the same numbers.
            context = prompts.vectors[0] + positional_embedding[1 : 1 + n]
            middle = context.to(x.dtype).expand(x.shape[0], -1, -1)
        elif block < prompts.depth:
            middle = prompts.layer(block, x.shape[0], x.dtype)
        else:
            return x
        return torch.cat([x[:, :1], middle, x[:, 1 + n :]], dim=1)

    return before_block


def encode_prompted_images(
    visual: CLIPVisionTransformer, prompts: DeepPrompts | None, images: torch.Tensor
) -> torch.Tensor:
    """Images [N, 3, H, W] -> pooled embeddings [N, D] through ``visual`` with deep prompts (None: the plain
    encoder). The prompt tokens are dropped before pooling."""
    if prompts is None:
        return visual(images)
    tokens = visual.forward_features(images, before_block=vision_prompt_hook(prompts, visual.ln_pre))
    return visual.pool(tokens[:, : -prompts.num_tokens])  # [N, L, C]: the encoder's own tokens


class PromptedVideoCLIP(VideoCLIP):
    """Videos [B, T, 3, H, W] (normalised) -> logits [B, K]: frozen CLIP towers with trained deep prompts.

    Args:
        visual, text: CLIP's image and text encoders (frozen here; nothing else is accepted: the prompts
            enter their token streams).
        logit_scale: the log of the logit temperature (frozen).
        vision_tokens, vision_depth: prompt tokens of the image encoder and the number of its layers, from
            the input, that get their own (0 tokens: no prompts, the plain encoder).
        text_tokens, text_depth: the same for the text encoder's context.
        prompt_init: words that initialise a context of at most 4 tokens (see :func:`prompt_prefix`).
        compute_dtype, tokenizer: as :class:`VideoCLIP`.

    Class prompts must be tokenized from :attr:`template` (``prefix + " {}."``): :meth:`set_class_tokens`
    checks that they start with the prefix's words.
    """

    def __init__(
        self,
        visual: nn.Module,
        text: nn.Module,
        logit_scale: float = math.log(1 / 0.07),
        *,
        vision_tokens: int = 10,
        vision_depth: int = 12,
        text_tokens: int = 10,
        text_depth: int = 12,
        prompt_init: str | None = "a photo of a",
        compute_dtype: str = "auto",
        tokenizer: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        if not (isinstance(visual, CLIPVisionTransformer) and isinstance(text, CLIPTextTransformer)):
            raise ValueError(
                "deep prompts enter CLIP's image and text encoders; got "
                f"{type(visual).__name__} and {type(text).__name__}"
            )
        for what, tokens, depth, layers in (
            ("vision", vision_tokens, vision_depth, visual.config.layers),
            ("text", text_tokens, text_depth, text.config.layers),
        ):
            if tokens < 0:
                raise ValueError(f"{what}_tokens must be 0 or more, got {tokens}")
            if tokens and not 1 <= depth <= layers:
                raise ValueError(f"{what}_depth must be 1 to the encoder's {layers} layers, got {depth}")
        super().__init__(
            visual, text, logit_scale, tune="none", compute_dtype=compute_dtype, tokenizer=tokenizer
        )
        self.prefix = prompt_prefix(text_tokens, prompt_init)
        # The prefix's word ids (after start-of-text), which every class prompt starts with.
        self.prefix_ids = self._prefix_ids(text_tokens, tokenizer or default_tokenizer())
        context = None
        if text_tokens and prompt_init is not None and text_tokens <= PROMPT_INIT_MAX_TOKENS:
            with torch.no_grad():  # NOTE(ref): the init words' token embeddings, positions 1..n
                context = text.token_embedding.weight[self.prefix_ids].clone()
        self.vision_prompts = (
            DeepPrompts(vision_tokens, vision_depth, visual.config.width) if vision_tokens else None
        )
        self.text_prompts = (
            DeepPrompts(text_tokens, text_depth, text.config.width, context) if text_tokens else None
        )

    def _prefix_ids(self, num_tokens: int, tokenizer: Callable[..., torch.Tensor]) -> torch.Tensor:
        """[num_tokens] ids of the prefix's first words: the positions the context replaces."""
        context_length = self.text.config.context_length
        if num_tokens + 2 > context_length:
            raise ValueError(
                f"text_tokens {num_tokens} leave no room in the text encoder's {context_length} positions"
            )
        ids = tokenizer([self.prefix], context_length=context_length)[0]
        words = int(self.text.eot_positions(ids[None])[0]) - 1  # between start and end of text
        if words < num_tokens:
            raise ValueError(
                f"the prompt prefix {self.prefix!r} is {words} tokens, fewer than the {num_tokens} context "
                "tokens it should hold"
            )
        return ids[1 : 1 + num_tokens].clone()

    @property
    def template(self) -> str:
        """The class-prompt template: ``prefix + " {}."``."""
        return self.prefix + " {}."

    # -------------------------------------------------------------------------------------------- training
    @property
    def _image_path_trains(self) -> bool:
        return self.vision_prompts is not None

    @property
    def _text_path_trains(self) -> bool:
        return self.text_prompts is not None

    def is_tuned(self, name: str) -> bool:
        """Whether the parameter called ``name`` trains: the prompt vectors, nothing else."""
        return name.startswith(("vision_prompts.", "text_prompts."))

    def _mismatch_notes(self) -> tuple[str, str]:
        return " (deep prompts only)", " (other prompt token counts or depths?)"

    # -------------------------------------------------------------------------------------------- classes
    def set_class_tokens(self, token_ids: torch.Tensor, num_templates: int = 1) -> None:
        """As :meth:`VideoCLIP.set_class_tokens`; each prompt must start with the prefix's words (positions
        1..n are what the learned context replaces)."""
        n = len(self.prefix_ids)
        if n and token_ids.ndim == 2:
            starts = token_ids[:, 1 : 1 + n].cpu()
            if starts.shape[1] < n or not bool((starts == self.prefix_ids).all()):
                raise ValueError(
                    f"class prompts must be tokenized from the template {self.template!r}: the learned "
                    f"context replaces the {n} words after start-of-text"
                )
        super().set_class_tokens(token_ids, num_templates)

    # -------------------------------------------------------------------------------------------- forwards
    def _encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return encode_prompted_images(self.visual, self.vision_prompts, frames)

    def _encode_prompts(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text_prompts is None:
            return self.text(tokens)
        return self.text(
            tokens, before_block=text_prompt_hook(self.text_prompts, self.text.positional_embedding)
        )

    def fixed_classes(self) -> FixedClassPromptedVideoCLIP:
        """This model over its current class list, without its text tower."""
        return FixedClassPromptedVideoCLIP(self)


class FixedClassPromptedVideoCLIP(FixedClassVideoCLIP):
    """A :class:`PromptedVideoCLIP` over one class list, as an exported model holds it: the class embeddings
    stored, the image encoder with its deep prompts (shared with the model)."""

    def __init__(self, model: PromptedVideoCLIP) -> None:
        super().__init__(model)
        self.vision_prompts = model.vision_prompts

    def _encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return encode_prompted_images(self.visual, self.vision_prompts, frames)
