"""What the engine may rely on in any video model, whichever method built it.

The engine trains, evaluates, checkpoints and predicts through these members only; a new method's model
provides them and needs no branch in the engine. Models that classify by text (any class list, no fixed
classifier) also take tokenized class prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from evl.config import VisionConfig


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
    """A video model that matches videos against class prompts encoded by its text tower."""

    @property
    def context_length(self) -> int:
        """Tokens per prompt the text tower takes: what class prompts are tokenized to."""
        ...

    def set_class_tokens(self, token_ids: torch.Tensor, num_templates: int = 1) -> None:
        """Tokenized prompts [K * num_templates, L], class-major: the classes ``forward`` predicts."""
        ...
