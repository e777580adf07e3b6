"""Timelines of long videos: the window plan, the streamed window clips (against ``read_frames`` of the same
frames, and with a bounded number of frames held), the segments (placed on known per-window probabilities),
a real model over every window, the JSON/CSV/PNG/overlay outputs, and a text method with its own classes."""

from __future__ import annotations

import csv
import json

import matplotlib.image
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import evl
from evl.cli import main
from evl.engine.timeline import merge_segments, timeline_from_probabilities, write_timeline_files
from evl.engine.window_pass import plan_video_windows, window_transform
from evl.models.registry import clip_state_dict, create_clip
from evl.synth import DIRECTIONS, class_names, write_action_change_video
from evl.video.decode import iter_frames, probe, read_frames
from evl.video.sampling import SamplingConfig, dense_indices, segment_indices
from evl.video.windows import FrameStore, plan_windows, window_clips
from factories import TINY_BACKBONE
from long_videos import reference_clip, tiny_predictor

FPS = 8.0
CHANGE = 20.0  # seconds of "left", then as many of "up"


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "left_then_up.mp4"
    return write_action_change_video(path, fps=FPS, seconds=(CHANGE, CHANGE))


@pytest.fixture(scope="module")
def predictor():
    return tiny_predictor()


# ------------------------------------------------------------------------------------------- the plan


def test_windows_sample_the_runs_dense_stride_centred_when_it_fits():
    plan = plan_windows(320, FPS, SamplingConfig("dense", num_frames=4, stride=2), length=16, stride=8)
    assert len(plan) == 39 and plan.sampling == "dense"  # starts 0, 8, ... 304: the last ends at 320
    np.testing.assert_array_equal(plan.indices[0], dense_indices(16, 4, 2))
    np.testing.assert_array_equal(plan.indices, plan.indices[0] + 8 * np.arange(39)[:, None])
    np.testing.assert_allclose(plan.start_times[:3], [0.0, 1.0, 2.0])
    np.testing.assert_allclose(plan.end_times[-1], 40.0)
    np.testing.assert_allclose(plan.centres[:2], [1.0, 2.0])


def test_windows_take_segment_centres_when_the_dense_span_does_not_fit():
    plan = plan_windows(320, FPS, SamplingConfig("dense", num_frames=4, stride=8), length=16, stride=8)
    assert plan.sampling == "segment"
    np.testing.assert_array_equal(plan.indices[0], segment_indices(16, 4))  # 2, 6, 10, 14
    segment = plan_windows(320, FPS, SamplingConfig("segment", num_frames=4), length=16, stride=8)
    assert segment.sampling == "segment"


def test_a_video_shorter_than_a_window_is_one_window():
    plan = plan_windows(10, FPS, SamplingConfig("dense", num_frames=4, stride=2), length=16, stride=8)
    assert len(plan) == 1 and plan.length == 10
    assert plan.end_times[0] == pytest.approx(10 / FPS)


def test_windows_in_seconds_or_frames(predictor, video):
    meta = probe(video)
    plan = plan_video_windows(predictor.views, meta, window=2.0)
    assert (plan.length, plan.stride) == (16, 8)  # the stride defaults to half a window
    plan = plan_video_windows(predictor.views, meta, window=2.0, stride=0.5, window_frames=12)
    assert (plan.length, plan.stride) == (12, 4)
    with pytest.raises(ValueError, match="window"):
        plan_video_windows(predictor.views, meta, window=0.0)


# ------------------------------------------------------------------------------- the streamed clips


def test_streamed_window_clips_equal_clips_read_frame_by_frame(predictor, video):
    plan = plan_video_windows(predictor.views, probe(video), window=2.0, stride=1.0)
    batches = list(window_clips(video, plan, window_transform(predictor.views), batch_size=5))
    assert [b.first for b in batches] == list(range(0, 39, 5))
    assert [len(b.clips) for b in batches] == [5] * 7 + [4]
    clips = torch.cat([b.clips for b in batches])
    # One read_frames call for all the windows' frames (window-major), then the transform per window.
    frames = read_frames(video, plan.indices.reshape(-1))
    frames = frames.reshape(*plan.indices.shape, *frames.shape[1:])
    transform = window_transform(predictor.views)
    for k in range(len(plan)):
        torch.testing.assert_close(clips[k], transform(frames[k])[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("window", "stride"), [(2.0, 1.0), (3.0, 0.5), (1.0, 2.0)])
def test_streaming_holds_the_frames_of_one_window_span_not_the_video(predictor, video, window, stride):
    transform = window_transform(predictor.views)
    plan = plan_video_windows(predictor.views, probe(video), window=window, stride=stride)
    needed = np.unique(plan.indices)
    # What the open window's span needs: its own frames, and its successors' frames that fall inside it.
    bound = max(int(((needed >= first) & (needed <= last)).sum()) for first, last in plan.indices[:, [0, -1]])
    store = FrameStore()
    for batch in window_clips(video, plan, transform, batch_size=4, store=store):
        assert len(batch.clips) <= 4
    assert 0 < store.peak <= bound and len(store) == 0
    assert store.peak * 5 < len(needed)  # flat: a small fraction of the frames the pass reads


# ------------------------------------------------------------------------------------------ segments


def test_segments_merge_runs_and_split_halfway_between_window_centres():
    classes = ["a", "b", "c"]
    segments = merge_segments(
        [0, 0, 1, 1, 1, 0], [0.9, 0.7, 0.6, 0.8, 1.0, 0.5], [1, 2, 3, 4, 5, 6], 7.0, classes
    )
    assert [(s.start, s.end, s.name, s.first, s.last) for s in segments] == [
        (0.0, 2.5, "a", 0, 1),
        (2.5, 5.5, "b", 2, 4),
        (5.5, 7.0, "a", 5, 5),  # no smoothing: a lone window is a segment
    ]
    assert [s.score for s in segments] == pytest.approx([0.8, 0.8, 0.5])
    assert merge_segments([], [], [], 3.0, classes) == []


@pytest.mark.parametrize("change", [20.0, 17.3, 8.6, 31.95])
@pytest.mark.parametrize(("window", "stride"), [(2.0, 1.0), (3.0, 0.5), (4.0, 2.0)])
def test_segments_place_a_change_within_one_stride(change, window, stride):
    """Windows voting for what most of their span shows (a window's probabilities: the share of it on each
    side of the change, plus noise): the boundary lands within one stride of the change."""
    plan = plan_windows(320, FPS, SamplingConfig("dense", 4, 2), round(window * FPS), round(stride * FPS))
    after = np.clip((plan.end_times - change) / (plan.end_times - plan.start_times), 0.0, 1.0)
    noise = np.random.default_rng(0).uniform(-0.05, 0.05, size=len(plan))
    up = np.clip(after + noise, 0.0, 1.0)
    probabilities = np.stack([1 - up, np.zeros_like(up), up], axis=1).astype(np.float32)
    timeline = timeline_from_probabilities("v.mp4", ["left", "right", "up"], plan, probabilities, topk=2)
    assert [s.name for s in timeline.segments] == ["left", "up"]
    first, second = timeline.segments
    assert (first.start, second.end) == (0.0, pytest.approx(40.0))
    assert abs(first.end - change) <= stride and second.start == first.end


# --------------------------------------------------------------------------------- a model's timeline


def test_timeline_is_the_model_applied_to_each_window(predictor, video):
    timeline = predictor.timeline(video, window=2.0, stride=1.0, topk=3, batch_size=4)
    plan = timeline.plan
    assert len(timeline.windows) == len(plan) == 39 and timeline.classes == list(class_names("motion"))
    with torch.no_grad():
        for k in range(0, len(plan), 7):
            logits = predictor.model(reference_clip(predictor, video, plan.indices[k])[None])
            expected = logits.softmax(dim=-1)[0].numpy()
            np.testing.assert_allclose(timeline.probabilities[k], expected, rtol=0, atol=1e-5)
            window = timeline.windows[k]
            assert window.labels == np.argsort(-expected, kind="stable")[:3].tolist()
            assert (window.start, window.end) == (pytest.approx(k * 1.0), pytest.approx(k * 1.0 + 2.0))
    top = timeline.probabilities.argmax(axis=1)
    scores = timeline.probabilities.max(axis=1)
    assert timeline.segments == merge_segments(top, scores, plan.centres, 40.0, timeline.classes)


def test_timeline_files_are_written_and_read_back(predictor, video, tmp_path):
    timeline = predictor.timeline(video, window=2.0, stride=1.0, topk=2, batch_size=8)
    written = write_timeline_files(timeline, tmp_path, "left_then_up", overlay_from=video)
    assert sorted(written) == ["json", "overlay", "plot", "segments", "windows"]

    saved = json.loads(written["json"].read_text())
    assert len(saved["windows"]) == 39 and len(saved["windows"][0]["predictions"]) == 2
    assert saved["window"] == {
        "seconds": 2.0,
        "frames": 16,
        "stride_seconds": 1.0,
        "stride_frames": 8,
        "sampling": "dense",
        "frames_per_clip": 4,
    }
    assert [s["class"] for s in saved["segments"]] == [s.name for s in timeline.segments]

    with written["segments"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == [s.name for s in timeline.segments]
    assert float(rows[0]["start"]) == 0.0 and float(rows[-1]["end"]) == pytest.approx(40.0)
    with written["windows"].open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 39 * 2

    image = matplotlib.image.imread(written["plot"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300

    # The overlay: as many frames as the source, the caption drawn in the top-left corner only.
    assert probe(written["overlay"]).num_frames == probe(video).num_frames == 320
    source = read_frames(video, [0, 300]).astype(int)
    drawn = np.stack([image for _, image in iter_frames(written["overlay"], [0, 300])]).astype(int)
    assert sum(1 for _ in iter_frames(written["overlay"])) == 320
    assert np.abs(drawn[:, :8, :8] - source[:, :8, :8]).mean() > 20  # the dark box
    assert np.abs(drawn[:, -16:, -16:] - source[:, -16:, -16:]).mean() < 8  # re-encoding noise only


def test_a_text_method_draws_the_timeline_over_its_own_class_list(video, tmp_path):
    torch.manual_seed(11)
    clip = tmp_path / "clip.safetensors"
    save_file(clip_state_dict(create_clip(TINY_BACKBONE)), str(clip))
    names = ["juggling", "surfing", "knitting"]
    predictor = evl.zeroshot(clip, names, num_frames=4)
    timeline = predictor.timeline(video, window=4.0, stride=2.0, topk=3)
    assert timeline.classes == names and len(timeline.windows) == 19
    np.testing.assert_allclose(timeline.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert {s.name for s in timeline.segments} <= set(names)


# ------------------------------------------------------------------------------------- command line


def test_predict_command_writes_a_timeline(video, tmp_path, capsys):
    torch.manual_seed(11)
    clip = tmp_path / "clip.safetensors"
    save_file(clip_state_dict(create_clip(TINY_BACKBONE)), str(clip))
    classes = tmp_path / "classes.txt"
    classes.write_text("left\nup\n")
    out = tmp_path / "timeline"
    args = ["predict", str(clip), str(video), "--method", "zeroshot", "--classes", str(classes)]
    args += ["--num-frames", "4", "--window", "2", "--stride", "1", "--timeline-out", str(out)]
    assert main([*args, "--overlay", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(summary["windows"]) == 39 and summary["segments"][0]["start"] == 0.0
    stem = "left_then_up"
    for name in ("timeline.json", "segments.csv", "windows.csv", "timeline.png", "overlay.mp4"):
        assert (out / f"{stem}.{name}").is_file(), name


# ----------------------------------------------------------------- the whole path, with a known classifier


class MotionReader(torch.nn.Module):
    """A classifier known to be right on the generated videos, so that a timeline over it tests what
    surrounds the model: it follows the one moving shape through the centroid of what changed between
    consecutive frames (a circular mean per axis: the shape wraps around the frame's edges) and scores each
    class by the mean step along its direction. Videos [B, T, 3, S, S] -> logits [B, K]."""

    def __init__(self, predictor):
        super().__init__()
        self.vision_config = predictor.model.vision_config
        names = class_names("motion")
        self.num_classes = len(names)
        self.register_buffer("directions", torch.tensor([DIRECTIONS[name] for name in names]))  # (x, y)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))  # scoring finds the model's device through it

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        change = (video[:, 1:] - video[:, :-1]).abs().sum(dim=2)  # [B, T-1, S, S]
        change = change * (change > 0.3 * change.amax(dim=(-2, -1), keepdim=True))  # the shape's edges only
        size = video.shape[-1]
        angles = torch.arange(size, dtype=video.dtype) * (2 * torch.pi / size)
        centre = []
        for axis in (-2, -1):  # x: summed over rows; y: summed over columns
            weight = change.sum(dim=axis)  # [B, T-1, S]
            z = torch.complex(weight @ angles.cos(), weight @ angles.sin())
            centre.append(torch.angle(z) * size / (2 * torch.pi))
        centre = torch.stack(centre, dim=-1)  # [B, T-1, (x, y)]
        steps = torch.remainder(centre[:, 1:] - centre[:, :-1] + size / 2, size) - size / 2
        return self.scale * steps.mean(dim=1) @ self.directions.t()


@pytest.mark.parametrize(("window", "stride"), [(2.0, 1.0), (3.0, 0.5)])
def test_a_change_of_action_lands_within_one_stride_of_the_truth(predictor, video, window, stride):
    from evl.engine.predict import Predictor
    from evl.engine.run import LoadedRun

    reader = Predictor(LoadedRun(None, predictor.run.run, MotionReader(predictor), predictor.classes, 0))
    timeline = reader.timeline(video, window=window, stride=stride)
    assert [s.name for s in timeline.segments] == ["left", "up"]
    first, second = timeline.segments
    assert abs(first.end - CHANGE) <= stride and second.start == first.end
    assert (first.start, second.end) == (0.0, pytest.approx(2 * CHANGE, abs=1 / FPS))
