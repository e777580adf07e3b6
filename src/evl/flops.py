"""FLOP counting for a model configuration, on meta tensors (no weights, no memory, no time).

Counts come from PyTorch's flop counter (matrix products, convolutions and attention), which reports two
FLOPs per multiply-add; the video-recognition papers (EVL, X-CLIP, ViFi-CLIP) count one multiply-add as
one FLOP, so :class:`FlopReport` gives both conventions. The temporal cross-attention is counted in the
paper's formulation (an einsum with the gathered relative-position table): the model itself computes the
same result group by group of queries (:class:`evl.models.ops.relative.RelativeAggregation`), without the
[P, P, C] table and with a few percent more multiply-adds (7% for ViT-B/16 at batch 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from evl.config import ModelConfig
from evl.models.evl import EVL, DecoderAttention, TemporalCrossAttention
from evl.models.frame_features import frame_features


@dataclass(frozen=True)
class FlopReport:
    """Per-view GFLOPs in the papers' convention (1 multiply-add = 1 FLOP)."""

    backbone_gflops: float
    decoder_gflops: float
    num_views: int = 1

    @property
    def per_view_gflops(self) -> float:
        return self.backbone_gflops + self.decoder_gflops

    @property
    def total_gflops(self) -> float:
        """All views together, as the papers' tables report (e.g. "444 GFLOPs, 3 views")."""
        return self.per_view_gflops * self.num_views

    @property
    def per_view_flops_2x(self) -> float:
        """Per view, two FLOPs per multiply-add (hardware convention, for achieved-FLOP/s figures)."""
        return 2e9 * self.per_view_gflops

    def to_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "per_view_gflops": self.per_view_gflops,
            "total_gflops": self.total_gflops,
        }


def count_flops(config: ModelConfig, num_views: int = 1, as_executed: bool = False) -> FlopReport:
    """FLOPs of one forward pass over one clip [T, 3, S, S] of ``config`` (S = backbone image size).

    By default the decoder is counted in the paper's formulation (relative-position weights gathered per
    query/key pair, keys and values projected for every memory token), which is what published tables
    count; ``as_executed`` counts what this implementation actually runs (binned cross-attention, folded
    single-query attention).
    """
    with torch.device("meta"):
        model = EVL(config).eval().requires_grad_(False)
        for module in model.modules():
            if isinstance(module, TemporalCrossAttention):
                module.materialize = not as_executed
            if isinstance(module, DecoderAttention):
                module.folded = None if as_executed else False
        size = config.backbone.image_size
        video = torch.empty(1, config.decoder.num_frames, 3, size, size)
        backbone_counter, decoder_counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
        with backbone_counter:
            blocks = model.extract_block_features(video)
        # The cross-frame attention maps belong to the decoder's temporal module, as in the paper.
        with decoder_counter:
            with_attention = config.decoder.temporal_cross_attention
            patches = config.backbone.num_patches
            model.forward_head([frame_features(f, patches, with_attention) for f in blocks])
    giga_macs = 0.5e-9  # counter FLOPs (2 per multiply-add) -> G multiply-adds
    return FlopReport(
        backbone_gflops=backbone_counter.get_total_flops() * giga_macs,
        decoder_gflops=decoder_counter.get_total_flops() * giga_macs,
        num_views=num_views,
    )
