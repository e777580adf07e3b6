"""The CLIP text encoder, with OpenAI's parameter names.

OpenAI's ``CLIP`` keeps the text tower at the top level of its state dict (``token_embedding``,
``positional_embedding``, ``transformer.resblocks.N``, ``ln_final``, ``text_projection``); this module uses
the same names, so those tensors load strict with no mapping. The blocks are the image encoder's blocks,
run with a causal mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from evl.config import TextConfig  # defined beside VisionConfig; still importable from here
from evl.models.clip_vit import Transformer
from evl.models.layers import LayerNorm

# The text towers of OpenAI's releases (the image side's presets live in evl.config).
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "ViT-B/32": dict(width=512, layers=12, heads=8, output_dim=512),
    "ViT-B/16": dict(width=512, layers=12, heads=8, output_dim=512),
    "ViT-L/14": dict(width=768, layers=12, heads=12, output_dim=768),
    "ViT-L/14@336": dict(width=768, layers=12, heads=12, output_dim=768),
    # Small random-init towers matching the small image presets, for CPU work.
    "ViT-S/16": dict(width=256, layers=6, heads=4, output_dim=256),
    "ViT-T/16": dict(width=128, layers=4, heads=2, output_dim=128),
    "ViT-T/16@112": dict(width=128, layers=4, heads=2, output_dim=128),
}


def text_preset(name: str, **overrides: Any) -> TextConfig:
    if name not in TEXT_PRESETS:
        raise ValueError(f"unknown text preset {name!r}; known presets: {', '.join(TEXT_PRESETS)}")
    return TextConfig(**{**TEXT_PRESETS[name], **overrides})


def encode_tokens(
    tower: nn.Module,
    token_ids: torch.Tensor,
    causal: bool,
    before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Token ids [N, L] -> output tokens [N, L, width] after ``ln_final``, through a text tower laid out as
    CLIP's (``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``): CLIP's with the
    causal mask, SigLIP's without.

    ``before_block(i, x)``, when given, is called on the tokens [N, L, width] entering block i (token plus
    positional embeddings for i = 0), for every block, and its result [N, L, width] goes in instead: deep
    prompts replace tokens there.
    """
    length = token_ids.shape[-1]
    if length > tower.config.context_length:
        raise ValueError(
            f"{length} tokens exceed the text encoder's context of {tower.config.context_length}"
        )
    x = tower.token_embedding(token_ids) + tower.positional_embedding[:length]
    for index, block in enumerate(tower.transformer.resblocks):
        if before_block is not None:
            x = before_block(index, x)
        x, _ = block(x, causal=causal)
    return tower.ln_final(x)


class CLIPTextTransformer(nn.Module):
    """CLIP's text encoder: token ids [N, L] -> sentence embeddings [N, output_dim] (or [N, width])."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(config)
        self.ln_final = LayerNorm(config.width, eps=config.layer_norm_eps)
        self.text_projection = (
            nn.Parameter(torch.empty(config.width, config.output_dim)) if config.output_dim else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """OpenAI's initialisation (``CLIP.initialize_parameters``)."""
        width, layers = self.config.width, self.config.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=width**-0.5)

    def eot_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[N, L] -> [N]: the first end-of-text position of each row (the last token when a row has none)."""
        is_eot = token_ids == self.config.eot_token_id
        first = is_eot.int().argmax(dim=-1)
        return torch.where(
            is_eot.any(dim=-1), first, token_ids.new_full(first.shape, token_ids.shape[-1] - 1)
        )

    def forward_tokens(
        self,
        token_ids: torch.Tensor,
        before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token ids [N, L] -> output tokens [N, L, width] after ``ln_final`` (``before_block``: see
        :func:`encode_tokens`)."""
        return encode_tokens(self, token_ids, causal=True, before_block=before_block)

    def forward(
        self,
        token_ids: torch.Tensor,
        before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token ids [N, L] -> embeddings [N, output_dim]: the end-of-text token, projected ([N, width]
        when the config has no projection). ``before_block``: see :func:`encode_tokens`."""
        x = self.forward_tokens(token_ids, before_block=before_block)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(token_ids)]
        return pooled if self.text_projection is None else pooled @ self.text_projection
