"""Why a run predicts what it does for one video: the tensors behind ``evl explain``'s pictures.

For a method with attention maps (EVL; :attr:`~evl.engine.methods.MethodSpec.attention_maps`): per decoder
layer, the video-level query's attention over every frame's patches beside the encoder's class token's
attention in the same block (the EVL paper's Fig. 4), and the cross-frame attention of one patch in the
previous and the next frame (Fig. 6). For the methods that match classes by text: each class's similarity
with each frame over time. :func:`explain_video` returns them (``evl.load(RUN).explain(path)``);
:func:`save_explanation` writes the pictures, a JSON summary and the tensors.

One view of the video is explained, the first of those evaluation takes (centre crop, first clip), so the
pictures show exactly the frames the model saw.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from evl.engine.methods import inference_context, method_spec
from evl.engine.scoring import class_scores, model_device
from evl.io import atomic_path, atomic_write_text
from evl.models.attention_maps import EVLAttention
from evl.video.dataset import EvalViews

if TYPE_CHECKING:
    from evl.engine.predict import Predictor

SUMMARY_FILE = "explanation.json"
TENSORS_FILE = "explanation.safetensors"


@dataclass(frozen=True)
class PatchChoice:
    """The patch whose cross-frame attention is drawn: decoder ``layer``, ``frame``, patch (``row``,
    ``col``) on the grid."""

    layer: int
    frame: int
    row: int
    col: int

    def index(self, grid: tuple[int, int]) -> int:
        return self.row * grid[1] + self.col


@dataclass(frozen=True)
class Explanation:
    """One video explained. ``frames``: uint8 [T, S, S, 3], the view the model saw; ``probabilities``
    [K] of that view; ``attention`` (a batch of one) and ``patch`` for methods with attention maps;
    ``frame_similarity`` [T, K] (cosine of each frame's embedding with each class's text) for methods that
    match classes by text."""

    path: str
    method: str
    class_names: list[str]
    frames: torch.Tensor
    probabilities: torch.Tensor
    attention: EVLAttention | None = None
    patch: PatchChoice | None = None
    frame_similarity: torch.Tensor | None = None

    def top(self, k: int = 5) -> list[int]:
        """The ``k`` most probable classes' labels, best first."""
        return self.probabilities.topk(min(k, self.probabilities.numel())).indices.tolist()

    def to_dict(self) -> dict:
        """What ``explanation.json`` holds: prediction, chosen patch, per-layer attention summaries."""
        out: dict = {
            "path": self.path,
            "method": self.method,
            "frames": int(self.frames.shape[0]),
            "predictions": [
                {"label": i, "class": self.class_names[i], "probability": float(self.probabilities[i])}
                for i in self.top()
            ],
        }
        if self.attention is not None:
            query = self.attention.query[0]  # [M, T, L]
            out["layers"] = [
                {
                    "layer": m,
                    "block": block,
                    # Where the query's attention goes: each frame's share, and the class tokens' share.
                    "frame_mass": [round(float(v), 6) for v in query[m].sum(dim=-1)],
                    "prefix_mass": round(float(query[m, :, : self.attention.prefix_tokens].sum()), 6),
                }
                for m, block in enumerate(self.attention.blocks)
            ]
        if self.patch is not None:
            out["patch"] = dataclasses.asdict(self.patch)
        return out


def explanation_views(predictor: Predictor) -> EvalViews:
    """The single view explained: the run's sampling and preprocessing with one clip and the centre crop."""
    data = dataclasses.replace(predictor.run.run.data, num_temporal_views=1, num_spatial_views=1)
    return EvalViews.for_encoder(data, predictor.model.vision_config)


def explain_video(
    predictor: Predictor,
    path: str | Path,
    *,
    layer: int | None = None,
    frame: int | None = None,
    patch: tuple[int, int] | None = None,
) -> Explanation:
    """Explain ``path`` with a loaded run (see the module docstring).

    ``layer`` (default: the last), ``frame`` and ``patch`` (row, col) choose the cross-frame picture's
    patch; left out, the patch the query attends to most (in a frame with both neighbours when there are
    three frames or more) and its frame. A choice outside the model's range is a one-line ValueError.
    """
    model, spec = predictor.model, method_spec(predictor.run.run.method.name)
    views = explanation_views(predictor)
    video = views.load(Path(path))[:1]  # [1, T, 3, S, S]
    frames = _displayable(video[0], views.transform.config.mean, views.transform.config.std)
    video = video.to(model_device(model))
    common = dict(path=str(path), method=spec.name, class_names=list(predictor.classes), frames=frames)
    with torch.no_grad(), inference_context(model):
        if spec.attention_maps is not None:
            attention = spec.attention_maps(model, video)
            chosen = choose_patch(attention, layer, frame, patch)
            probabilities = class_scores(model, attention.logits.float())[0].cpu()
            return Explanation(
                **common, probabilities=probabilities, attention=_to_cpu(attention), patch=chosen
            )
        if layer is not None or frame is not None or patch is not None:
            raise ValueError(
                f"layer, frame and patch choose a patch of the attention maps; {spec.title} has none"
            )
        similarity = spec.frame_similarity(model, video)[0].cpu() if spec.frame_similarity else None
        probabilities = class_scores(model, model(video).float())[0].cpu()
    return Explanation(**common, probabilities=probabilities, frame_similarity=similarity)


def choose_patch(
    attention: EVLAttention,
    layer: int | None = None,
    frame: int | None = None,
    patch: tuple[int, int] | None = None,
) -> PatchChoice | None:
    """The cross-frame picture's patch (see :func:`explain_video`); None when the clip has one frame."""
    if attention.cross_frame is None:
        return None
    maps = attention.query_patches()[0]  # [M, T, rows, cols]
    num_layers, num_frames, rows, cols = maps.shape
    layer = num_layers - 1 if layer is None else layer
    _check_range("layer", layer, num_layers, "decoder layers")
    if frame is not None:
        _check_range("frame", frame, num_frames, "frames")
    if patch is not None:
        _check_range("patch row", patch[0], rows, "patch rows")
        _check_range("patch column", patch[1], cols, "patch columns")
    scores = maps[layer].clone()  # [T, rows, cols]
    if frame is None and num_frames >= 3:
        scores[0] = scores[-1] = -1.0  # prefer a frame with a previous and a next one
    if frame is not None:
        keep = torch.zeros(num_frames, dtype=torch.bool)
        keep[frame] = True
        scores[~keep] = -1.0
    if patch is not None:
        on_patch = torch.full_like(scores, -1.0)
        on_patch[:, patch[0], patch[1]] = scores[:, patch[0], patch[1]]
        scores = on_patch
    best = int(scores.flatten().argmax())
    t, rest = divmod(best, rows * cols)
    return PatchChoice(layer, t, *divmod(rest, cols))


def save_explanation(explanation: Explanation, out_dir: str | Path, dpi: int = 100) -> list[Path]:
    """The pictures (:mod:`evl.engine.explain_plot`), ``explanation.json`` and ``explanation.safetensors``
    (every tensor behind the pictures) in ``out_dir``; returns the files written, pictures first."""
    from evl.engine import explain_plot  # matplotlib only when pictures are drawn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = explain_plot.draw_explanation(explanation, out, dpi=dpi)
    summary = {**explanation.to_dict(), "pictures": [p.name for p in written]}
    written.append(atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n"))
    with atomic_path(out / TENSORS_FILE) as tmp:
        save_file(explanation_tensors(explanation), str(tmp))
    written.append(out / TENSORS_FILE)
    return written


def explanation_tensors(explanation: Explanation) -> dict[str, torch.Tensor]:
    """Named tensors of an explanation (batch axis dropped), as ``explanation.safetensors`` holds them."""
    tensors = {"frames": explanation.frames, "probabilities": explanation.probabilities}
    attention = explanation.attention
    if attention is not None:
        tensors["query_attention"] = attention.query[0]  # [M, T, L]
        if attention.class_token is not None:
            tensors["class_token_attention"] = attention.class_token[0]  # [M, T, L]
        if attention.cross_frame is not None:
            tensors["cross_frame_attention"] = attention.cross_frame[0]  # [M, 2, T-1, P, P]
    if explanation.frame_similarity is not None:
        tensors["frame_similarity"] = explanation.frame_similarity  # [T, K]
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def _displayable(video: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """A normalised clip [T, 3, S, S] -> uint8 [T, S, S, 3] as it looked before normalisation."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    pixels = (video.float().cpu() * std_t + mean_t).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _to_cpu(attention: EVLAttention) -> EVLAttention:
    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().float().cpu()

    return dataclasses.replace(
        attention,
        query=cpu(attention.query),
        class_token=cpu(attention.class_token),
        cross_frame=cpu(attention.cross_frame),
        logits=cpu(attention.logits),
    )


def _check_range(name: str, value: int, size: int, what: str) -> None:
    if not 0 <= value < size:
        raise ValueError(f"{name} {value} is outside this model's {size} {what} (0..{size - 1})")
