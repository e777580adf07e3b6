"""Synthetic action videos: classes, rendering, the motion task's frame statistics, datasets on disk."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from evl.synth import (
    ClipSpec,
    SynthDataset,
    class_names,
    clip_rng,
    flip_label_map,
    make_dataset,
    render_clip,
    sample_spec,
)

FRAMES, SIZE = 8, 48
LEFT, RIGHT, UP, DOWN = range(4)  # labels of the motion task


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _spec(task: str, label: int, seed: int, num_frames: int = FRAMES) -> ClipSpec:
    return sample_spec(task, label, num_frames, np.random.default_rng(seed))


def _measured_positions(frames: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """(x, y) in [0, 1) of the shape per frame: circular mean of its colour's pixels (the frame wraps)."""
    mask = np.abs(frames.astype(np.int64) - np.asarray(color)).max(axis=-1) <= 12  # [T, H, W]
    size = frames.shape[1]
    angles = 2 * np.pi * (np.arange(size) + 0.5) / size
    xs = (mask * np.exp(1j * angles)[None, None, :]).sum(axis=(1, 2))
    ys = (mask * np.exp(1j * angles)[None, :, None]).sum(axis=(1, 2))
    return np.mod(np.angle(np.stack([xs, ys], axis=-1)) / (2 * np.pi), 1.0)


def _net_displacement(positions: np.ndarray) -> np.ndarray:
    """Sum of frame-to-frame steps, each the shortest way round the torus: (dx, dy)."""
    steps = np.diff(positions, axis=0)
    return (np.mod(steps + 0.5, 1.0) - 0.5).sum(axis=0)


# ----------------------------------------------------------------------------------------------- classes


def test_class_names_per_task():
    assert class_names("motion") == ("left", "right", "up", "down")
    assert class_names("shapes") == ("circle", "square", "triangle")
    mixed = class_names("mixed")
    assert len(mixed) == 12 and mixed[:4] == ("circle_left", "circle_right", "circle_up", "circle_down")


def test_unknown_task_and_label_raise():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        class_names("colours")
    with pytest.raises(ValueError, match="label 4"):
        _spec("motion", 4, seed=0)


def test_flip_label_map_swaps_left_and_right_only():
    assert flip_label_map("motion") == {LEFT: RIGHT, RIGHT: LEFT, UP: UP, DOWN: DOWN}
    assert flip_label_map("shapes") == {0: 0, 1: 1, 2: 2}
    names = class_names("mixed")
    flipped = {names[a]: names[b] for a, b in flip_label_map("mixed").items()}
    assert flipped["square_left"] == "square_right" and flipped["triangle_right"] == "triangle_left"
    assert flipped["circle_up"] == "circle_up" and flipped["triangle_down"] == "triangle_down"


def test_class_fixes_its_factors():
    for seed in range(20):
        assert _spec("shapes", 2, seed).shape == "triangle"
        assert _spec("mixed", class_names("mixed").index("square_up"), seed).shape == "square"
        assert _spec("mixed", class_names("mixed").index("square_up"), seed).velocity[1] < 0


# ----------------------------------------------------------------------------------------------- rendering


def test_render_clip_is_deterministic_and_noisy():
    spec = _spec("motion", LEFT, seed=3)
    first = render_clip(spec, FRAMES, SIZE, np.random.default_rng(1))
    assert first.shape == (FRAMES, SIZE, SIZE, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, render_clip(spec, FRAMES, SIZE, np.random.default_rng(1)))
    assert not np.array_equal(first, render_clip(spec, FRAMES, SIZE, np.random.default_rng(2)))


def test_shape_is_drawn_at_its_positions():
    for label in range(12):
        spec = dataclasses.replace(_spec("mixed", label, seed=label), noise_std=0.0)
        frames = render_clip(spec, FRAMES, SIZE, np.random.default_rng(0))
        centres = np.floor(spec.positions(FRAMES) * SIZE).astype(int)
        assert all((frame[y, x] == spec.color).all() for frame, (x, y) in zip(frames, centres, strict=True))
        measured = _measured_positions(frames, spec.color)
        offset = np.mod(measured - spec.positions(FRAMES) + 0.5, 1.0) - 0.5
        assert np.abs(offset).max() * SIZE < 2.0  # pixels; a triangle's centroid is not its circumcentre


@pytest.mark.parametrize(("label", "axis", "sign"), [(LEFT, 0, -1), (RIGHT, 0, 1), (UP, 1, -1), (DOWN, 1, 1)])
def test_rendered_motion_follows_the_class(label, axis, sign):
    for seed in range(5):
        spec = _spec("motion", label, seed)
        frames = render_clip(spec, FRAMES, SIZE, np.random.default_rng(seed))
        displacement = _net_displacement(_measured_positions(frames, spec.color))
        assert np.sign(displacement[axis]) == sign and abs(displacement[axis]) > 0.15
        assert abs(displacement[1 - axis]) < 0.02


def test_horizontal_flip_matches_flip_label_map():
    spec = _spec("motion", LEFT, seed=7)
    flipped = render_clip(spec, FRAMES, SIZE, np.random.default_rng(0))[:, :, ::-1]
    displacement = _net_displacement(_measured_positions(flipped, spec.color))
    assert displacement[0] > 0 and flip_label_map("motion")[LEFT] == RIGHT


# ----------------------------------------------------------------------------------------------- motion task


def test_opposite_directions_differ_only_in_order():
    left, right = _spec("motion", LEFT, seed=11), _spec("motion", RIGHT, seed=11)
    assert dataclasses.replace(left, velocity=right.velocity) == right
    assert right.velocity[0] == -left.velocity[0] > 0
    left, right = (dataclasses.replace(spec, noise_std=0.0) for spec in (left, right))
    frames = [render_clip(spec, FRAMES, SIZE, np.random.default_rng(0)) for spec in (left, right)]
    np.testing.assert_array_equal(frames[0], frames[1][::-1])


def test_single_frames_carry_no_direction():
    """At every frame index the shape's position has the same (uniform) distribution for each direction."""
    num_clips = 400
    positions = {
        label: np.stack([_spec("motion", label, seed).positions(FRAMES) for seed in range(num_clips)])
        for label in range(4)
    }  # label -> [clips, T, 2]
    for label, pos in positions.items():
        np.testing.assert_allclose(pos.mean(axis=0), 0.5, atol=0.05)  # per frame index and axis
        np.testing.assert_allclose(pos.std(axis=0), np.sqrt(1 / 12), atol=0.03)  # uniform on [0, 1)
        gap = np.abs(pos.mean(axis=0) - positions[RIGHT].mean(axis=0)).max()
        assert gap < 0.06, f"class {label}: mean position differs from 'right' by {gap:.3f}"
    # ... while first-to-last displacement has opposite signs for left and right.
    travel = {label: pos[:, -1, 0] - pos[:, 0, 0] for label, pos in positions.items()}
    travel = {label: np.mod(t + 0.5, 1.0) - 0.5 for label, t in travel.items()}
    assert (travel[RIGHT] > 0).all() and (travel[LEFT] < 0).all()


# ----------------------------------------------------------------------------------------------- datasets

TINY = dict(num_train_per_class=2, num_val_per_class=1, num_frames=FRAMES, size=SIZE, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SynthDataset:
    return make_dataset(tmp_path_factory.mktemp("synth"), seed=0, **TINY)


def _read_list(path: Path) -> list[tuple[str, int]]:
    rows = [line.split(" ") for line in path.read_text(encoding="utf-8").splitlines()]
    return [(relpath, int(label)) for relpath, label in rows]


def test_dataset_files_and_lists(dataset: SynthDataset):
    assert dataset.num_classes == 4 and dataset.classes == class_names("motion")
    assert dataset.classes_file.read_text(encoding="utf-8").splitlines() == list(dataset.classes)
    for list_file, per_class in ((dataset.train_list, 2), (dataset.val_list, 1)):
        entries = _read_list(list_file)
        assert Counter(label for _, label in entries) == dict.fromkeys(range(4), per_class)
        for relpath, label in entries:
            assert (dataset.root / relpath).is_file()
            assert Path(relpath).parts[:3] == ("videos", list_file.stem, dataset.classes[label])
    assert not list(dataset.root.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_dataset_videos_decode(dataset: SynthDataset):
    relpath, _ = _read_list(dataset.val_list)[0]
    frames = _decode(dataset.root / relpath)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3) and frames.dtype == np.uint8


def test_dataset_is_deterministic_across_workers(dataset: SynthDataset, tmp_path: Path):
    again = make_dataset(tmp_path / "again", seed=0, workers=2, **TINY)
    other = make_dataset(tmp_path / "other", seed=1, **TINY)
    assert again.train_list.read_text() == dataset.train_list.read_text()
    relpath, _ = _read_list(dataset.train_list)[-1]
    frames = _decode(dataset.root / relpath)
    np.testing.assert_array_equal(frames, _decode(again.root / relpath))
    assert not np.array_equal(frames, _decode(other.root / relpath))


def test_lossless_dataset_holds_the_rendered_clips(tmp_path: Path):
    data = make_dataset(tmp_path, task="mixed", seed=5, lossless=True, **{**TINY, "num_train_per_class": 1})
    relpath, label = _read_list(data.val_list)[7]
    rng = clip_rng(5, "val", label, 0)
    expected = render_clip(sample_spec("mixed", label, FRAMES, rng), FRAMES, SIZE, rng)
    np.testing.assert_array_equal(_decode(data.root / relpath), expected)


def test_make_dataset_rejects_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="num_frames"):
        make_dataset(tmp_path, num_frames=1, progress=False)
    with pytest.raises(ValueError, match="seed"):
        make_dataset(tmp_path, seed=-1, progress=False)
    assert not list(tmp_path.iterdir())
