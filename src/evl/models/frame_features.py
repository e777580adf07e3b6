"""What EVL's decoder reads from the frozen backbone: block outputs and the cross-frame attention maps made
from the blocks' q and k (a feature cache stores exactly these)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from evl.models.clip_vit import BlockFeatures


class FrameFeatures(NamedTuple):
    """What the decoder reads from one backbone block, once the frozen part is computed.

    ``out``: block output [B, T, L, C]. ``attn``: head-averaged cross-frame attention maps between adjacent
    frames over the patch tokens, [B, 2, T-1, P, P] (index 0: frame t+1 attending to frame t, i.e. each
    frame to its previous one; index 1: frame t attending to frame t+1), or None when T = 1. These maps depend
    only on the frozen backbone, so a feature cache stores them instead of the much larger q and k.
    """

    out: torch.Tensor
    attn: torch.Tensor | None


def cross_frame_attention(
    q: torch.Tensor, k: torch.Tensor, num_patches: int, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Frozen q, k [B, T, L, H, Dh] (the ``num_patches`` = P patch tokens last, after any class or register
    tokens) -> head-averaged maps [B, 2, T-1, P, P] (None when T = 1), written into ``out`` when given.

    A = mean over heads of softmax(q_t k_s^T / sqrt(Dh)) over the patch tokens, for s = t-1 and s = t+1.
    One frame pair at a time: the [B, H, P, P] scores of a pair are a few MiB, of all pairs tens.
    """
    b, t = q.shape[:2]
    if t < 2:
        return None
    if out is None:
        out = q.new_empty(b, 2, t - 1, num_patches, num_patches, dtype=torch.float32)
    for pair in range(t - 1):
        out[:, 0, pair] = _head_averaged_attention(q[:, pair + 1], k[:, pair], num_patches)
        out[:, 1, pair] = _head_averaged_attention(q[:, pair], k[:, pair + 1], num_patches)
    return out


def cross_frame_attention_reference(
    q: torch.Tensor, k: torch.Tensor, num_patches: int
) -> torch.Tensor | None:
    """:func:`cross_frame_attention` with every frame pair at once, in plain ops: [B, T-1, H, P, P] scores
    per direction at a time instead of one pair's, and nothing written in place (what a traced graph
    holds)."""
    if q.shape[1] < 2:
        return None
    to_previous = _head_averaged_attention(q[:, 1:], k[:, :-1], num_patches)
    to_next = _head_averaged_attention(q[:, :-1], k[:, 1:], num_patches)
    return torch.stack([to_previous, to_next], dim=1)


def _head_averaged_attention(q: torch.Tensor, k: torch.Tensor, num_patches: int) -> torch.Tensor:
    """q, k [..., L, H, Dh] of two frames (or of frame pairs) -> [..., P, P]: softmax(q k^T / sqrt(Dh))
    over the patches, averaged over the heads."""
    q = q[..., -num_patches:, :, :].transpose(-3, -2).float() * q.shape[-1] ** -0.5  # [..., H, P, Dh]
    k = k[..., -num_patches:, :, :].transpose(-3, -2).float()
    return (q @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=-3)


def frame_features(
    block: BlockFeatures, num_patches: int, with_attention: bool = True, reference: bool = False
) -> FrameFeatures:
    """Backbone block features (out [B, T, L, C], q/k [B, T, L, H, Dh]) -> :class:`FrameFeatures`;
    ``reference``: the maps by :func:`cross_frame_attention_reference`."""
    if not with_attention:
        return FrameFeatures(block.out, None)
    maps = cross_frame_attention_reference if reference else cross_frame_attention
    return FrameFeatures(block.out, maps(block.q, block.k, num_patches))


def write_block(block: BlockFeatures, target: FrameFeatures, rows: slice, num_frames: int) -> None:
    """Backbone features of clips ``rows`` (out [N, L, C], q/k [N, L, H, Dh], N = clips x frames) into
    ``target``'s out and attention maps (whose last axis is the patch count)."""
    target.out[rows] = block.out.unflatten(0, (-1, num_frames))
    if target.attn is not None:
        q, k = (x.unflatten(0, (-1, num_frames)) for x in (block.q, block.k))
        cross_frame_attention(q, k, target.attn.shape[-1], out=target.attn[rows])
