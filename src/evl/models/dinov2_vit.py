"""The DINOv2 ViT image encoder (Oquab et al., 2023), with or without registers (Darcet et al., 2024).

Tokens are laid out [CLS, registers..., patches]: the registers are extra learned tokens that absorb the
global computation DINOv2 otherwise does in a few high-norm patch tokens; they get no position embedding.
Blocks are pre-norm with a learned per-channel scale on each residual branch (LayerScale); there is no norm
before the first block and one after the last. Names are Meta's where they fit (``cls_token``,
``register_tokens``, ``pos_embed``, ``blocks.N.norm1``, ``mlp.fc1``, ``norm``); the attention is CLIP's, with
fused q/k/v (``attn.in_proj_weight``). Hugging Face files map onto these names in :mod:`evl.weights.dinov2`.

As every encoder here (:class:`~evl.models.protocol.VisionEncoder`), it hands EVL the raw block outputs and
each requested block's own attention q and k.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from evl.config import VisionConfig
from evl.models.clip_vit import Attention, ImageEncoder
from evl.models.layers import LayerNorm, activation_layer
from evl.positions import resize_position_table


class LayerScaleBlock(nn.Module):
    """Pre-norm transformer block with LayerScale: x + γ1·attn(norm1(x)), then x + γ2·mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str, eps: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        # NOTE(ref): Meta trains from 1e-5, each block starting near the identity; a random backbone here
        # serves shapes and plumbing, so it starts at 1 (transformers' default) and every block counts.
        self.layer_scale1 = nn.Parameter(torch.ones(width))
        self.norm2 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(width, mlp_width),
                act=activation_layer(activation),
                fc2=nn.Linear(mlp_width, width),
            )
        )
        self.layer_scale2 = nn.Parameter(torch.ones(width))

    def forward(
        self, x: torch.Tensor, return_qk: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        attn_out, qk = self.attn(self.norm1(x), return_qk=return_qk)
        x = x + self.layer_scale1 * attn_out
        x = x + self.layer_scale2 * self.mlp(self.norm2(x))
        return x, qk


class DINOv2VisionTransformer(ImageEncoder):
    """DINOv2's ViT: patch embedding, [CLS, registers, patches] tokens, LayerScale blocks, final norm."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.family != "dinov2":
            raise ValueError(f"DINOv2VisionTransformer needs a dinov2 config, got family {config.family!r}")
        self.config = config
        width, patch = config.width, config.patch_size
        scale = width**-0.5
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(scale * torch.randn(width))
        # Absent without registers, so that a register-free checkpoint loads strict.
        self.register_tokens = (
            nn.Parameter(scale * torch.randn(config.register_tokens, width))
            if config.register_tokens
            else None
        )
        self.pos_embed = nn.Parameter(scale * torch.randn(1 + config.num_patches, width))  # CLS + patches
        self.blocks = nn.ModuleList(
            LayerScaleBlock(width, config.heads, config.mlp_width, config.activation, config.layer_norm_eps)
            for _ in range(config.layers)
        )
        self.norm = LayerNorm(width, eps=config.layer_norm_eps)

    # ------------------------------------------------------------------------------------------- embedding
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DINOv2 image encoder expects images [N, 3, H, W], got shape {tuple(x.shape)}")
        p = self.config.patch_size
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not a multiple of the patch size {p}")

    def pos_embed_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1 + grid_h*grid_w, C]: the learned table, its patch part resized bicubically when the grid
        differs.

        NOTE(ref): as transformers' ``Dinov2Model`` and ``Dinov2WithRegistersModel`` do it: to the target
        size, in float32, with antialiasing for the register models only. Meta's code for the models without
        registers scales by (grid + 0.1) / old grid instead, which lands a hair away from these values.
        """
        antialias = self.config.register_tokens > 0
        return resize_position_table(self.pos_embed, (grid_h, grid_w), prefix=1, antialias=antialias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] -> tokens [N, 1 + R + h*w, C]: CLS, the R registers, patches row-major."""
        self._check_input(x)
        x = self.patch_embed(x.to(self.patch_embed.weight.dtype))  # [N, C, h, w]
        grid_h, grid_w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed_for(grid_h, grid_w).to(x.dtype)
        if self.register_tokens is None:
            return x
        # NOTE(ref): registers go in after the position embedding, between CLS and the patches (Meta's order).
        registers = self.register_tokens.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)

    # -------------------------------------------------------------------------------------------- forwards
    def block_stack(self) -> nn.ModuleList:
        return self.blocks

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [N, L, C] -> image embedding [N, C]: the final-normed CLS token (as ``pooler_output``)."""
        return self.norm(tokens[:, 0])
