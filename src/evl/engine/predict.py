"""Predicting the classes of one's own videos with a trained run: ``evl.load(RUN_DIR).predict(path)``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evl.config import DataConfig, MethodConfig
from evl.engine.explain import Explanation, explain_video
from evl.engine.methods import ZEROSHOT
from evl.engine.run import LoadedRun, load_run, zeroshot_run
from evl.engine.scoring import score_batches
from evl.video.dataset import EvalViews

if TYPE_CHECKING:
    from evl.engine.timeline import Timeline

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"}


@dataclass(frozen=True)
class Prediction:
    path: str
    classes: list[str]  # top-k, best first
    probabilities: list[float]
    labels: list[int]

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "predictions": [
                {"label": i, "class": c, "probability": p}
                for i, c, p in zip(self.labels, self.classes, self.probabilities, strict=True)
            ],
        }


def expand_video_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders contribute their video files (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out


class Predictor:
    """A trained run ready to classify video files (views and preprocessing as the run evaluates)."""

    def __init__(self, run: LoadedRun) -> None:
        self.run = run
        self.model = run.model
        self.classes = run.classes
        self.views = EvalViews.for_encoder(run.run.data, self.model.vision_config)

    @torch.no_grad()
    def probabilities(self, path: str | Path) -> torch.Tensor:
        """Class probabilities [C] of one video (softmax averaged over views)."""
        views = self.views.load(Path(path))  # [V, T, 3, S, S]
        # Not pinned: one video's views are copied once and the forward pass waits for them at once, so
        # staging them in page-locked memory would add a host copy and save nothing.
        batch = {"video": views[None], "index": [0], "path": [str(path)]}
        scored = score_batches(self.model, [batch], 1, self.model.num_classes, batch_size=1, progress=False)
        return torch.from_numpy(scored.scores[0])

    def predict(self, path: str | Path, topk: int = 5) -> Prediction:
        probs = self.probabilities(path)
        values, indices = probs.topk(min(topk, probs.numel()))
        labels = indices.tolist()
        return Prediction(str(path), [self.classes[i] for i in labels], values.tolist(), labels)

    def timeline(
        self,
        path: str | Path,
        window: float | None = 2.0,
        stride: float | None = None,
        *,
        window_frames: int | None = None,
        stride_frames: int | None = None,
        topk: int = 5,
        batch_size: int = 8,
        progress: bool = False,
    ) -> Timeline:
        """A long video as windows of ``window`` seconds every ``stride`` seconds (default: half a window),
        or in frames, each classified, merged into segments: see :mod:`evl.engine.timeline`."""
        from evl.engine.timeline import predict_timeline  # here: timeline imports this module

        return predict_timeline(
            self,
            path,
            window,
            stride,
            window_frames=window_frames,
            stride_frames=stride_frames,
            topk=topk,
            batch_size=batch_size,
            progress=progress,
        )

    def explain(
        self,
        path: str | Path,
        *,
        layer: int | None = None,
        frame: int | None = None,
        patch: tuple[int, int] | None = None,
    ) -> Explanation:
        """Where the model looks in the video's first view: attention maps (EVL) or each class's
        similarity per frame (text methods); see :mod:`evl.engine.explain`."""
        return explain_video(self, path, layer=layer, frame=frame, patch=patch)

    def embed(self, path: str | Path) -> torch.Tensor:
        """The video's embedding [D] (float32, on the CPU): see :mod:`evl.engine.embed` for what it is."""
        from evl.engine.embed import embed_views  # here: embed imports this module

        return embed_views(self, self.views.load(Path(path))[None])[0]


def load(run_dir: str | Path, device: str | None = None) -> Predictor:
    """Load a run directory for prediction: ``evl.load("runs/k400").predict("clip.mp4")``."""
    return Predictor(load_run(run_dir, device=device))


def zeroshot(
    clip: str | Path,
    classes: Sequence[str],
    num_frames: int = 8,
    templates: Sequence[str] | None = None,
    device: str | None = None,
) -> Predictor:
    """Zero-shot CLIP from CLIP weights alone: ``evl.zeroshot("ViT-B-16.pt", ["run", "jump"]).predict(path)``.

    ``templates`` are the class prompts (``{}`` is the name); the default is the bare class name.
    """
    method = MethodConfig(name=ZEROSHOT.name, templates=tuple(templates) if templates else None)
    data = DataConfig(num_frames=num_frames)
    return Predictor(zeroshot_run(clip, classes, data, method, device=device))
