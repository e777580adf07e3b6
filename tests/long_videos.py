"""For the timeline and embedding tests: long generated videos whose action changes part-way (one shape
moving one way, then another way), tiny real models of every method to run over them, and a window's clip
made the way evaluation makes a clip."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from evl.engine.methods import build_model
from evl.engine.predict import Predictor
from evl.engine.run import LoadedRun
from evl.engine.window_pass import window_transform
from evl.recipes import build_run_config
from evl.synth import DIRECTIONS, class_names, render_clip, sample_spec
from evl.video.decode import read_frames
from evl.video.encode import write_video
from factories import TINY_BACKBONE, randomize_

# Fraction of the frame side the shape moves per frame: about what a synthetic training clip of 10 to 32
# frames covers per frame, so that windows look like the clips a run trains on.
SPEED = 0.02


def action_change_frames(
    directions: Sequence[str] = ("left", "up"),
    seconds: Sequence[float] = (20.0, 20.0),
    fps: float = 8.0,
    size: int = 48,
    seed: int = 0,
) -> np.ndarray:
    """uint8 [T, size, size, 3]: ``seconds[i]`` of motion towards ``directions[i]``, one after the other.

    Every part is drawn from a generator in the same state, so the shape, its colours and the background
    stay; the shape carries on from where the previous part left it, and only its direction changes.
    """
    noise = np.random.default_rng([seed, 1])
    parts, start = [], None
    for direction, length in zip(directions, seconds, strict=True):
        n = round(length * fps)
        label = class_names("motion").index(direction)
        spec = sample_spec("motion", label, n, np.random.default_rng([seed, 0]))
        velocity = np.asarray(DIRECTIONS[direction]) * SPEED
        if start is None:
            start = np.asarray(spec.center) - (n - 1) / 2 * velocity
        # ClipSpec's trajectory is centred on its midpoint: place the midpoint so that it starts at ``start``.
        centre = np.mod(start + (n - 1) / 2 * velocity, 1.0)
        spec = dataclasses.replace(spec, center=tuple(centre.tolist()), velocity=tuple(velocity.tolist()))
        parts.append(render_clip(spec, n, size, noise))
        start = start + n * velocity
    return np.concatenate(parts)


def write_action_change_video(path: str | Path, fps: float = 8.0, **kwargs) -> Path:
    """:func:`action_change_frames` as an mp4 file at ``fps``."""
    return write_video(path, action_change_frames(fps=fps, **kwargs), fps=fps)


def tiny_predictor(method: str = "evl") -> Predictor:
    """A real model of ``method`` on the tiny random ViT (4 frames, dense stride 2) over the motion classes,
    built in memory."""
    classes = list(class_names("motion"))
    run = build_run_config(
        None,
        [f"method.name={method}"],
        **{"backbone.name": TINY_BACKBONE, "data.num_frames": 4, "data.frame_stride": 2},
    )
    torch.manual_seed(0)
    model = build_model(run, None, classes).model
    if method == "evl":
        randomize_(model)  # the zero-initialised query and tables contribute too
    return Predictor(LoadedRun(None, run, model.eval(), classes, 0))


def reference_clip(predictor: Predictor, path: str | Path, indices: np.ndarray) -> torch.Tensor:
    """A window's clip [T, 3, S, S] as evaluation makes a clip: ``read_frames``, then the run's transform
    (one centre crop)."""
    return window_transform(predictor.views)(read_frames(path, indices))[0]
