"""EVL: a frozen CLIP ViT, a light transformer decoder with temporal modules, and a linear head.

Lin et al., "Frozen CLIP Models are Efficient Video Learners" (ECCV 2022). Decoder layer i reads backbone
block ``blocks[i]`` (by default the last M blocks, shallow to deep):

    Y_i = X + TemporalConv(X) + TemporalPosEmbed + TemporalCrossAttention(q, k)
    query = query + Attn(norm1(query), norm3(Y_i)); query = query + MLP(norm2(query))
    logits = Linear(Dropout(LayerNorm(query)))

Only the decoder and the head train; the backbone runs without autograd and is never in the trainable state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from evl.config import DecoderConfig, ModelConfig, VisionConfig
from evl.models.clip_vit import BlockFeatures, CLIPVisionTransformer
from evl.models.layers import LayerNorm, QuickGELU, load_exact_subset

# ----------------------------------------------------------------------------------------- temporal modules


class TemporalConv(nn.Module):
    """Depthwise 1-D convolution over time (kernel 3, one filter per channel, with bias).

    [B, T, L, C] -> [B, T, L, C], run independently for every token position (CLS included).
    """

    def __init__(self, width: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(width))
        # NOTE(ref): the official code keeps nn.Conv1d's default initialisation (not zero); so do we.
        reference = nn.Conv1d(width, width, kernel_size, groups=width)
        with torch.no_grad():
            self.weight.copy_(reference.weight)
            self.bias.copy_(reference.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, length, c = x.shape
        y = x.permute(0, 2, 3, 1).reshape(b * length, c, t)  # time last, one sequence per token
        y = F.conv1d(y, self.weight, self.bias, padding=self.weight.shape[-1] // 2, groups=c)
        return y.view(b, length, c, t).permute(0, 3, 1, 2)


class TemporalPosEmbed(nn.Module):
    """A learned [T, C] table added to every token of frame t (zero-initialised as the official code)."""

    def __init__(self, num_frames: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(num_frames, width))

    def forward(self) -> torch.Tensor:
        """-> [1, T, 1, C], ready to broadcast onto frame features [B, T, L, C]."""
        return self.embed[None, :, None, :]


def relative_position_index(grid_h: int, grid_w: int) -> torch.Tensor:
    """[h*w, h*w] long: row of the (2h-1)(2w-1) offset table for query patch q and key patch k.

    idx(q, k) = (qr - kr + h - 1) * (2w - 1) + (qc - kc + w - 1): query-minus-key offsets, row-major.
    """
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + grid_h - 1
    d_col = cols[:, None] - cols[None, :] + grid_w - 1
    return d_row * (2 * grid_w - 1) + d_col


def aggregate_relative(attn: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[n, q, c] = sum_k attn[n, q, k] * weight[index[q, k], c], without building weight[index].

    attn [N, Lq, Lk], weight [R, C], index [Lq, Lk] -> [N, Lq, C]. Within one query row every key has a
    distinct offset, so scattering the attention row into its offset bins loses nothing; one matmul with the
    table then does the rest. The straightforward form materialises an [Lq, Lk, C] tensor per call (113 MiB
    for ViT-B/16) and is kept as :func:`aggregate_relative_gather` for testing and FLOP counting.
    """
    n, lq, lk = attn.shape
    bins = attn.new_zeros(n, lq, weight.shape[0]).scatter_(2, index.expand(n, lq, lk), attn)
    return bins @ weight


def aggregate_relative_gather(attn: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The straightforward form of :func:`aggregate_relative` (the paper's formulation)."""
    return torch.einsum("nqk,qkc->nqc", attn, weight[index])


class FrameFeatures(NamedTuple):
    """What the decoder reads from one backbone block, once the frozen part is computed.

    ``out``: block output [B, T, L, C]. ``attn``: head-averaged cross-frame attention maps between adjacent
    frames over the patch tokens, [B, 2, T-1, P, P] (index 0: frame t+1 attending to frame t, i.e. each
    frame to its previous one; index 1: frame t attending to frame t+1), or None when T = 1. These maps depend
    only on the frozen backbone, so a feature cache stores them instead of the much larger q and k.
    """

    out: torch.Tensor
    attn: torch.Tensor | None


def cross_frame_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """Frozen q, k [B, T, L, H, Dh] (CLS first) -> head-averaged maps [B, 2, T-1, P, P] (None when T = 1).

    A = mean over heads of softmax(q_t k_s^T / sqrt(Dh)) over the patch tokens, for s = t-1 and s = t+1.
    """
    _, t, _, _, d = q.shape
    if t < 2:
        return None
    q = q[:, :, 1:].transpose(2, 3).float() * d**-0.5  # [B, T, H, P, Dh], CLS dropped
    k = k[:, :, 1:].transpose(2, 3).float()
    to_prev = (q[:, 1:] @ k[:, :-1].transpose(-2, -1)).softmax(dim=-1).mean(dim=2)  # [B, T-1, P, P]
    to_next = (q[:, :-1] @ k[:, 1:].transpose(-2, -1)).softmax(dim=-1).mean(dim=2)
    return torch.stack([to_prev, to_next], dim=1)


def frame_features(block: BlockFeatures, with_attention: bool = True) -> FrameFeatures:
    """Backbone block features (out [B, T, L, C], q/k [B, T, L, H, Dh]) -> :class:`FrameFeatures`."""
    return FrameFeatures(block.out, cross_frame_attention(block.q, block.k) if with_attention else None)


class TemporalCrossAttention(nn.Module):
    """Attention maps between adjacent frames from the frozen CLIP q/k, projected to C channels.

    For frame t, A = mean over heads of softmax(q_t k_{t-1}^T / sqrt(Dh)) over the patch tokens (CLS dropped),
    and the output for query patch q is sum_k A[q, k] W_prev[offset(q, k)]; the same with frame t+1 and
    W_next. The CLS row receives nothing. Maps [B, 2, T-1, P, P] (see :func:`cross_frame_attention`)
    -> [B, T, L, C].
    """

    def __init__(self, width: int, grid_h: int, grid_w: int) -> None:
        super().__init__()
        num_offsets = (2 * grid_h - 1) * (2 * grid_w - 1)
        self.grid = (grid_h, grid_w)
        self.w_prev = nn.Parameter(torch.zeros(num_offsets, width))
        self.w_next = nn.Parameter(torch.zeros(num_offsets, width))
        self.register_buffer("index", relative_position_index(grid_h, grid_w), persistent=False)
        self.materialize = False  # True: the paper's gather formulation (used for FLOP counting)

    def _aggregate(self, attn: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """attn [B, T', P, P] -> [B, T', P, C]."""
        b, t, p, _ = attn.shape
        aggregate = aggregate_relative_gather if self.materialize else aggregate_relative
        return aggregate(attn.flatten(0, 1).to(weight.dtype), weight, self.index).view(b, t, p, -1)

    def forward(self, attn: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        """attn [B, 2, T-1, P, P] or None (one frame) -> [B, T, L, C] (zero at CLS)."""
        num_patches = self.grid[0] * self.grid[1]
        if attn is not None and attn.shape[-1] != num_patches:
            raise ValueError(
                f"temporal cross-attention was built for a {self.grid[0]}x{self.grid[1]} patch grid "
                f"({num_patches + 1} tokens per frame) but got {attn.shape[-1] + 1} tokens per frame; "
                "feed frames at the backbone's image size"
            )
        b = 1 if attn is None else attn.shape[0]
        out = self.w_prev.new_zeros(b, num_frames, num_patches + 1, self.w_prev.shape[1])
        if attn is not None:
            patches = out[:, :, 1:]
            # NOTE(ref): frame t gets (0 + previous-frame term) + next-frame term, in that order.
            patches[:, 1:] += self._aggregate(attn[:, 0], self.w_prev)
            patches[:, :-1] += self._aggregate(attn[:, 1], self.w_next)
        return out


# --------------------------------------------------------------------------------------------- decoder


class DecoderAttention(nn.Module):
    """Multi-head cross-attention with separate q/k/v/out projections (the official decoder's layout)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.folded: bool | None = None  # None: fold whenever cheaper; False: always project (FLOP counting)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, folded: bool | None = None) -> torch.Tensor:
        """x [B, Lq, C] attends to memory [B, Lm, C] -> [B, Lq, C].

        ``folded`` (default: whenever it is cheaper, i.e. Lq * heads < C) takes :meth:`forward_folded`;
        otherwise the memory is projected to keys and values and attended with fused SDPA.
        """
        b, lq, c = x.shape
        folded = self.folded if folded is None else folded
        if folded is None:
            folded = lq * self.heads < c
        if folded:
            return self.forward_folded(x, memory)
        lm = memory.shape[1]
        d = c // self.heads
        q = self.q_proj(x).view(b, lq, self.heads, d).transpose(1, 2)
        k = self.k_proj(memory).view(b, lm, self.heads, d).transpose(1, 2)
        v = self.v_proj(memory).view(b, lm, self.heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, Lq, d]
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, c))

    def forward_folded(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The same attention with the key and value projections folded into the few queries.

        EVL's decoder has one query and a memory of T*L tokens, so projecting every memory token to keys
        and values (2 * T*L*C^2 multiply-adds, ~1.9 G per layer for B/16 8f) is most of its cost. Because
        q . (W_k m + b_k) = (W_k^T q) . m + const, and the constant cancels in the softmax, the scores need
        only W_k^T q per head; and since the attention weights sum to one, sum_j a_j (W_v m_j + b_v) =
        W_v (sum_j a_j m_j) + b_v. That is 2 * H*Lq*T*L*C multiply-adds: 64x fewer for B/16. Equal to the
        unfolded form within float rounding, gradients included (tested).
        """
        b, lq, c = x.shape
        h, d = self.heads, c // self.heads
        q = self.q_proj(x).view(b, lq, h, d) * d**-0.5
        w_k = self.k_proj.weight.view(h, d, c)
        w_v = self.v_proj.weight.view(h, d, c)
        keys_in_input_space = torch.einsum("bqhd,hdc->bhqc", q, w_k)  # [B, H, Lq, C]
        scores = keys_in_input_space.flatten(1, 2) @ memory.transpose(1, 2)  # [B, H*Lq, Lm]
        # q . b_k is the same for every key and cancels in the softmax; kept so that b_k stays in the graph
        # (zero gradient, as in the unfolded form, and weight decay treats it alike).
        scores = scores + torch.einsum("bqhd,hd->bhq", q, self.k_proj.bias.view(h, d)).reshape(b, h * lq, 1)
        attn = scores.softmax(dim=-1)
        context = (attn @ memory).view(b, h, lq, c)  # [B, H, Lq, C]: attention-weighted memory per head
        out = torch.einsum("bhqc,hdc->bqhd", context, w_v).reshape(b, lq, c) + self.v_proj.bias
        return self.out_proj(out)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = QuickGELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)
        for linear in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: query += Attn(norm1(query), norm3(memory)); query += MLP(norm2(query))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(width)
        self.norm2 = LayerNorm(width)
        self.norm3 = LayerNorm(width)
        self.attn = DecoderAttention(width, heads)
        self.mlp = Mlp(width, round(width * mlp_ratio), dropout)

    def attend(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return query + self.attn(self.norm1(query), self.norm3(memory))

    def feed_forward(self, query: torch.Tensor) -> torch.Tensor:
        return query + self.mlp(self.norm2(query))

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.attend(query, memory))


class EVLDecoder(nn.Module):
    """One learnable query gathering multi-layer frame features through M decoder layers.

    ``forward(features)`` takes one :class:`FrameFeatures` per decoder layer (block output [B, T, L, C] and
    cross-frame attention maps) and returns the final query [B, C].
    """

    def __init__(self, config: DecoderConfig, width: int, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.config = config
        m = config.num_layers
        # NOTE(ref): the official initialiser of the query is never called, so it starts at zero.
        self.query = nn.Parameter(torch.zeros(width))
        self.temporal_conv = (
            nn.ModuleList(TemporalConv(width) for _ in range(m)) if config.temporal_conv else None
        )
        self.temporal_pos_embed = (
            nn.ModuleList(TemporalPosEmbed(config.num_frames, width) for _ in range(m))
            if config.temporal_pos_embed
            else None
        )
        self.cross_attention = (
            nn.ModuleList(TemporalCrossAttention(width, *grid) for _ in range(m))
            if config.temporal_cross_attention
            else None
        )
        self.layers = nn.ModuleList(
            DecoderLayer(width, config.num_heads or heads, config.mlp_ratio, config.mlp_dropout)
            for _ in range(m)
        )
        # Recompute each layer's memory in backward instead of storing it (an execution choice, not part
        # of the model: results are identical).
        self.checkpoint_memory = True

    def memory(self, i: int, features: FrameFeatures) -> torch.Tensor:
        """The memory of decoder layer i: block output plus the temporal terms, [B, T, L, C]."""
        x = features.out
        # Never in place: x may be the backbone's (or the feature cache's) own tensor.
        y = x
        if self.temporal_conv is not None:
            y = y + self.temporal_conv[i](x)
        if self.temporal_pos_embed is not None:
            y = y + self.temporal_pos_embed[i]()
        if self.cross_attention is not None:
            y = y + self.cross_attention[i](features.attn, x.shape[1])
        return y

    def attend(self, i: int, query: torch.Tensor, features: FrameFeatures) -> torch.Tensor:
        memory = self.memory(i, features).flatten(1, 2)  # [B, T*L, C], frame-major
        return self.layers[i].attend(query, memory)

    def forward(self, features: list[FrameFeatures]) -> torch.Tensor:
        if len(features) != len(self.layers):
            raise ValueError(f"decoder has {len(self.layers)} layers but got {len(features)} feature maps")
        b = features[0].out.shape[0]
        query = self.query.expand(b, 1, -1)
        for i, layer in enumerate(self.layers):
            if self.checkpoint_memory and torch.is_grad_enabled():
                # The memory ([B, T*L, C] per layer, and what building it saves for backward) is most of
                # the decoder's activation memory, and cheap to rebuild from the features in backward.
                query = checkpoint(self.attend, i, query, features[i], use_reentrant=False)
            else:
                query = self.attend(i, query, features[i])
            query = layer.feed_forward(query)
        return query[:, 0]


class ClassifierHead(nn.Module):
    """LayerNorm -> Dropout -> Linear, applied to the decoder query."""

    def __init__(self, width: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.norm = LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))


# ----------------------------------------------------------------------------------------------- model

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_backbone_dtype(name: str, device: torch.device) -> torch.dtype:
    """The backbone's compute dtype; "auto" is float32 on CPUs (where half precision is emulated, many
    times slower) and bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown backbone dtype {name!r}; expected auto, {', '.join(_DTYPES)}") from None


class EVL(nn.Module):
    """Video classifier: videos [B, T, 3, H, W] (normalised) -> logits [B, num_classes]."""

    def __init__(self, config: ModelConfig, backbone: CLIPVisionTransformer | None = None) -> None:
        super().__init__()
        if backbone is not None and backbone.config != config.backbone:
            raise ValueError("the backbone module's config differs from config.backbone")
        self.config = config
        vision = config.backbone
        self.blocks = config.decoder.feeding_blocks(vision.layers)
        self.backbone = backbone if backbone is not None else CLIPVisionTransformer(vision)
        self.decoder = EVLDecoder(config.decoder, vision.width, vision.heads, (vision.grid_size,) * 2)
        self.head = ClassifierHead(vision.width, config.decoder.num_classes, config.decoder.head_dropout)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        # Clips per backbone pass without autograd; None: one on CPU, the whole batch on GPU.
        self.backbone_chunk: int | None = None

    @property
    def frozen(self) -> bool:
        return self.config.freeze_backbone

    @property
    def vision_config(self) -> VisionConfig:
        """The image encoder's config: input size and normalisation for the data pipeline."""
        return self.config.backbone

    @property
    def num_classes(self) -> int:
        return self.config.decoder.num_classes

    def train(self, mode: bool = True) -> EVL:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen backbone never leaves eval mode
        return self

    # ----------------------------------------------------------------------------------------------- input
    def check_input(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"EVL expects videos [B, T, 3, H, W], got shape {tuple(video.shape)}")
        t = video.shape[1]
        if self.decoder.temporal_pos_embed is not None and t != self.config.decoder.num_frames:
            raise ValueError(
                f"this model was built for {self.config.decoder.num_frames} frames per clip, got {t} "
                "(the temporal position embedding has one row per frame)"
            )
        size = self.config.backbone.image_size
        if self.decoder.cross_attention is not None and tuple(video.shape[-2:]) != (size, size):
            raise ValueError(
                f"this model takes {size}x{size} frames, got {video.shape[-2]}x{video.shape[-1]}"
            )

    # -------------------------------------------------------------------------------------------- forwards
    def _backbone_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = resolve_backbone_dtype(self.config.backbone_dtype, device)
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def extract_block_features(
        self, video: torch.Tensor, blocks: Sequence[int] | None = None
    ) -> list[BlockFeatures]:
        """Videos [B, T, 3, H, W] -> per block (default: the decoder's): out [B, T, L, C], q/k
        [B, T, L, H, Dh], in float32."""
        self.check_input(video)
        b, t = video.shape[:2]
        blocks = self.blocks if blocks is None else blocks
        with self._backbone_grad(), self._backbone_context(video.device):
            feats = self.backbone.forward_intermediates(video.flatten(0, 1), blocks)
        return [BlockFeatures(*(x.float().unflatten(0, (b, t)) for x in f)) for f in feats]

    def extract_features(
        self, video: torch.Tensor, blocks: Sequence[int] | None = None, with_attention: bool | None = None
    ) -> list[FrameFeatures]:
        """Videos [B, T, 3, H, W] -> what the decoder reads, one :class:`FrameFeatures` per block.

        With a frozen backbone this is a constant of the video: a feature cache stores exactly this (for
        any ``blocks``, with the attention maps even if this decoder has no cross-attention). Without
        autograd, the backbone runs ``backbone_chunk`` clips at a time, so its transient activations and
        the per-block q and k stay those of one chunk, whatever the batch size.
        """
        if with_attention is None:
            with_attention = self.decoder.cross_attention is not None
        chunk = self.backbone_chunk
        if chunk is None:
            chunk = video.shape[0] if video.is_cuda else 1  # GPUs want big batches; CPUs small footprints
        if self._backbone_grad_enabled() or chunk >= video.shape[0]:
            return self._frame_features(video, blocks, with_attention)
        pieces = [self._frame_features(part, blocks, with_attention) for part in video.split(chunk)]
        return [
            FrameFeatures(
                torch.cat([p[i].out for p in pieces]),
                None if pieces[0][i].attn is None else torch.cat([p[i].attn for p in pieces]),
            )
            for i in range(len(pieces[0]))
        ]

    def _frame_features(
        self, video: torch.Tensor, blocks: Sequence[int] | None, with_attention: bool
    ) -> list[FrameFeatures]:
        block_features = self.extract_block_features(video, blocks)
        with self._backbone_grad():
            return [frame_features(f, with_attention) for f in block_features]

    def _backbone_grad_enabled(self) -> bool:
        return not self.frozen and torch.is_grad_enabled()

    def _backbone_grad(self) -> contextlib.AbstractContextManager:
        return torch.enable_grad() if self._backbone_grad_enabled() else torch.no_grad()

    def forward_head(self, features: list[FrameFeatures]) -> torch.Tensor:
        """Decoder inputs (from :meth:`extract_features` or a feature cache) -> logits [B, num_classes]."""
        return self.head(self.decoder(features))

    def forward(self, x: torch.Tensor | list[FrameFeatures]) -> torch.Tensor:
        """Videos [B, T, 3, H, W], or decoder inputs from a feature cache -> logits [B, num_classes]."""
        if isinstance(x, list):
            return self.forward_head(x)
        return self.forward_head(self.extract_features(x))

    # ----------------------------------------------------------------------------------------------- state
    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Decoder and head (and the backbone only when it is fine-tuned): what a checkpoint stores."""
        state = self.state_dict()
        if self.frozen:
            state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return state

    def load_trainable_state_dict(
        self, state: Mapping[str, torch.Tensor], source: str = "checkpoint"
    ) -> None:
        """Strict load of :meth:`trainable_state_dict`, with one-line errors for mismatched keys or shapes."""
        load_exact_subset(
            self,
            self.trainable_state_dict(),
            state,
            source,
            shape_hint=" (different width, frame count or number of classes?)",
        )
