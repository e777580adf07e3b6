"""Synthetic action videos: a shape moving over a textured background, for the tests and the offline demo.

Three tasks, each a set of classes built from two factors, the shape and the direction of motion:

* ``"motion"`` (default): the class is the direction (left, right, up, down); the shape is random.
* ``"shapes"``: the class is the shape (circle, square, triangle); the direction is random.
* ``"mixed"``: the class is the pair (shape, direction).

The motion task is built so that only the frames' order tells left from right (and up from down):

* the shape moves on a torus (it wraps at the frame's edges) from a uniformly drawn position, so each frame's
  shape position is uniform over the frame whatever the class: a single frame says nothing about the class;
* the trajectory is centred on its midpoint, so a clip moving left is exactly a clip moving right played
  backwards: the unordered set of frames is equally likely under both. Pooling frames without temporal
  modelling can at best recover the axis of motion, never its sense.

Randomness only comes from ``np.random.Generator``s; each dataset video is keyed by (seed, split, label,
index), so its pixels do not depend on the number of worker processes.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from evl.io import atomic_write_text
from evl.video.encode import write_video

Task = Literal["motion", "shapes", "mixed"]
Shape = Literal["circle", "square", "triangle"]

TASKS: tuple[Task, ...] = ("motion", "shapes", "mixed")
SHAPES: tuple[Shape, ...] = ("circle", "square", "triangle")
# Unit direction vectors (dx, dy) in image coordinates, where y grows downward.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
SPLITS: tuple[str, ...] = ("train", "val")

# Lengths are fractions of the frame side. A travel below half the side keeps the shortest wrapped path
# between the first and the last frame pointing the way the shape moves.
TRAVEL_RANGE = (0.2, 0.45)  # distance covered over the whole clip
RADIUS_RANGE = (0.12, 0.2)  # circumradius
MIN_CONTRAST = 150.0  # Euclidean RGB distance between the shape's and the background's base colours
NUM_WAVES = 3  # sinusoids summed into the background texture
WAVE_AMPLITUDE = 15.0  # per wave and channel, in uint8 levels
GRAIN_STD = 6.0  # static fine-grained background noise, in uint8 levels
_SIDES: dict[str, int] = {"square": 4, "triangle": 3}


# ----------------------------------------------------------------------------------------------- classes


def _class_factors(task: str) -> list[tuple[Shape | None, str | None]]:
    """Per class, the (shape, direction) it fixes; ``None`` leaves that factor random."""
    if task == "motion":
        return [(None, direction) for direction in DIRECTIONS]
    if task == "shapes":
        return [(shape, None) for shape in SHAPES]
    if task == "mixed":
        return [(shape, direction) for shape in SHAPES for direction in DIRECTIONS]
    raise ValueError(f"unknown synthetic task {task!r}; expected one of {TASKS}")


def class_names(task: Task) -> tuple[str, ...]:
    """Class names of ``task`` in label order, e.g. ``("left", "right", "up", "down")``."""
    return tuple("_".join(f for f in factors if f is not None) for factors in _class_factors(task))


def flip_label_map(task: Task) -> dict[int, int]:
    """Label of each class's horizontal mirror image: left and right swap, every other factor is unchanged."""
    mirror = {"left": "right", "right": "left"}
    factors = _class_factors(task)
    flipped = [(shape, mirror.get(direction, direction)) for shape, direction in factors]
    return {label: factors.index(target) for label, target in enumerate(flipped)}


# ----------------------------------------------------------------------------------------------- one clip


@dataclass(frozen=True)
class ClipSpec:
    """Everything random about one clip except its per-frame pixel noise. Lengths are fractions of the side.

    The shape's centre at frame ``t`` of ``T`` is ``center + (t - (T - 1) / 2) * velocity``, wrapped into
    [0, 1). Centring the trajectory on its midpoint makes negating ``velocity`` play the clip backwards.
    """

    shape: Shape
    color: tuple[int, int, int]  # RGB of the shape
    center: tuple[float, float]  # (x, y) of the shape at the clip's midpoint
    velocity: tuple[float, float]  # (dx, dy) per frame
    radius: float  # circumradius
    angle: float  # rotation of squares and triangles, radians
    background_color: tuple[int, int, int]  # RGB the background texture varies around
    background_seed: int  # seeds the (static) background texture
    noise_std: float = 3.0  # per-frame Gaussian pixel noise, uint8 levels

    def positions(self, num_frames: int) -> np.ndarray:
        """Shape centres per frame: float64 [T, 2] as (x, y) in [0, 1)."""
        offsets = np.arange(num_frames) - (num_frames - 1) / 2  # [T], symmetric about 0
        return np.mod(np.asarray(self.center) + offsets[:, None] * np.asarray(self.velocity), 1.0)


def sample_spec(task: Task, label: int, num_frames: int, rng: np.random.Generator) -> ClipSpec:
    """Draw a random clip of class ``label`` of ``task`` lasting ``num_frames`` frames.

    Every attribute, the class's factors included, is drawn in the same order whatever the class, which then
    overrides its factors: generators in equal states give clips that differ only in the class's factors.
    """
    factors = _class_factors(task)
    if not 0 <= label < len(factors):
        raise ValueError(f"label {label} is outside [0, {len(factors)}) for task {task!r}")
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = tuple(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    travel = rng.uniform(*TRAVEL_RANGE)
    center = rng.uniform(0.0, 1.0, size=2)
    radius = rng.uniform(*RADIUS_RANGE)
    angle = rng.uniform(0.0, 2 * np.pi)
    background_color = rng.integers(40, 216, size=3)
    background_seed = int(rng.integers(2**63 - 1))
    color = _contrasting_color(background_color, rng)  # last: it draws a variable number of values

    class_shape, class_direction = factors[label]
    shape, direction = class_shape or shape, class_direction or direction
    speed = travel / max(num_frames - 1, 1)
    return ClipSpec(
        shape=shape,
        color=color,
        center=(float(center[0]), float(center[1])),
        velocity=(speed * DIRECTIONS[direction][0], speed * DIRECTIONS[direction][1]),
        radius=float(radius),
        angle=float(angle),
        background_color=_rgb(background_color),
        background_seed=background_seed,
    )


def render_clip(spec: ClipSpec, num_frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``spec`` as uint8 [T, H, W, 3] RGB frames with H = W = ``size``; ``rng`` draws the pixel noise."""
    alpha = shape_coverage(spec, num_frames, size)[..., None]  # [T, H, W, 1]
    frames = (1.0 - alpha) * _background(spec, size) + alpha * np.asarray(spec.color, dtype=np.float64)
    frames += rng.normal(0.0, spec.noise_std, size=frames.shape)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def shape_coverage(spec: ClipSpec, num_frames: int, size: int) -> np.ndarray:
    """Where the shape is in each frame of :func:`render_clip`: the fraction of each pixel it covers,
    float64 [T, H, W] in [0, 1] (ground truth for what a model should look at)."""
    return _coverage(spec, spec.positions(num_frames), size)


def _rgb(values: Sequence[int] | np.ndarray) -> tuple[int, int, int]:
    return int(values[0]), int(values[1]), int(values[2])


def _contrasting_color(background: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A uniform RGB colour at least ``MIN_CONTRAST`` from ``background``, so the shape never blends in."""
    while True:
        color = rng.integers(0, 256, size=3)
        if np.linalg.norm(color - background) >= MIN_CONTRAST:
            return _rgb(color)


def _background(spec: ClipSpec, size: int) -> np.ndarray:
    """Static texture: the base colour plus a few random plane waves and grain. float64 [H, W, 3]."""
    rng = np.random.default_rng(spec.background_seed)
    coords = (np.arange(size) + 0.5) / size
    x, y = coords[None, :], coords[:, None]  # [1, W], [H, 1]
    image = np.tile(np.asarray(spec.background_color, dtype=np.float64), (size, size, 1))
    for _ in range(NUM_WAVES):
        fx, fy = rng.integers(-4, 5, size=2)
        phase = rng.uniform(0.0, 2 * np.pi)
        amplitude = rng.uniform(-WAVE_AMPLITUDE, WAVE_AMPLITUDE, size=3)
        image += np.sin(2 * np.pi * (fx * x + fy * y) + phase)[..., None] * amplitude
    return image + rng.normal(0.0, GRAIN_STD, size=image.shape)


def _wrap(offset: np.ndarray, period: float) -> np.ndarray:
    """Map offsets into [-period / 2, period / 2): the shortest way round the torus."""
    return np.mod(offset + period / 2, period) - period / 2


def _coverage(spec: ClipSpec, positions: np.ndarray, size: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, float64 [T, H, W], from ``positions`` [T, 2] in [0, 1)."""
    pixels = np.arange(size) + 0.5
    centres = positions * size  # [T, 2], pixels
    # Offsets wrap so that a shape crossing an edge shows on both sides, as on a torus.
    dx = _wrap(pixels[None, None, :] - centres[:, 0, None, None], size)  # [T, 1, W]
    dy = _wrap(pixels[None, :, None] - centres[:, 1, None, None], size)  # [T, H, 1]
    radius = spec.radius * size
    if spec.shape == "circle":
        distance = np.hypot(dx, dy) - radius
    else:
        # A regular polygon is the intersection of half-planes: outward edge normals sit between vertices.
        sides = _SIDES[spec.shape]
        normals = spec.angle + np.pi * (2 * np.arange(sides) + 1) / sides
        apothem = radius * np.cos(np.pi / sides)
        distance = np.max([dx * np.cos(a) + dy * np.sin(a) for a in normals], axis=0) - apothem
    # A signed distance ramped over one pixel anti-aliases the edge.
    return np.clip(0.5 - distance, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class SynthDataset:
    """A synthetic dataset on disk: ``videos/<split>/<class>/<index>.mp4`` plus list and class files."""

    root: Path
    task: Task
    classes: tuple[str, ...]
    train_list: Path
    val_list: Path
    classes_file: Path

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class _Job:
    """One video to render and encode; plain data so it pickles into worker processes."""

    path: Path
    task: Task
    seed: int
    split: str
    label: int
    index: int
    num_frames: int
    size: int
    fps: float
    lossless: bool


# Fraction of the frame side a long video's shape moves per frame: about what a synthetic training clip of 10
# to 32 frames covers per frame, so that windows of a long video look like the clips a run trains on.
LONG_VIDEO_SPEED = 0.02


def action_change_frames(
    directions: Sequence[str] = ("left", "up"),
    seconds: Sequence[float] = (20.0, 20.0),
    fps: float = 8.0,
    size: int = 48,
    seed: int = 0,
    speed: float = LONG_VIDEO_SPEED,
) -> np.ndarray:
    """A long, untrimmed motion video: uint8 [T, size, size, 3], ``seconds[i]`` of motion towards
    ``directions[i]``, one after the other, ``speed`` frame sides per frame.

    Every part is drawn from a generator in the same state, so the shape, its colours and the background
    stay; the shape carries on from where the previous part left it, and only its direction changes.
    """
    noise = np.random.default_rng([seed, 1])
    parts, start = [], None
    for direction, length in zip(directions, seconds, strict=True):
        n = round(length * fps)
        label = class_names("motion").index(direction)
        spec = sample_spec("motion", label, n, np.random.default_rng([seed, 0]))
        velocity = np.asarray(DIRECTIONS[direction]) * speed
        if start is None:
            start = np.asarray(spec.center) - (n - 1) / 2 * velocity
        # ClipSpec's trajectory is centred on its midpoint: place the midpoint so that it starts at ``start``.
        centre = np.mod(start + (n - 1) / 2 * velocity, 1.0)
        spec = dataclasses.replace(spec, center=tuple(centre.tolist()), velocity=tuple(velocity.tolist()))
        parts.append(render_clip(spec, n, size, noise))
        start = start + n * velocity
    return np.concatenate(parts)


def write_action_change_video(path: str | Path, fps: float = 8.0, **kwargs: Any) -> Path:
    """:func:`action_change_frames` as an mp4 file at ``fps``."""
    return write_video(path, action_change_frames(fps=fps, **kwargs), fps=fps)


def clip_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    """The generator of one dataset video, keyed by its identity, not by the order videos are made in."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([seed, SPLITS.index(split), label, index])


def make_dataset(
    out_dir: str | Path,
    task: Task = "motion",
    num_train_per_class: int = 32,
    num_val_per_class: int = 8,
    num_frames: int = 32,
    size: int = 112,
    fps: float = 25.0,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    lossless: bool = False,
) -> SynthDataset:
    """Render a synthetic dataset into ``out_dir`` and return where its files are.

    Writes ``videos/{train,val}/<class>/<index>.mp4``, the list files ``train.txt`` and ``val.txt``
    (one ``relpath label`` per line, paths relative to ``out_dir``) and ``classes.txt`` (one name per line,
    in label order). Videos hold ``num_frames`` frames of ``size`` x ``size`` pixels; odd sizes gain a row and
    a column unless ``lossless``. ``workers > 1`` renders in that many processes, with identical results.
    """
    classes = class_names(task)
    _check_at_least(1, num_train_per_class=num_train_per_class, workers=workers)
    _check_at_least(0, num_val_per_class=num_val_per_class)
    _check_at_least(2, num_frames=num_frames)  # motion needs two frames
    _check_at_least(16, size=size)
    clip_rng(seed, "train", 0, 0)  # validates the seed before any work

    root = Path(out_dir)
    counts = {"train": num_train_per_class, "val": num_val_per_class}
    entries = {split: _split_entries(classes, split, count) for split, count in counts.items()}
    jobs = [
        _Job(root / relpath, task, seed, split, label, index, num_frames, size, fps, lossless)
        for split in SPLITS
        for relpath, label, index in entries[split]
    ]
    _run(jobs, workers, progress=progress, desc=f"synth {task}")

    lists = {split: root / f"{split}.txt" for split in SPLITS}
    for split, path in lists.items():
        atomic_write_text(path, "".join(f"{relpath} {label}\n" for relpath, label, _ in entries[split]))
    classes_file = atomic_write_text(root / "classes.txt", "".join(f"{name}\n" for name in classes))
    return SynthDataset(root, task, classes, lists["train"], lists["val"], classes_file)


def _split_entries(classes: Sequence[str], split: str, per_class: int) -> list[tuple[str, int, int]]:
    """(relative path, label, index within class) of every video of ``split``, class by class."""
    return [
        (f"videos/{split}/{name}/{index:04d}.mp4", label, index)
        for label, name in enumerate(classes)
        for index in range(per_class)
    ]


def _render_job(job: _Job) -> None:
    rng = clip_rng(job.seed, job.split, job.label, job.index)
    spec = sample_spec(job.task, job.label, job.num_frames, rng)
    frames = render_clip(spec, job.num_frames, job.size, rng)
    write_video(job.path, frames, fps=job.fps, lossless=job.lossless)


def _run(jobs: list[_Job], workers: int, progress: bool, desc: str) -> None:
    if workers == 1 or len(jobs) <= 1:
        for job in tqdm(jobs, desc=desc, unit="video", disable=not progress):
            _render_job(job)
        return
    # The pool starts before the progress bar's monitor thread, so no thread is live when it forks.
    with _pool_context().Pool(min(workers, len(jobs))) as pool:
        results = pool.imap_unordered(_render_job, jobs)
        for _ in tqdm(results, total=len(jobs), desc=desc, unit="video", disable=not progress):
            pass


def _pool_context() -> multiprocessing.context.BaseContext:
    """Start workers by fork on Linux, by spawn elsewhere (where fork is unsafe or absent).

    Fork is safe here because workers only run numpy and the encoder, never torch; unlike spawn, it does not
    re-import ``__main__``, which fails for scripts read from stdin.
    """
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def _check_at_least(minimum: int, **values: int) -> None:
    for name, value in values.items():
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
