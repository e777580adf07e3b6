"""What the engine may rely on in any video model, whichever method built it.

The engine trains, evaluates, checkpoints and predicts through these members only; a new method's model
provides them and needs no branch in the engine. Models that classify by text (any class list, no fixed
classifier) also take tokenized class prompts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from evl.config import VisionConfig
from evl.models.clip_vit import BlockFeatures


@runtime_checkable
class VisionEncoder(Protocol):
    """An image encoder of any family (``models/encoders.py``): images [N, 3, S, S] (normalised) in.

    Tokens [N, L, C] are laid out as ``config`` says: ``config.prefix_tokens`` class/register tokens, then
    the ``config.num_patches`` patch tokens, row-major.
    """

    config: VisionConfig

    def iter_intermediates(
        self, x: torch.Tensor, blocks: Sequence[int]
    ) -> Iterator[tuple[int, BlockFeatures]]:
        """(block index, block output and its attention q/k) for the requested blocks, shallow to deep, as
        each block finishes; only blocks up to the deepest requested one run."""
        ...

    def forward_intermediates(self, x: torch.Tensor, blocks: Sequence[int]) -> list[BlockFeatures]: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> pooled embeddings [N, D]."""
        ...


@runtime_checkable
class VideoModel(Protocol):
    """Videos [B, T, 3, H, W] (normalised) -> logits [B, K]; an ``nn.Module``."""

    @property
    def vision_config(self) -> VisionConfig:
        """The image encoder's config: input size and normalisation for the data pipeline."""
        ...

    @property
    def num_classes(self) -> int: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores (nothing for a model with no trainable parameters)."""
        ...

    def load_trainable_state_dict(
        self, state: Mapping[str, torch.Tensor], source: str = "checkpoint"
    ) -> None:
        """Strict load of :meth:`trainable_state_dict`; a mismatch is a one-line ValueError naming
        ``source``."""
        ...

    def forward(self, video: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TextVideoModel(VideoModel, Protocol):
    """A video model that matches videos against class prompts encoded by its text tower.

    Optional members the engine looks for: ``text_cache()`` (a context in which the class prompts are
    encoded once, see ``inference_context``) and ``fixed_classes()`` (the model over its current class list
    with the class embeddings stored and no text tower: what an export holds).
    """

    @property
    def context_length(self) -> int:
        """Tokens per prompt the text tower takes: what class prompts are tokenized to."""
        ...

    def set_class_tokens(self, token_ids: torch.Tensor, num_templates: int = 1) -> None:
        """Tokenized prompts [K * num_templates, L], class-major: the classes ``forward`` predicts."""
        ...
