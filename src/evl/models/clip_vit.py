"""The CLIP ViT image encoder, with OpenAI's parameter names.

Because the names match OpenAI's ``model.visual`` (and open_clip's), those checkpoints load strict with no
key mapping. Beyond the usual image embedding, :meth:`CLIPVisionTransformer.forward_intermediates` returns,
for the requested blocks only, the raw block output and the block's own attention q and k, which is what
EVL's decoder and its temporal cross-attention consume.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from evl.config import VisionConfig
from evl.devices import tracing
from evl.models.layers import LayerNorm, QuickGELU, activation_layer
from evl.positions import resize_position_table

# Tokens per MLP matmul on CPUs when no gradient is needed (memory, not speed: the hidden tensors' size).
MLP_TOKENS_PER_PIECE = 800


class BlockFeatures(NamedTuple):
    """What one backbone block hands to the decoder.

    ``out``: block output (residual stream), [N, L, C]. ``q``, ``k``: the block's self-attention query and
    key after projection (bias included), split into heads and not scaled, [N, L, H, Dh].
    Leading dimensions may also be [B, T, ...] once a video model has unflattened them.
    """

    out: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor


class Attention(nn.Module):
    """Multi-head self-attention with OpenAI's fused ``in_proj`` parameters and fused SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: torch.Tensor, return_qk: bool = False, causal: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """x: [N, L, C] -> ([N, L, C], (q, k) each [N, L, H, Dh] when ``return_qk``).

        ``causal``: each token attends to itself and earlier tokens only (CLIP's text encoder).
        """
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, width // self.heads).unbind(2)  # each [N, L, H, Dh]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        )
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, width))
        return out, ((q, k) if return_qk else None)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str, eps: float) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, mlp_width),
                gelu=activation_layer(activation),
                c_proj=nn.Linear(mlp_width, width),
            )
        )

    def forward(
        self, x: torch.Tensor, return_qk: bool = False, causal: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        attn_out, qk = self.attn(self.ln_1(x), return_qk=return_qk, causal=causal)
        x = _residual_add(x, attn_out)
        return _residual_add(x, self._mlp(self.ln_2(x))), qk

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if _needs_plain_ops() or not isinstance(self.mlp.gelu, QuickGELU):
            return self.mlp(x)
        # Without autograd: a few hundred tokens at a time, with QuickGELU (x * sigmoid(1.702 x)) in place,
        # so the [tokens, 4C] hidden tensors stay a few MiB (19 MiB each for 8 frames of ViT-B/16 at once).
        tokens = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(tokens)
        # On a GPU every piece is a few kernel launches and memory is plentiful: one piece.
        pieces = -(-tokens.shape[0] // MLP_TOKENS_PER_PIECE) if x.device.type == "cpu" else 1
        for part, target in zip(tokens.chunk(pieces), out.chunk(pieces), strict=True):
            hidden = self.mlp.c_fc(part)
            hidden.mul_(torch.sigmoid_(hidden * 1.702))
            target.copy_(self.mlp.c_proj(hidden))
        return out.view(x.shape)


def _residual_add(x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + update; without autograd written into ``update`` (a block's own fresh output), saving a buffer."""
    if _needs_plain_ops() or update.dtype != x.dtype or update.shape != x.shape:
        return x + update
    return update.add_(x)


def _needs_plain_ops() -> bool:
    """Autograd is recording, or a tracer is (a traced graph must not depend on buffer reuse, nor hold a
    loop sized by the batch)."""
    return torch.is_grad_enabled() or tracing()


class Transformer(nn.Module):
    """A stack of blocks; exists so that parameter names read ``transformer.resblocks.N`` as OpenAI's.

    ``config`` is a vision or text config: anything with width, layers, heads, mlp_width, activation and
    layer_norm_eps.
    """

    def __init__(self, config: VisionConfig | Any) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(
                config.width, config.heads, config.mlp_width, config.activation, config.layer_norm_eps
            )
            for _ in range(config.layers)
        )


class ImageEncoder(nn.Module):
    """What the image encoder families share: tokens from :meth:`embed` through the blocks of
    :meth:`block_stack`, shallow to deep, and a pooled embedding from :meth:`pool`.

    A family provides those three (and ``config``); the decoder's reads of the blocks and the plain forward
    are written once here. The blocks take ``(x, return_qk)`` and return ``(x, (q, k) or None)``.
    """

    config: VisionConfig

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block_stack(self) -> nn.ModuleList:
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_intermediates(self, x: torch.Tensor, blocks: Sequence[int]) -> list[BlockFeatures]:
        """Images [N, 3, H, W] -> one :class:`BlockFeatures` per requested block, in the order requested.

        Only blocks up to the deepest requested one run, q/k are kept for the requested blocks only, and the
        final norm (and projection or pooling) is not applied: the decoder reads the raw residual stream.
        """
        kept = dict(self.iter_intermediates(x, blocks))
        return [kept[b] for b in blocks]

    def iter_intermediates(
        self, x: torch.Tensor, blocks: Sequence[int]
    ) -> Iterator[tuple[int, BlockFeatures]]:
        """As :meth:`forward_intermediates`, but yields (block index, features) shallow to deep as soon as
        each requested block has run. A consumer that keeps only what it needs of each before asking for the
        next (e.g. not q and k) holds one block's q and k at a time instead of all of them."""
        stack = self.block_stack()
        wanted = sorted(set(blocks))
        if not wanted:
            raise ValueError("forward_intermediates needs at least one block index")
        if wanted[0] < 0 or wanted[-1] >= len(stack):
            raise ValueError(f"block indices {list(blocks)} are outside the encoder's {len(stack)} blocks")
        x = self.embed(x)
        for index, block in enumerate(stack[: wanted[-1] + 1]):
            keep = index in wanted
            x, qk = block(x, return_qk=keep)
            if keep:
                features = BlockFeatures(x, *qk)
                del qk  # the consumer decides how long q and k live
                yield index, features
                del features

    def forward_features(
        self,
        x: torch.Tensor,
        before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Images [N, 3, H, W] -> output tokens of the last block [N, L, C] (before the final norm).

        ``before_block(i, tokens)``, when given, is called on the tokens [N, L', C] entering block i, for
        every block, and its result goes in instead: deep prompts add or replace tokens there (the token
        count may change, so the output is then [N, L', C]).
        """
        x = self.embed(x)
        for index, block in enumerate(self.block_stack()):
            if before_block is not None:
                x = before_block(index, x)
            x, _ = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] -> pooled embeddings [N, D]."""
        return self.pool(self.forward_features(x))


class CLIPVisionTransformer(ImageEncoder):
    """CLIP's ViT image encoder (OpenAI ``VisionTransformer`` layout and names)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        width, patch = config.width, config.patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.num_tokens, width))
        self.ln_pre = LayerNorm(width, eps=config.layer_norm_eps)
        self.transformer = Transformer(config)
        self.ln_post = LayerNorm(width, eps=config.layer_norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(width, config.output_dim)) if config.output_dim else None

    # ------------------------------------------------------------------------------------------- embedding
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"CLIP image encoder expects images [N, 3, H, W], got shape {tuple(x.shape)}")
        p = self.config.patch_size
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not a multiple of the patch size {p}")

    def positional_embedding_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1 + grid_h*grid_w, C]: the learned table, resized bicubically when the grid differs (as CLIP)."""
        return resize_position_table(self.positional_embedding, (grid_h, grid_w), prefix=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] -> tokens [N, 1 + h*w, C] (CLS first, patches row-major), after ``ln_pre``."""
        self._check_input(x)
        x = self.conv1(x.to(self.conv1.weight.dtype))  # [N, C, h, w]
        grid_h, grid_w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding_for(grid_h, grid_w).to(x.dtype)
        return self.ln_pre(x)

    # -------------------------------------------------------------------------------------------- forwards
    def block_stack(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [N, L, C] -> image embedding [N, D]: ``ln_post`` of CLS, projected when ``proj`` exists."""
        x = self.ln_post(tokens[:, 0])
        return x @ self.proj.to(x.dtype) if self.proj is not None else x
