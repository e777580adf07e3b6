"""FLOP counting for a model configuration, on meta tensors (no weights, no memory, no time).

Counts come from PyTorch's flop counter (matrix products, convolutions and attention), which reports two
FLOPs per multiply-add; the video-recognition papers (EVL, X-CLIP, ViFi-CLIP) count one multiply-add as
one FLOP, so :class:`FlopReport` gives both conventions. The temporal cross-attention is counted in the
paper's formulation (an einsum with the gathered relative-position table): the model itself computes the
same result with a scatter and a matmul that needs less memory but more multiply-adds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from evl.config import ModelConfig
from evl.models.evl import EVL, TemporalCrossAttention


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


def count_flops(config: ModelConfig, num_views: int = 1) -> FlopReport:
    """FLOPs of one forward pass over one clip [T, 3, S, S] of ``config`` (S = backbone image size)."""
    with torch.device("meta"):
        model = EVL(config).eval().requires_grad_(False)
        for module in model.modules():
            if isinstance(module, TemporalCrossAttention):
                module.materialize = True
        size = config.backbone.image_size
        video = torch.empty(1, config.decoder.num_frames, 3, size, size)
        counter = FlopCounterMode(display=False)
        with counter:
            model(video)
    by_module = counter.get_flop_counts()
    total = counter.get_total_flops()
    # The backbone runs through a method, not __call__, so it is what remains besides decoder and head.
    head = sum(sum(by_module.get(f"EVL.{name}", {}).values()) for name in ("decoder", "head"))
    giga_macs = 0.5e-9  # counter FLOPs (2 per multiply-add) -> G multiply-adds
    return FlopReport(
        backbone_gflops=(total - head) * giga_macs,
        decoder_gflops=head * giga_macs,
        num_views=num_views,
    )
