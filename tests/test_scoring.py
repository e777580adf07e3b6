"""The shared scoring loop: its probabilities against a hand computation, and every scorer uses it."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import evl.engine.cached_eval as cached_eval_module
import evl.engine.evaluate as evaluate_module
import evl.engine.predict as predict_module
import evl.engine.train as train_module
from evl.config import DataConfig, DecoderConfig, ModelConfig, RunConfig, VisionConfig
from evl.engine.cached_eval import evaluate_cached
from evl.engine.distributed import DistEnv
from evl.engine.evaluate import evaluate
from evl.engine.extract import extract
from evl.engine.feature_cache import FeatureCache
from evl.engine.predict import Predictor
from evl.engine.scoring import score_batches
from evl.engine.train import evaluate_sharded
from evl.models.evl import EVL
from evl.video.lists import read_list
from factories import tiny_dataset

NUM_FRAMES = 2


class Flat(nn.Module):
    """Clips [N, T, 3, S, S] -> logits [N, K] by one linear map of the flattened clip."""

    def __init__(self, size: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(size, num_classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.linear(clips.flatten(1))


def test_scores_are_the_softmax_mean_over_views():
    t, s, k, v = 2, 3, 5, 3
    model = Flat(t * 3 * s * s, k).eval()
    videos = torch.randn(4, v, t, 3, s, s) * 3
    batches = [
        {"video": videos[:2], "index": [3, 0], "path": ["d.mp4", "a.mp4"], "failed": [(1, "b.mp4", "bad")]},
        {"video": None, "index": [], "path": [], "failed": []},
        {"video": videos[2:3], "index": [2], "path": ["c.mp4"], "failed": []},
    ]
    scored = score_batches(model, batches, 4, k, progress=False)

    with torch.no_grad():
        logits = model(videos.flatten(0, 1)).double().view(4, v, k)
    expected = logits.softmax(-1).mean(1).numpy()  # per video: the views' softmax, averaged
    np.testing.assert_allclose(scored.scores[[3, 0, 2]], expected[:3], rtol=1e-6)
    assert np.isnan(scored.scores[1]).all()
    assert scored.paths == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
    assert scored.failed == [("b.mp4", "bad")]
    assert scored.scored.tolist() == [True, False, True, True]
    assert scored.seen.all()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"), train_per_class=1, frames=6, size=32)


def tiny_model(num_classes: int) -> EVL:
    vision = VisionConfig(width=48, layers=2, heads=3, patch_size=8, image_size=32, output_dim=24)
    decoder = DecoderConfig(num_frames=NUM_FRAMES, num_layers=1, num_classes=num_classes)
    return EVL(ModelConfig(backbone=vision, decoder=decoder, backbone_name="tiny")).eval()


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    """The callers of the shared loop, one name per pass through it."""
    names: list[str] = []

    def counting(module):
        def wrapper(*args, **kwargs):
            names.append(module.__name__)
            return score_batches(*args, **kwargs)

        return wrapper

    for module in (evaluate_module, cached_eval_module, predict_module):
        monkeypatch.setattr(module, "score_batches", counting(module))
    return names


def test_every_scorer_goes_through_the_shared_loop(videos, calls, monkeypatch, tmp_path):
    model = tiny_model(videos.num_classes)
    data = DataConfig(data_root=str(videos.root), num_frames=NUM_FRAMES, frame_stride=2, num_workers=0)
    entries = read_list(videos.val_list, num_classes=videos.num_classes, data_root=data.data_root)

    whole = evaluate(model, entries, data, batch_size=3, progress=False)
    assert calls == ["evl.engine.evaluate"]

    # Two processes, this one rank 0: the other's part is what evaluate gives for its shard.
    other = evaluate(model, entries[1::2], data, batch_size=3, progress=False)
    other_piece = (list(range(1, len(entries), 2)), other.scores, other.paths, other.failed)
    monkeypatch.setattr(train_module, "all_gather_objects", lambda env, piece: [piece, other_piece])
    calls.clear()
    sharded = evaluate_sharded(DistEnv(rank=0, world_size=2), model, entries, data, 3, progress=False)
    assert calls == ["evl.engine.evaluate"]
    np.testing.assert_allclose(sharded.scores, whole.scores, rtol=1e-6)
    assert sharded.paths == whole.paths and sharded.result == whole.result

    loaded = SimpleNamespace(model=model, classes=list(videos.classes), run=RunConfig(data=data))
    calls.clear()
    probs = Predictor(loaded).probabilities(videos.root / entries[0].path)
    assert calls == ["evl.engine.predict"]
    np.testing.assert_allclose(probs.numpy(), whole.scores[0], rtol=1e-6)

    single = dataclasses.replace(data, num_temporal_views=1, num_spatial_views=1)
    extract(model, RunConfig(data=single), entries, list(videos.classes), tmp_path, progress=False)
    calls.clear()
    cached = evaluate_cached(model, FeatureCache.open(tmp_path), batch_size=3, progress=False, num_workers=0)
    assert calls == ["evl.engine.cached_eval"]
    assert cached.decoded.all()
    np.testing.assert_allclose(cached.scores.sum(1), 1.0, atol=1e-6)
