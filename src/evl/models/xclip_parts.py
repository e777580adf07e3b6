"""The three modules X-CLIP adds to CLIP (Ni et al., "Expanding Language-Image Pretrained Models for
General Video Recognition", ECCV 2022), under the names of the official VideoX/X-CLIP code:

* :class:`CrossFrameCommunicationTransformer`: CLIP's ViT whose blocks exchange one message token per
  frame (``visual.transformer.resblocks.N.message_{fc,ln,attn}``);
* :class:`MultiframeIntegrationTransformer`: a small transformer over the T frame embeddings (``mit``);
* :class:`VideoSpecificPrompt`: class text embeddings cross-attend to the video's patch tokens
  (``prompts_generator``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evl.config import VisionConfig
from evl.models.clip_vit import Attention, CLIPVisionTransformer, ResidualAttentionBlock
from evl.models.layers import LayerNorm, activation_layer


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` in training, else scale it."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _init_linear_and_norm(module: nn.Module) -> None:
    """The reference initialisation of the new modules: truncated normal (std 0.02) Linear weights, zero
    biases, unit LayerNorms. Fused ``in_proj`` weights keep their Xavier initialisation, as
    ``nn.MultiheadAttention`` leaves them in the reference."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# -------------------------------------------------------------------- cross-frame communication transformer


class CrossFrameAttentionBlock(ResidualAttentionBlock):
    """A CLIP block with cross-frame communication (``CrossFramelAttentionBlock`` in the reference).

    Per frame, ``message_fc(CLS)`` is a message token; the T messages of a video attend to each other
    (pre-LN ``message_ln``, residual); each frame's message joins that frame's tokens for the block's
    self-attention and is dropped before the MLP, so messages are rebuilt from the CLS at every block.
    """

    def __init__(
        self, width: int, heads: int, mlp_width: int, activation: str, eps: float, drop_path: float = 0.0
    ) -> None:
        super().__init__(width, heads, mlp_width, activation, eps)
        self.message_fc = nn.Linear(width, width)
        self.message_ln = LayerNorm(width, eps=eps)
        self.message_attn = Attention(width, heads)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:  # type: ignore[override]
        """Frame tokens [B*T, L, C] (frames of one video adjacent) -> [B*T, L, C]."""
        bt, length, width = x.shape
        msg = self.message_fc(x[:, 0]).view(bt // num_frames, num_frames, width)  # [B, T, C]
        msg = msg + self.drop_path(self.message_attn(self.message_ln(msg))[0])
        x = torch.cat([x, msg.reshape(bt, 1, width)], dim=1)  # [B*T, L+1, C]
        # NOTE(ref): the official code drops paths on all three residual branches; transformers' port on
        # the message branch only. Both are the identity in evaluation; we follow the official code.
        x = x + self.drop_path(self.attn(self.ln_1(x))[0])
        x = x[:, :length]  # the message token is not passed on
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class CrossFrameCommunicationTransformer(CLIPVisionTransformer):
    """CLIP's ViT with :class:`CrossFrameAttentionBlock` blocks, OpenAI names (``conv1``, ``ln_pre``, ...).

    ``drop_path`` rises linearly from 0 at the first block to the given rate at the last, as the reference.
    """

    def __init__(self, config: VisionConfig, drop_path: float = 0.0) -> None:
        super().__init__(config)
        rates = (
            torch.linspace(0, drop_path, config.layers).tolist() if drop_path > 0 else [0.0] * config.layers
        )
        self.transformer.resblocks = nn.ModuleList(
            CrossFrameAttentionBlock(
                config.width, config.heads, config.mlp_width, config.activation, config.layer_norm_eps, rate
            )
            for rate in rates
        )

    def forward_intermediates(self, x: torch.Tensor, blocks: Sequence[int]) -> list:
        raise NotImplementedError("the cross-frame blocks need whole videos: use forward(video)")

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Videos [B, T, 3, H, W] -> last block's tokens [B*T, L, C] (no ``ln_post``)."""
        num_frames = video.shape[1]
        x = self.embed(video.flatten(0, 1))  # [B*T, L, C]
        for block in self.transformer.resblocks:
            x = block(x, num_frames)
        return x

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """Videos [B, T, 3, H, W] -> (frame embeddings [B, T, output_dim], patch tokens [B, T, h*w, C]).

        Frame embeddings are ``ln_post(CLS) @ proj``; patch tokens are the raw last-block outputs.
        """
        b, t = video.shape[:2]
        tokens = self.forward_features(video)
        frames = self.pool(tokens).unflatten(0, (b, t))  # [B, T, D]
        return frames, tokens[:, 1:].unflatten(0, (b, t))  # [B, T, h*w, C]


# ------------------------------------------------------------------------ multi-frame integration transformer


class MultiframeIntegrationTransformer(nn.Module):
    """Frame embeddings [B, T, D] -> video embedding [B, D]: + position embedding, CLIP blocks, a residual
    from the input, then the mean over frames."""

    def __init__(
        self,
        num_frames: int,
        width: int,
        layers: int,
        heads: int,
        mlp_width: int,
        activation: str,
        eps: float,
    ) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(1, num_frames, width))
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width, activation, eps) for _ in range(layers)
        )
        self.apply(_init_linear_and_norm)
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.positional_embedding.shape[1]:
            raise ValueError(
                f"the integration transformer was built for {self.positional_embedding.shape[1]} frames, "
                f"got {x.shape[1]}"
            )
        y = x + self.positional_embedding
        for block in self.resblocks:
            y, _ = block(y)
        return (y + x).mean(dim=1)


# --------------------------------------------------------------------------- video-specific prompt generator


class PromptAttention(nn.Module):
    """Multi-head cross-attention with separate q/k/v projections without bias (``MulitHeadAttention``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"prompt attention: width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """query [B, K, C], memory [B, N, C] -> [B, K, C]."""
        b, k, width = query.shape
        q = self.q_proj(query).view(b, k, self.heads, -1).transpose(1, 2)  # [B, H, K, Dh]
        key = self.k_proj(memory).view(b, memory.shape[1], self.heads, -1).transpose(1, 2)  # [B, H, N, Dh]
        value = self.v_proj(memory).view(b, memory.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, key, value)  # [B, H, K, Dh]
        return self.proj(out.transpose(1, 2).reshape(b, k, width))


class PromptGeneratorLayer(nn.Module):
    """text += CrossAttn(norm1(text), visual); text += MLP(norm3(text)) (4x, ``prompt`` activation)."""

    def __init__(self, width: int, heads: int, activation: str, eps: float) -> None:
        super().__init__()
        self.cross_attn = PromptAttention(width, heads)
        self.norm1 = LayerNorm(width, eps=eps)
        self.norm3 = LayerNorm(width, eps=eps)
        # Index 2 is the reference's (zero-rate) dropout slot: it keeps the Linear layers at mlp.0 and mlp.3.
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width),
            activation_layer(activation),
            nn.Identity(),
            nn.Linear(4 * width, width),
        )

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        text = text + self.cross_attn(self.norm1(text), visual)
        return text + self.mlp(self.norm3(text))


class VideoSpecificPrompt(nn.Module):
    """Class text embeddings [B, K, D] and the video's patch tokens [B, N, D] -> prompt [B, K, D].

    The caller adds the prompt to the text: ``text + alpha * decoder(text, norm(visual))``, with ``alpha``
    one learnable weight per channel.
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        alpha: float,
        activation: str = "quick_gelu",
        eps: float = 1e-5,
        visual_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm = LayerNorm(width, eps=visual_eps)
        self.decoder = nn.ModuleList(
            PromptGeneratorLayer(width, heads, activation, eps) for _ in range(layers)
        )
        self.alpha = nn.Parameter(torch.full((width,), float(alpha)))
        self.apply(_init_linear_and_norm)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        visual = self.norm(visual)
        for layer in self.decoder:
            text = layer(text, visual)
        return self.alpha * text
