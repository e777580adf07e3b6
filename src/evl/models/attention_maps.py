"""Where EVL looks: the attention maps behind its prediction (the EVL paper's Fig. 4 and Fig. 6).

* The video-level query's attention in each decoder layer, over every frame's tokens of the memory that
  layer reads (block output plus the temporal terms): what the decoder gathers from where.
* The frozen image encoder's own class token attention in the same block, frame by frame: what CLIP alone
  would look at (Fig. 4's second row).
* The cross-frame attention the temporal module reads (Fig. 6): for a patch of frame t, its attention over
  the patches of frames t-1 and t+1, from the frozen q and k.

All maps are head-averaged softmax weights, so each sums to one over what it attends to (see
:class:`EVLAttention`). They are computed beside the model's own forward, in the straightforward
formulation, and the logits returned with them equal the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evl.models.evl import EVL
from evl.models.frame_features import frame_features


@dataclass(frozen=True)
class EVLAttention:
    """The maps of a batch of B clips of T frames, L = prefix tokens + P patches per frame, M decoder layers.

    ``query``: [B, M, T, L], the decoder query's attention over layer m's memory; sums to one over (T, L).
    ``class_token``: [B, M, T, L], the encoder's class token's attention over its own frame in the block
    layer m reads; sums to one over L. None for encoders without a class token (SigLIP).
    ``cross_frame``: [B, M, 2, T-1, P, P] (None for one frame): index 0 frame t+1 attending to frame t,
    index 1 frame t attending to frame t+1 (see :class:`~evl.models.frame_features.FrameFeatures`); each
    row sums to one over the P key patches.
    ``logits``: [B, K], equal to the model's. ``blocks``: the encoder block each layer reads.
    """

    query: torch.Tensor
    class_token: torch.Tensor | None
    cross_frame: torch.Tensor | None
    logits: torch.Tensor
    blocks: tuple[int, ...]
    grid: tuple[int, int]  # patch rows, patch columns
    prefix_tokens: int  # class and register tokens before the patches of each frame

    def patches(self, maps: torch.Tensor) -> torch.Tensor:
        """[..., L] -> [..., rows, cols]: the patch tokens' part of per-token maps, on the patch grid."""
        return maps[..., self.prefix_tokens :].unflatten(-1, self.grid)

    def query_patches(self) -> torch.Tensor:
        """The query's attention on the patches, [B, M, T, rows, cols] (the class tokens' share left out)."""
        return self.patches(self.query)

    def previous_and_next(self, layer: int, frame: int, patch: int) -> tuple[torch.Tensor | None, ...]:
        """Patch ``patch`` of ``frame``: its attention over frame-1's and frame+1's patches, each
        [B, rows, cols] (None where that frame does not exist)."""
        if self.cross_frame is None:
            return None, None
        maps = self.cross_frame[:, layer]  # [B, 2, T-1, P, P]
        num_frames = maps.shape[2] + 1
        previous = maps[:, 0, frame - 1, patch] if frame > 0 else None
        following = maps[:, 1, frame, patch] if frame < num_frames - 1 else None
        return tuple(None if m is None else m.unflatten(-1, self.grid) for m in (previous, following))


def class_token_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A block's q, k [..., L, H, Dh] -> the first token's attention over the L tokens, head-averaged
    [..., L]: softmax(q_0 k^T / sqrt(Dh)), as the block's self-attention computes it."""
    q0 = q[..., 0, :, :].unsqueeze(-2).float() * q.shape[-1] ** -0.5  # [..., H, 1, Dh]
    keys = k.transpose(-3, -2).float()  # [..., H, L, Dh]
    return (q0 @ keys.transpose(-2, -1)).softmax(dim=-1).squeeze(-2).mean(dim=-2)


@torch.no_grad()
def evl_attention(model: EVL, video: torch.Tensor) -> EVLAttention:
    """Videos [B, T, 3, H, W] (normalised, at the model's image size) -> :class:`EVLAttention`.

    One backbone pass keeps the decoder's blocks' outputs and q/k; the decoder then runs in its reference
    formulation (:meth:`~evl.models.evl.EVLDecoder.forward_reference`), recording the query's weights. The
    logits are the model's up to float rounding (tested).
    """
    vision = model.vision_config
    blocks = model.extract_block_features(video)
    features = [frame_features(b, vision.num_patches, with_attention=True, reference=True) for b in blocks]
    t = video.shape[1]
    weights: list[torch.Tensor] = []  # per layer [B, H, T*L]
    logits = model.head(model.decoder.forward_reference(features, attention=weights))
    query_maps = [w.mean(dim=1).unflatten(-1, (t, -1)) for w in weights]  # head-averaged, [B, T, L]

    class_maps = None
    if vision.prefix_tokens > 0:  # the class token comes first where there is one
        class_maps = torch.stack([class_token_attention(f.q, f.k) for f in blocks], dim=1)
    cross = None
    if t > 1:
        cross = torch.stack([f.attn for f in features], dim=1)
    return EVLAttention(
        query=torch.stack(query_maps, dim=1),
        class_token=class_maps,
        cross_frame=cross,
        logits=logits,
        blocks=tuple(model.blocks),
        grid=(vision.grid_size, vision.grid_size),
        prefix_tokens=vision.prefix_tokens,
    )
