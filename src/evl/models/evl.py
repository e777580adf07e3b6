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
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from evl.config import DecoderConfig, ModelConfig, VisionConfig
from evl.devices import autocast, resolve_formulation, resolve_precision
from evl.models.clip_vit import BlockFeatures
from evl.models.encoders import create_encoder
from evl.models.frame_features import FrameFeatures, frame_features, write_block
from evl.models.layers import LayerNorm, QuickGELU, TrainableStateModule, weights_fingerprint
from evl.models.ops.attention import attend_memory
from evl.models.ops.relative import (
    RelativeAggregation,
    add_cross_frame_terms,
    add_cross_frame_terms_gathered,
    aggregate_relative_gather,
    relative_position_index,
)
from evl.models.ops.temporal import add_temporal_terms

__all__ = [
    "EVL",
    "ClassifierHead",
    "DecoderAttention",
    "DecoderLayer",
    "EVLDecoder",
    "FrameFeatures",
    "Mlp",
    "TemporalConv",
    "TemporalCrossAttention",
    "TemporalPosEmbed",
    "temporal_residual",
]

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


def temporal_residual(
    x: torch.Tensor, conv: TemporalConv | None, pos_embed: TemporalPosEmbed | None, batched: bool = False
) -> torch.Tensor:
    """x + conv(x) + pos_embed() for x [B, T, L, C] (either module may be None), always a new tensor
    (float32: see :mod:`evl.models.ops.precision`). ``batched``: the formulation for GPUs (same numbers)."""
    weight, bias = (None, None) if conv is None else (conv.weight, conv.bias)
    return add_temporal_terms(x, weight, bias, None if pos_embed is None else pos_embed.embed, batched)


class TemporalCrossAttention(nn.Module):
    """Attention maps between adjacent frames from the frozen CLIP q/k, projected to C channels.

    For frame t, A = mean over heads of softmax(q_t k_{t-1}^T / sqrt(Dh)) over the patch tokens (CLS dropped),
    and the output for query patch q is sum_k A[q, k] W_prev[offset(q, k)]; the same with frame t+1 and
    W_next. The ``prefix_tokens`` before the patches (CLS, registers; none for SigLIP) receive nothing.
    Maps [B, 2, T-1, P, P] (see :func:`cross_frame_attention`) -> [B, T, L, C].
    """

    def __init__(self, width: int, grid_h: int, grid_w: int, prefix_tokens: int = 1) -> None:
        super().__init__()
        num_offsets = (2 * grid_h - 1) * (2 * grid_w - 1)
        self.grid = (grid_h, grid_w)
        self.prefix_tokens = prefix_tokens
        self.w_prev = nn.Parameter(torch.zeros(num_offsets, width))
        self.w_next = nn.Parameter(torch.zeros(num_offsets, width))
        self.register_buffer("index", relative_position_index(grid_h, grid_w), persistent=False)
        self.materialize = False  # True: add_to takes the paper's formulation too (used for FLOP counting)

    def forward(self, attn: torch.Tensor | None, num_frames: int) -> torch.Tensor:
        """attn [B, 2, T-1, P, P] or None (one frame) -> [B, T, L, C] (zero at the prefix tokens).

        The paper's formulation: each direction's [P, P, C] table gathered from the offset weights, one
        product per direction, in plain ops with nothing written in place. The kernels of :meth:`add_to`
        are tested against it, and a traced graph holds it."""
        self._check_grid(attn)
        if attn is None:
            tokens = self.prefix_tokens + self.grid[0] * self.grid[1]
            return self.w_prev.new_zeros(1, num_frames, tokens, self.w_prev.shape[1])
        attn = attn.to(self.w_prev.dtype)
        from_previous = aggregate_relative_gather(attn[:, 0], self.w_prev, self.index)  # frames 1..T-1
        from_next = aggregate_relative_gather(attn[:, 1], self.w_next, self.index)  # frames 0..T-2
        # Zero rows where nothing is received (the prefix tokens, the first frame from a previous one, the
        # last from a next one). NOTE(ref): frame t gets (0 + previous-frame term) + next-frame term; adding
        # zeros changes no bit, so the order is kept.
        n = self.prefix_tokens
        return F.pad(from_previous, (0, 0, n, 0, 1, 0)) + F.pad(from_next, (0, 0, n, 0, 0, 1))

    def add_to(self, y: torch.Tensor, attn: torch.Tensor | None, batched: bool = False) -> torch.Tensor:
        """y [B, T, L, C] + :meth:`forward`, computed in place in y (which is returned); y must be a tensor
        of the caller's own, not one that autograd or the caller still needs unchanged.

        ``batched`` (GPUs): the paper's gathered [P, P, C] table, one batched matmul per direction over every
        clip and frame pair; otherwise (CPUs) :class:`RelativeAggregation`, group by group of queries."""
        self._check_grid(attn)
        if attn is None:
            return y
        if self.materialize:
            return y + self(attn, y.shape[1])
        attn = attn.to(self.w_prev.dtype)
        if batched:
            return add_cross_frame_terms_gathered(y, attn, self.w_prev, self.w_next, self.index)
        aggregation = RelativeAggregation.for_maps(*self.grid, attn[:, 0, :, 0, 0].numel())
        return add_cross_frame_terms(y, attn, self.w_prev, self.w_next, aggregation)

    def _check_grid(self, attn: torch.Tensor | None) -> None:
        num_patches = self.grid[0] * self.grid[1]
        if attn is not None and attn.shape[-1] != num_patches:
            raise ValueError(
                f"temporal cross-attention was built for a {self.grid[0]}x{self.grid[1]} patch grid "
                f"({num_patches} patches per frame) but got {attn.shape[-1]} patches per frame; "
                "feed frames at the backbone's image size"
            )


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

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        folded: bool | None = None,
        memory_norm: nn.LayerNorm | None = None,
    ) -> torch.Tensor:
        """x [B, Lq, C] attends to memory_norm(memory) (memory [B, Lm, C]; no norm: the memory) -> [B, Lq, C].

        ``folded`` (default: whenever it is cheaper, i.e. Lq * heads < C) takes :meth:`forward_folded`;
        otherwise the memory is projected to keys and values and attended with fused SDPA.
        """
        b, lq, c = x.shape
        folded = self.folded if folded is None else folded
        if folded is None:
            folded = lq * self.heads < c
        if folded:
            return self.forward_folded(x, memory, memory_norm)
        if memory_norm is not None:
            memory = memory_norm(memory)
        lm = memory.shape[1]
        d = c // self.heads
        q = self.q_proj(x).view(b, lq, self.heads, d).transpose(1, 2)
        k = self.k_proj(memory).view(b, lm, self.heads, d).transpose(1, 2)
        v = self.v_proj(memory).view(b, lm, self.heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, Lq, d]
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, c))

    def attention_weights(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The weights :meth:`forward` attends with: x [B, Lq, C] over memory [B, Lm, C] (already
        normalised) -> softmax(q k^T / sqrt(Dh)) [B, H, Lq, Lm], each row summing to one. For looking at,
        not for computing the output: the forwards never materialise them."""
        b, lq, c = x.shape
        d = c // self.heads
        q = self.q_proj(x).view(b, lq, self.heads, d).transpose(1, 2)
        k = self.k_proj(memory).view(b, memory.shape[1], self.heads, d).transpose(1, 2)
        return (q @ k.transpose(-2, -1) * d**-0.5).softmax(dim=-1)

    def forward_folded(
        self, x: torch.Tensor, memory: torch.Tensor, memory_norm: nn.LayerNorm | None = None
    ) -> torch.Tensor:
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
        # q . b_k is the same for every key and cancels in the softmax; kept so that b_k stays in the graph
        # (zero gradient, as in the unfolded form, and weight decay treats it alike).
        key_bias = torch.einsum("bqhd,hd->bhq", q, self.k_proj.bias.view(h, d)).reshape(b, h * lq, 1)
        keys = keys_in_input_space.flatten(1, 2)
        context = attend_memory(keys, key_bias, memory, memory_norm)  # [B, H*Lq, C]
        context = context.view(b, h, lq, c)  # attention-weighted memory per head
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

    def attend(
        self, query: torch.Tensor, memory: torch.Tensor, lean: bool = False, folded: bool | None = None
    ) -> torch.Tensor:
        """``lean``: normalise the memory inside the attention, which then keeps only the memory for
        backward, not its normalised copy too (less memory, slightly more time; same numbers). ``folded``:
        as :meth:`DecoderAttention.forward`."""
        if lean:
            return query + self.attn(self.norm1(query), memory, folded=folded, memory_norm=self.norm3)
        return query + self.attn(self.norm1(query), self.norm3(memory), folded=folded)

    def feed_forward(self, query: torch.Tensor) -> torch.Tensor:
        return query + self.mlp(self.norm2(query))

    def forward(self, query: torch.Tensor, memory: torch.Tensor, folded: bool | None = None) -> torch.Tensor:
        return self.feed_forward(self.attend(query, memory, folded=folded))


class EVLDecoder(nn.Module):
    """One learnable query gathering multi-layer frame features through M decoder layers.

    ``forward(features)`` takes one :class:`FrameFeatures` per decoder layer (block output [B, T, L, C] and
    cross-frame attention maps) and returns the final query [B, C].
    """

    def __init__(
        self, config: DecoderConfig, width: int, heads: int, grid: tuple[int, int], prefix_tokens: int = 1
    ) -> None:
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
            nn.ModuleList(TemporalCrossAttention(width, *grid, prefix_tokens) for _ in range(m))
            if config.temporal_cross_attention
            else None
        )
        self.layers = nn.ModuleList(
            DecoderLayer(width, config.num_heads or heads, config.mlp_ratio, config.mlp_dropout)
            for _ in range(m)
        )
        # Execution choices, not part of the model (results are the same):
        # - checkpoint_memory: recompute each layer's memory in backward instead of storing it (and, in the
        #   CPU formulation, normalise it inside the attention, piece by piece). Worth it where memory is
        #   short; None: on for CPUs (host memory, training from videos), off on GPUs.
        # - formulation: "cpu" (loops sized to CPU caches), "batched" (an op count that does not grow with
        #   the batch, for GPUs), "reference" (plain ops: forward_reference, what export traces) or "auto"
        #   (by the features' device, and "reference" while traced; see evl.devices.resolve_formulation).
        self.checkpoint_memory: bool | None = None
        self.formulation = "auto"

    def memory(self, i: int, features: FrameFeatures, batched: bool = False) -> torch.Tensor:
        """The memory of decoder layer i: block output plus the temporal terms, [B, T, L, C], float32.

        Equal to :meth:`memory_reference`, computed with fewer passes over the [B, T, L, C] tensors.
        """
        x = features.out
        conv = None if self.temporal_conv is None else self.temporal_conv[i]
        pos_embed = None if self.temporal_pos_embed is None else self.temporal_pos_embed[i]
        # A new tensor: x may be the backbone's or the cache's.
        y = temporal_residual(x, conv, pos_embed, batched=batched)
        if self.cross_attention is not None:
            y = self.cross_attention[i].add_to(y, features.attn, batched=batched)
        return y

    def memory_reference(self, i: int, features: FrameFeatures) -> torch.Tensor:
        """:meth:`memory` as the plain sum of the temporal modules' own forwards."""
        x = features.out
        y = x
        if self.temporal_conv is not None:
            y = y + self.temporal_conv[i](x)
        if self.temporal_pos_embed is not None:
            y = y + self.temporal_pos_embed[i]()
        if self.cross_attention is not None:
            y = y + self.cross_attention[i](features.attn, x.shape[1])
        return y

    def attend(
        self, i: int, query: torch.Tensor, features: FrameFeatures, batched: bool = False, lean: bool = False
    ) -> torch.Tensor:
        """``lean``: normalise the memory inside the attention piece by piece (CPU formulation only)."""
        memory = self.memory(i, features, batched).flatten(1, 2)  # [B, T*L, C], frame-major
        return self.layers[i].attend(query, memory, lean=lean and not batched)

    def execution(self, device: torch.device) -> tuple[bool, bool]:
        """(batched formulation, memory recomputed in backward) for features on ``device``, where the
        formulation is not "reference"."""
        batched = resolve_formulation(self.formulation, device) == "batched"
        recompute = self.checkpoint_memory
        if recompute is None:
            recompute = device.type == "cpu"
        return batched, recompute

    def forward(self, features: list[FrameFeatures]) -> torch.Tensor:
        if len(features) != len(self.layers):
            raise ValueError(f"decoder has {len(self.layers)} layers but got {len(features)} feature maps")
        device = features[0].out.device
        if resolve_formulation(self.formulation, device) == "reference":
            return self.forward_reference(features)
        b = features[0].out.shape[0]
        batched, recompute = self.execution(device)
        query = self.query.expand(b, 1, -1)
        for i, layer in enumerate(self.layers):
            if recompute and torch.is_grad_enabled():
                # The memory ([B, T*L, C] per layer, and what building it saves for backward) is most of
                # the decoder's activation memory, and cheap to rebuild from the features in backward.
                query = checkpoint(self.attend, i, query, features[i], batched, True, use_reentrant=False)
            else:
                query = self.attend(i, query, features[i], batched)
            query = layer.feed_forward(query)
        return query[:, 0]

    def forward_reference(
        self, features: list[FrameFeatures], attention: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """:meth:`forward` in the straightforward formulation: each memory the plain sum of the temporal
        modules' own forwards (:meth:`memory_reference`), attended with keys and values projected from every
        memory token (the unfolded attention). Plain ops only: no custom autograd Function, nothing written
        in place, no loop over the batch, so a traced graph holds it for any batch size.

        ``attention``, when given, receives each layer's attention weights of the query over its memory,
        [B, H, T*L] (:meth:`DecoderAttention.attention_weights`), for looking at."""
        query = self.query.expand(features[0].out.shape[0], 1, -1)
        for i, layer in enumerate(self.layers):
            memory = self.memory_reference(i, features[i]).flatten(1, 2)  # [B, T*L, C], frame-major
            if attention is not None:
                weights = layer.attn.attention_weights(layer.norm1(query), layer.norm3(memory))
                attention.append(weights[:, :, 0])
            query = layer(query, memory, folded=False)
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


class EVL(TrainableStateModule):
    """Video classifier: videos [B, T, 3, H, W] (normalised) -> logits [B, num_classes]."""

    def __init__(self, config: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        if backbone is not None and backbone.config != config.backbone:
            raise ValueError("the backbone module's config differs from config.backbone")
        self.config = config
        vision = config.backbone
        self.blocks = config.decoder.feeding_blocks(vision.layers)
        self.backbone = backbone if backbone is not None else create_encoder(vision)
        grid = (vision.grid_size,) * 2
        self.decoder = EVLDecoder(config.decoder, vision.width, vision.heads, grid, vision.prefix_tokens)
        self.head = ClassifierHead(vision.width, config.decoder.num_classes, config.decoder.head_dropout)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        # Clips per backbone pass without autograd; None: one on CPU, the whole batch on GPU.
        self.backbone_chunk: int | None = None
        self._fingerprint: str | None = None

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

    def backbone_fingerprint(self) -> str:
        """sha256 of the frozen backbone's weights as loaded (see :func:`weights_fingerprint`), kept from
        before any cast to a GPU's compute dtype; a fine-tuned backbone's of its current weights."""
        if not self.frozen:
            return weights_fingerprint(self.backbone)
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.backbone)
        return self._fingerprint

    def train(self, mode: bool = True) -> EVL:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen backbone never leaves eval mode
        return self

    def to(self, *args, **kwargs) -> EVL:
        """``nn.Module.to``; a frozen backbone is then stored in its compute dtype on the new device
        (bfloat16 or float16 on GPUs: half the memory, and no cast of every weight at every forward). Its
        weights are never trained nor saved, so only a move back from a GPU sees the rounding."""
        super().to(*args, **kwargs)
        if self.frozen:
            weight = next(self.backbone.parameters())  # all of them share device and dtype
            device = weight.device
            dtype = resolve_precision(self.config.backbone_dtype, device, "backbone.dtype")
            if device.type == "cuda" and dtype != weight.dtype:
                self.backbone_fingerprint()  # of the weights as loaded, before the rounding
                self.backbone.to(dtype)
            elif device.type == "cpu" and weight.dtype != torch.float32:
                self.backbone.float()  # moved back from a GPU: CPUs compute in float32 (autocast below)
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
        return autocast(resolve_precision(self.config.backbone_dtype, device, "backbone.dtype"), device)

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
        the per-block q and k stay those of one chunk, whatever the batch size; each block's output and maps
        go straight into batch-sized tensors allocated up front, so nothing long-lived is allocated among
        the backbone's transients (which would leave the heap fragmented for the next step). In the
        decoder's "reference" formulation (and so while traced): :meth:`extract_features_reference`.
        """
        if with_attention is None:
            with_attention = self.decoder.cross_attention is not None
        self.check_input(video)
        blocks = self.blocks if blocks is None else tuple(blocks)
        if resolve_formulation(self.decoder.formulation, video.device) == "reference":
            return self.extract_features_reference(video, blocks, with_attention)
        if self._backbone_grad_enabled():
            return self._frame_features(video, blocks, with_attention)
        chunk = self.backbone_chunk
        if chunk is None:
            chunk = video.shape[0] if video.is_cuda else 1  # GPUs want big batches; CPUs small footprints
        features = self._empty_features(video, blocks, with_attention)
        with torch.no_grad():
            for start in range(0, video.shape[0], chunk):
                self._write_frame_features(video[start : start + chunk], blocks, features, start)
        return features

    def extract_features_reference(
        self, video: torch.Tensor, blocks: Sequence[int] | None = None, with_attention: bool | None = None
    ) -> list[FrameFeatures]:
        """:meth:`extract_features` in the straightforward formulation (the decoder's "reference"): one
        backbone pass over the whole batch keeping the requested blocks' q and k, then the maps of all frame
        pairs at once. No loop over the batch and nothing written in place, so a traced graph holds it for
        any batch size (the backbone blocks take their plain ops while traced); it holds every requested
        block's q and k and all pairs' scores at once, which :meth:`extract_features` avoids."""
        if with_attention is None:
            with_attention = self.decoder.cross_attention is not None
        patches = self.config.backbone.num_patches
        blocks_features = self.extract_block_features(video, blocks)
        return [frame_features(f, patches, with_attention, reference=True) for f in blocks_features]

    def _empty_features(
        self, video: torch.Tensor, blocks: Sequence[int], with_attention: bool
    ) -> list[FrameFeatures]:
        """Uninitialised float32 features of ``video``: out [B, T, L, C], attn [B, 2, T-1, P, P]."""
        b, t, _, height, width = video.shape
        vision = self.config.backbone
        p = (height // vision.patch_size) * (width // vision.patch_size)

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=torch.float32, device=video.device)

        with_attention = with_attention and t > 1
        return [
            FrameFeatures(
                empty(b, t, vision.prefix_tokens + p, vision.width),
                empty(b, 2, t - 1, p, p) if with_attention else None,
            )
            for _ in blocks
        ]

    def _write_frame_features(
        self, video: torch.Tensor, blocks: Sequence[int], into: list[FrameFeatures], start: int
    ) -> None:
        """One backbone pass without autograd over clips start.. of ``into``; each block's q and k become
        attention maps (and are dropped) as soon as the block has run."""
        b, t = video.shape[:2]
        rows = slice(start, start + b)
        for index, block in self._backbone_steps(video.flatten(0, 1), blocks):
            for target in (f for f, wanted in zip(into, blocks, strict=True) if wanted == index):
                write_block(block, target, rows, t)
            del block

    def _frame_features(
        self, video: torch.Tensor, blocks: Sequence[int], with_attention: bool
    ) -> list[FrameFeatures]:
        """One backbone pass with autograd (an open backbone): q and k of a block become attention maps as
        soon as the block has run."""
        b, t = video.shape[:2]
        found: dict[int, FrameFeatures] = {}
        with self._backbone_grad():
            for index, block in self._backbone_steps(video.flatten(0, 1), blocks):
                unflattened = BlockFeatures(*(x.float().unflatten(0, (b, t)) for x in block))
                del block
                found[index] = frame_features(unflattened, self.config.backbone.num_patches, with_attention)
                del unflattened
        return [found[i] for i in blocks]

    def _backbone_steps(
        self, frames: torch.Tensor, blocks: Sequence[int]
    ) -> Iterator[tuple[int, BlockFeatures]]:
        """The backbone's ``iter_intermediates`` (:class:`~evl.models.protocol.VisionEncoder`), each step
        run in the backbone's dtype context (and what the caller does between steps, such as the float32
        attention maps, outside it)."""
        steps = self.backbone.iter_intermediates(frames, blocks)
        while True:
            with self._backbone_context(frames.device):
                item = next(steps, None)
            if item is None:
                return
            yield item
            del item

    def _backbone_grad_enabled(self) -> bool:
        return not self.frozen and torch.is_grad_enabled()

    def _backbone_grad(self) -> contextlib.AbstractContextManager:
        return torch.enable_grad() if self._backbone_grad_enabled() else torch.no_grad()

    def forward_head(self, features: list[FrameFeatures]) -> torch.Tensor:
        """Decoder inputs (from :meth:`extract_features` or a feature cache) -> logits [B, num_classes]."""
        return self.head(self.decoder(features))

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """Videos [B, T, 3, H, W] -> the decoder's final query [B, C], what the classifier head reads
        (``forward(video)`` is ``head(embed(video))``): the video's embedding, of the encoder's width."""
        return self.decoder(self.extract_features(video))

    def forward(self, x: torch.Tensor | list[FrameFeatures]) -> torch.Tensor:
        """Videos [B, T, 3, H, W], or decoder inputs from a feature cache -> logits [B, num_classes]."""
        if isinstance(x, list):
            return self.forward_head(x)
        return self.forward_head(self.extract_features(x))

    # ----------------------------------------------------------------------------------------------- state
    def _checkpoint_keys(self) -> Callable[[str], bool]:
        """Decoder and head (and the backbone only when it is fine-tuned): what a checkpoint stores."""
        frozen = self.frozen
        return lambda key: not (frozen and key.startswith("backbone."))

    def _mismatch_notes(self) -> tuple[str, str]:
        return "", " (different width, frame count or number of classes?)"
