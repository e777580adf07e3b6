"""The SigLIP ViT image encoder (SigLIP and SigLIP 2 at a fixed resolution).

The tower differs from CLIP's in four places: the patch convolution has a bias, there is no class token (the
tokens are the patches alone), there is no LayerNorm before the blocks, and the image embedding comes from
an attention-pooling head over the final tokens instead of a class token. The blocks are CLIP's pre-norm
blocks (:class:`~evl.models.clip_vit.Transformer`) with a GELU-tanh MLP, so EVL reads every block's output
and q/k exactly as it does CLIP's. The embedding and head names follow Hugging Face's ``SiglipVisionModel``;
:mod:`evl.weights.siglip` maps its checkpoints onto them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from evl.config import VisionConfig
from evl.models.clip_vit import ImageEncoder, Transformer
from evl.models.layers import LayerNorm, activation_layer
from evl.positions import resize_position_table


class AttentionPoolingHead(nn.Module):
    """Multi-head attention pooling (MAP): a learned probe attends over the tokens, then a residual MLP.

    Names and computation are those of Hugging Face's ``SiglipMultiheadAttentionPoolingHead``
    (``nn.MultiheadAttention``'s fused ``in_proj``).
    """

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str, eps: float) -> None:
        super().__init__()
        self.probe = nn.Parameter(width**-0.5 * torch.randn(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, mlp_width),
                gelu=activation_layer(activation),
                c_proj=nn.Linear(mlp_width, width),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [N, L, C] -> pooled [N, C]."""
        probe = self.probe.to(x.dtype).expand(x.shape[0], -1, -1)
        x, _ = self.attention(probe, x, x, need_weights=False)
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


class SigLIPVisionTransformer(ImageEncoder):
    """SigLIP's ViT image encoder: images [N, 3, S, S] -> pooled embeddings [N, width]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.family != "siglip":
            raise ValueError(f"SigLIPVisionTransformer takes a siglip config, not {config.family}")
        if config.output_dim is not None:
            raise ValueError(
                f"SigLIP's pooled embedding keeps the encoder's width: output_dim must be None, "
                f"got {config.output_dim}"
            )
        self.config = config
        width, patch = config.width, config.patch_size
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(width**-0.5 * torch.randn(config.num_patches, width))
        self.transformer = Transformer(config)
        self.post_layernorm = LayerNorm(width, eps=config.layer_norm_eps)
        self.head = (
            AttentionPoolingHead(
                width, config.heads, config.mlp_width, config.activation, config.layer_norm_eps
            )
            if config.pool_head
            else None
        )

    # ------------------------------------------------------------------------------------------- embedding
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"SigLIP image encoder expects images [N, 3, H, W], got shape {tuple(x.shape)}")
        p = self.config.patch_size
        if x.shape[2] < p or x.shape[3] < p:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is smaller than the patch size {p}")

    def position_embedding_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[grid_h*grid_w, C]: the learned table, resized bicubically when the grid differs.

        NOTE(ref): as transformers' ``interpolate_pos_encoding`` for SigLIP (a table without class row).
        """
        return resize_position_table(self.position_embedding, (grid_h, grid_w))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] -> patch tokens [N, h*w, C], row-major, position embedding added.

        NOTE(ref): the convolution has "valid" padding: rows and columns past the last whole patch are
        dropped (SigLIP So400m/14 reads 384 px as 27 patches of 14).
        """
        self._check_input(x)
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [N, C, h, w]
        grid_h, grid_w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
        return x + self.position_embedding_for(grid_h, grid_w).to(x.dtype)

    # -------------------------------------------------------------------------------------------- forwards
    def block_stack(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [N, L, C] -> image embedding [N, C]: ``post_layernorm``, then the attention-pooling head.

        A tower without the head (transformers' ``vision_use_head=False``, whose ``pooler_output`` is None)
        pools by the mean of the normalised tokens, as big_vision's ``pool_type="gap"``.
        """
        x = self.post_layernorm(tokens)
        return self.head(x) if self.head is not None else x.mean(dim=1)
