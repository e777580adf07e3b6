"""Frame sampling: exact expected indices for dense and TSN sampling, train and test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evl.video.sampling import (
    SamplingConfig,
    clip_indices,
    dense_indices,
    segment_indices,
    temporal_views,
)

# ----------------------------------------------------------------------------------------------------- dense


def test_dense_one_test_view_is_centred():
    # span = 7 * 16 + 1 = 113, slide = 187, start = 187 // 2 = 93
    expected = np.arange(93, 206, 16)
    np.testing.assert_array_equal(dense_indices(300, 8, 16), expected)


def test_dense_three_test_views_span_start_to_end():
    views = [dense_indices(300, 8, 16, view=i, num_views=3) for i in range(3)]
    # starts round(187 / 2 * i) = 0, 94 (93.5 rounds half to even), 187: the last view ends on the last frame
    for view, start in zip(views, (0, 94, 187), strict=True):
        np.testing.assert_array_equal(view, start + 16 * np.arange(8))
    assert views[-1][-1] == 299


def test_dense_four_views_rounding():
    starts = [dense_indices(100, 4, 5, view=i, num_views=4)[0] for i in range(4)]
    assert starts == [0, 28, 56, 84]  # slide = 100 - 16 = 84


def test_dense_short_video_pads_with_last_frame():
    expected = [0, 16, 32, 48, 49, 49, 49, 49]
    np.testing.assert_array_equal(dense_indices(50, 8, 16), expected)
    for view in range(3):
        np.testing.assert_array_equal(dense_indices(50, 8, 16, view=view, num_views=3), expected)
    np.testing.assert_array_equal(dense_indices(50, 8, 16, rng=np.random.default_rng(1)), expected)


def test_dense_video_exactly_one_span():
    np.testing.assert_array_equal(dense_indices(113, 8, 16), 16 * np.arange(8))
    np.testing.assert_array_equal(dense_indices(113, 8, 16, rng=np.random.default_rng(0)), 16 * np.arange(8))


def test_dense_train_start_is_uniform_over_every_valid_start():
    # span 113, n = 120: starts 0..7 inclusive, all reachable
    rng = np.random.default_rng(0)
    starts = {int(dense_indices(120, 8, 16, rng=rng)[0]) for _ in range(400)}
    assert starts == set(range(8))


def test_dense_train_reproducible_with_seed():
    a = [dense_indices(1000, 8, 16, rng=np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    rng = np.random.default_rng(7)
    draws = [tuple(dense_indices(1000, 8, 16, rng=rng)) for _ in range(5)]
    assert len(set(draws)) > 1


def test_dense_output_dtype_and_stride():
    idx = dense_indices(1000, 16, 4, rng=np.random.default_rng(3))
    assert idx.dtype == np.int64 and idx.shape == (16,)
    np.testing.assert_array_equal(np.diff(idx), 4)


# ----------------------------------------------------------------------------------------------- segment


def test_segment_test_centres_exact():
    np.testing.assert_array_equal(segment_indices(80, 8), np.arange(5, 80, 10))
    # segments of 3.75 frames; centres 1.875, 5.625, ... floored
    np.testing.assert_array_equal(segment_indices(30, 8), [1, 5, 9, 13, 16, 20, 24, 28])


def test_segment_test_views_offset_inside_segments():
    np.testing.assert_array_equal(segment_indices(80, 8, view=0, num_views=2), np.arange(2, 80, 10))
    np.testing.assert_array_equal(segment_indices(80, 8, view=1, num_views=2), np.arange(7, 80, 10))


@pytest.mark.parametrize("n", [8, 30, 81, 1000])
def test_segment_train_stays_inside_each_segment(n):
    rng = np.random.default_rng(0)
    t = 8
    lo = np.array([math.floor(i * n / t) for i in range(t)])
    hi = np.array([math.ceil((i + 1) * n / t) - 1 for i in range(t)])
    seen = set()
    for _ in range(200):
        idx = segment_indices(n, t, rng=rng)
        assert idx.dtype == np.int64
        assert np.all(idx >= lo) and np.all(idx <= hi)
        seen.add(tuple(idx))
    assert len(seen) > 1 or n == t


def test_segment_train_reaches_both_ends_of_a_segment():
    rng = np.random.default_rng(0)
    firsts = {int(segment_indices(80, 8, rng=rng)[0]) for _ in range(500)}
    assert firsts == set(range(10))


@pytest.mark.parametrize("rng", [None, np.random.default_rng(0)])
def test_segment_shorter_video_than_clip(rng):
    idx = segment_indices(5, 8, rng=rng)
    assert idx.shape == (8,)
    assert np.all(np.diff(idx) >= 0) and idx.min() >= 0 and idx.max() <= 4
    if rng is None:
        np.testing.assert_array_equal(idx, [0, 0, 1, 2, 2, 3, 4, 4])


def test_segment_train_reproducible_with_seed():
    a = segment_indices(300, 8, rng=np.random.default_rng(11))
    b = segment_indices(300, 8, rng=np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("kind", ["dense", "segment"])
def test_single_frame_video(kind):
    for rng in (None, np.random.default_rng(0)):
        np.testing.assert_array_equal(clip_indices(kind, 1, 4, 3, rng=rng), [0, 0, 0, 0])


@pytest.mark.parametrize("kind", ["dense", "segment"])
def test_empty_video_raises(kind):
    with pytest.raises(ValueError, match="0 frames"):
        clip_indices(kind, 0, 8, 16)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="num_frames"):
        dense_indices(100, 0, 16)
    with pytest.raises(ValueError, match="stride"):
        dense_indices(100, 8, 0)
    with pytest.raises(ValueError, match="view 3"):
        dense_indices(100, 8, 2, view=3, num_views=3)
    with pytest.raises(ValueError, match="unknown sampling kind"):
        clip_indices("uniform", 100, 8)  # type: ignore[arg-type]


def test_clip_indices_dispatch():
    np.testing.assert_array_equal(clip_indices("dense", 300, 8, 16), dense_indices(300, 8, 16))
    np.testing.assert_array_equal(clip_indices("segment", 300, 8, 16), segment_indices(300, 8))


# --------------------------------------------------------------------------------------------- config


def test_sampling_config_validation_and_span():
    assert SamplingConfig().span == 113
    with pytest.raises(ValueError, match="kind"):
        SamplingConfig(kind="tsn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_temporal_views"):
        SamplingConfig(num_temporal_views=0)


def test_temporal_views_test_and_train():
    cfg = SamplingConfig(num_frames=8, stride=16, num_temporal_views=3)
    views = temporal_views(cfg, 300)
    assert views.shape == (3, 8) and views.dtype == np.int64
    np.testing.assert_array_equal(views[:, 0], [0, 94, 187])
    train = temporal_views(cfg, 300, rng=np.random.default_rng(0))
    assert train.shape == (1, 8)
    tsn = temporal_views(SamplingConfig(kind="segment", num_frames=8), 80)
    np.testing.assert_array_equal(tsn, [np.arange(5, 80, 10)])
