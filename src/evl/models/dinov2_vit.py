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
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evl.config import VisionConfig
from evl.models.clip_vit import Attention, BlockFeatures
from evl.models.layers import LayerNorm, activation_layer


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


class DINOv2VisionTransformer(nn.Module):
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
        pos = self.pos_embed
        grid = self.config.grid_size
        if (grid_h, grid_w) == (grid, grid):
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # [1, C, g, g]
        patch_pos = F.interpolate(
            patch_pos.float(),
            size=(grid_h, grid_w),
            mode="bicubic",
            align_corners=False,
            antialias=self.config.register_tokens > 0,
        ).to(pos.dtype)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos], dim=0)

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
    def forward_intermediates(self, x: torch.Tensor, blocks: Sequence[int]) -> list[BlockFeatures]:
        """Images [N, 3, H, W] -> one :class:`BlockFeatures` per requested block, in the order requested.

        Only blocks up to the deepest requested one run, q/k are kept for the requested blocks only, and the
        final ``norm`` is not applied: the decoder reads the raw residual stream.
        """
        kept = dict(self.iter_intermediates(x, blocks))
        return [kept[b] for b in blocks]

    def iter_intermediates(
        self, x: torch.Tensor, blocks: Sequence[int]
    ) -> Iterator[tuple[int, BlockFeatures]]:
        """As :meth:`forward_intermediates`, but yields (block index, features) shallow to deep as soon as
        each requested block has run, so that a consumer holds one block's q and k at a time."""
        wanted = sorted(set(blocks))
        if not wanted:
            raise ValueError("forward_intermediates needs at least one block index")
        if wanted[0] < 0 or wanted[-1] >= len(self.blocks):
            raise ValueError(
                f"block indices {list(blocks)} are outside the encoder's {len(self.blocks)} blocks"
            )
        x = self.embed(x)
        for index, block in enumerate(self.blocks[: wanted[-1] + 1]):
            keep = index in wanted
            x, qk = block(x, return_qk=keep)
            if keep:
                features = BlockFeatures(x, *qk)
                del qk  # the consumer decides how long q and k live
                yield index, features
                del features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] -> output tokens of the last block [N, L, C] (no final ``norm``)."""
        x = self.embed(x)
        for block in self.blocks:
            x, _ = block(x)
        return x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [N, L, C] -> image embedding [N, C]: the final-normed CLS token (as ``pooler_output``)."""
        return self.norm(tokens[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] -> embeddings [N, width]."""
        return self.pool(self.forward_features(x))
