"""FLOP counts against the EVL paper's tables (1 multiply-add = 1 FLOP), counted on meta tensors."""

from __future__ import annotations

import pytest

from evl.config import model_preset
from evl.flops import count_flops


@pytest.mark.parametrize(
    "preset,views,paper_gflops",
    [
        ("evl-b16", 3, 444),  # Table 1: B/16, 8 frames, 4 decoder layers, 1x3 views
        ("evl-l14", 3, 2022),  # Table 1: L/14, 8 frames
        ("evl-b16-ssv2", 3, 512),  # Table 9: SSv2, B/16, 8 frames, 12 decoder layers
    ],
)
def test_flops_match_the_paper_within_5_percent(preset, views, paper_gflops):
    report = count_flops(model_preset(preset, num_frames=8), num_views=views)
    assert abs(report.total_gflops / paper_gflops - 1) < 0.05, report.to_dict()


def test_backbone_is_most_of_the_cost_and_scales_with_frames():
    eight = count_flops(model_preset("evl-b16", num_frames=8))
    sixteen = count_flops(model_preset("evl-b16", num_frames=16))
    # Paper: the decoder adds under 20% to the backbone.
    assert eight.decoder_gflops < 0.2 * eight.backbone_gflops
    assert sixteen.backbone_gflops == pytest.approx(2 * eight.backbone_gflops, rel=1e-6)
    # ViT-B/16 at 224 px is about 17.6 G multiply-adds per frame.
    assert eight.backbone_gflops / 8 == pytest.approx(17.56, rel=0.01)


def test_disabling_decoder_layers_reduces_flops():
    full = count_flops(model_preset("evl-b16", num_layers=4))
    lighter = count_flops(model_preset("evl-b16", num_layers=2))
    assert lighter.decoder_gflops < full.decoder_gflops
    assert lighter.backbone_gflops < full.backbone_gflops + 1e-9


def test_executed_decoder_costs_less_than_the_paper_formulation():
    config = model_preset("evl-b16", num_frames=8)
    paper, executed = count_flops(config), count_flops(config, as_executed=True)
    assert executed.backbone_gflops == pytest.approx(paper.backbone_gflops, rel=1e-9)
    # Folded single-query attention: the key/value projections of every memory token are gone.
    assert executed.decoder_gflops < 0.8 * paper.decoder_gflops


@pytest.mark.parametrize("num_maps,overhead", [(14, 15 / 14), (56, 1.0), (1, 27 / 14)])
def test_grouped_aggregation_costs_little_more_than_the_gathered_table(num_maps, overhead):
    """Multiply-adds of the executed cross-frame aggregation against the paper's gather form (14x14 grid)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from evl.models.ops.relative import aggregate_relative, aggregate_relative_gather, relative_position_index

    def flops(fn, *args):
        with torch.device("meta"), FlopCounterMode(display=False) as counter:
            fn(*args)
        return counter.get_total_flops()

    attn, weight = torch.empty(num_maps, 196, 196, device="meta"), torch.empty(27 * 27, 768, device="meta")
    grouped = flops(aggregate_relative, attn, weight, (14, 14))
    gathered = flops(aggregate_relative_gather, attn, weight, relative_position_index(14, 14).to("meta"))
    assert grouped == pytest.approx(overhead * gathered, rel=1e-9)
