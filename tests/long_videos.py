"""For the timeline and embedding tests: tiny real models of every method to run over long generated videos
(``evl.synth.write_action_change_video``), and a window's clip made the way evaluation makes a clip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evl.engine.methods import build_model
from evl.engine.predict import Predictor
from evl.engine.run import LoadedRun
from evl.engine.window_pass import window_transform
from evl.recipes import build_run_config
from evl.synth import class_names
from evl.video.decode import read_frames
from factories import TINY_BACKBONE, randomize_

PROMPT_DEPTHS = ("method.prompt_vision_depth=6", "method.prompt_text_depth=4")


def tiny_predictor(method: str = "evl") -> Predictor:
    """A real model of ``method`` on the tiny random ViT (4 frames, dense stride 2) over the motion classes,
    built in memory."""
    classes = list(class_names("motion"))
    run = build_run_config(
        None,
        # Deep prompts no deeper than the tiny ViT's 6 image and 4 text blocks.
        [f"method.name={method}", *(PROMPT_DEPTHS if method == "vifi_prompt" else ())],
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
