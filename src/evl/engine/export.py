"""A run's model for deployment: frames [B, T, 3, S, S] (normalised, float32) -> class scores [B, K], as an
ONNX model or a ``torch.export`` program (``.pt2``), with ``deployment.json``: what a deployment must
reproduce around it (classes, frame sampling, image size, mean and std, input and output names).

```
EXPORT_DIR/
  model.onnx | model.pt2        the whole model; or, split (EVL only):
  backbone.onnx | backbone.pt2  frames -> per decoder layer i: layer{i}_out [B, T, L, C], layer{i}_attn
                                [B, 2, T-1, P, P] (the cross-frame maps; absent without cross-attention)
  decoder.onnx | decoder.pt2    those -> scores [B, K]
  deployment.json               see :class:`Deployment`
```

What is exported is each model's straightforward formulation: EVL's decoder "reference" formulation
(:meth:`~evl.models.evl.EVLDecoder.forward_reference`: plain ops, no custom autograd Function, nothing
written in place, no loop over the batch) and the backbone's plain ops, which is what they take while
traced. So the graph is valid for any batch size (the batch axis is dynamic; frames and image size are
fixed). It computes in float32 on the CPU, as prediction does there; the scores equal the eager model's
within float rounding (:func:`export_run` checks them on a batch of another size than the one traced).

A text method (ViFi-CLIP, X-CLIP, zero-shot CLIP) matches videos against class-text embeddings: its export
holds the run's class list fixed, the embeddings encoded once and stored as constants, without the text
tower (``fixed_classes()`` of :mod:`evl.models.vificlip` and :mod:`evl.models.xclip`). Another class list
needs another export (``load_source(..., classes=...)`` first).

ONNX needs the ``export`` extra (onnx, onnxscript, onnxruntime), imported only here and only when used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evl.engine.methods import inference_context, method_spec, templates_for
from evl.engine.run import LoadedRun
from evl.io import atomic_write_text
from evl.models.evl import EVL, EVLDecoder
from evl.models.frame_features import FrameFeatures
from evl.video.dataset import EvalViews

__all__ = [
    "DEPLOYMENT_FILE",
    "FORMATS",
    "Deployment",
    "ExportDependencyError",
    "ExportResult",
    "export_run",
    "exportable",
    "load_exported",
    "read_deployment",
]

logger = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
DEPLOYMENT_FILE = "deployment.json"
INPUT_NAME, OUTPUT_NAME = "frames", "scores"
EXPORT_EXTRA = "pip install 'evl[export]'"
# The batch a graph is traced with, and the different one it is checked on (a size of 1 would be
# specialised by the tracer, and equal sizes would not show a batch size baked into the graph).
TRACE_BATCH, CHECK_BATCH = 2, 3


class ExportDependencyError(ImportError):
    """A package the ONNX export or its check needs is not installed; the message names the extra."""


def _require(purpose: str, *modules: str) -> None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportDependencyError(
            f"{purpose} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: {EXPORT_EXTRA}"
        )


# -------------------------------------------------------------------------------------------- deployment


@dataclass(frozen=True)
class Deployment:
    """``deployment.json``: the exported files and everything needed to feed and read them.

    Input: ``num_frames`` frames of ``num_temporal_views`` clips sampled as ``sampling`` says (``dense``:
    ``frame_stride`` apart, clips spread over the video, one centred; ``segment``: one frame from the middle
    of each of ``num_frames`` equal segments); each frame's short side resized to ``image_size``
    (bilinear, no antialiasing, the long side floored), ``num_spatial_views`` square crops (1: centre;
    3: start, middle and end of the long side), pixels / 255 normalised with ``mean`` and ``std`` per RGB
    channel; as float32 [B, T, 3, S, S]. Output: ``scores`` [B, K], logits over ``classes``; a video's
    probabilities are the softmax of each view's scores, averaged over its views.
    """

    format: str  # "onnx" or "torch-export"
    files: dict[str, str]  # "model", or "backbone" and "decoder" (split), -> file name in the folder
    inputs: dict[str, tuple[str, ...]]  # per file, its inputs' names in order
    outputs: dict[str, tuple[str, ...]]  # per file, its outputs' names in order
    method: str
    classes: tuple[str, ...]
    num_frames: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sampling: str
    frame_stride: int
    num_temporal_views: int
    num_spatial_views: int
    dtype: str = "float32"
    opset: int | None = None  # ONNX: the default-domain opset the graph uses
    # Text methods: the prompt templates the stored class embeddings were encoded from ("{}" = class name).
    templates: tuple[str, ...] | None = None
    torch_version: str = torch.__version__

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Deployment:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        for name in ("classes", "mean", "std"):
            fields[name] = tuple(fields[name])
        for name in ("inputs", "outputs"):
            fields[name] = {part: tuple(names) for part, names in fields[name].items()}
        if fields.get("templates") is not None:
            fields["templates"] = tuple(fields["templates"])
        return cls(**fields)


def read_deployment(directory: str | Path) -> Deployment:
    """The :class:`Deployment` of an export folder."""
    path = Path(directory) / DEPLOYMENT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not an export folder (no {DEPLOYMENT_FILE}); see 'evl export'")
    return Deployment.from_dict(json.loads(path.read_text()))


# ------------------------------------------------------------------------------------ what is exported


def exportable(model: nn.Module) -> nn.Module:
    """Frames -> scores as exported: a text method's model over its class list with the class embeddings
    stored (its ``fixed_classes()``), any other model itself."""
    fixed_classes = getattr(model, "fixed_classes", None)
    return fixed_classes() if fixed_classes is not None else model


class _PartModule(nn.Module):
    """``function``, which runs some of a model's modules, with only those ``modules`` registered (under
    their names in the model): ``torch.export`` keeps every registered parameter, used or not, so a part
    registers the modules it runs and no others. The function reaches the same module objects, so their
    weights are what it traces."""

    def __init__(self, function: Callable[..., Any], modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.function = function
        for name, module in modules.items():
            self.add_module(name, module)
        self.training = any(m.training for m in modules.values())  # theirs, left as it is

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.function(*inputs)


def _feature_names(model: EVL, num_frames: int) -> tuple[str, ...]:
    """The flat names of the decoder's inputs: layer{i}_out, and layer{i}_attn when there are maps."""
    with_maps = model.decoder.cross_attention is not None and num_frames > 1
    kinds = ("out", "attn") if with_maps else ("out",)
    return tuple(f"layer{i}_{kind}" for i in range(len(model.blocks)) for kind in kinds)


def _evl_parts(model: EVL, num_frames: int) -> tuple[nn.Module, nn.Module]:
    """(backbone part: frames -> the decoder's inputs, flat; decoder part: those -> scores)."""
    with_maps = len(_feature_names(model, num_frames)) > len(model.blocks)

    def features(frames: torch.Tensor) -> tuple[torch.Tensor, ...]:
        found = model.extract_features_reference(frames, with_attention=with_maps)
        return tuple(t for f in found for t in ((f.out, f.attn) if with_maps else (f.out,)))

    def scores(*flat: torch.Tensor) -> torch.Tensor:
        pairs = zip(flat[::2], flat[1::2], strict=True) if with_maps else ((out, None) for out in flat)
        return model.forward_head([FrameFeatures(out, attn) for out, attn in pairs])

    backbone = _PartModule(features, {"backbone": model.backbone})
    decoder = _PartModule(scores, {"decoder": model.decoder, "head": model.head})
    return backbone, decoder


@dataclass
class _Part:
    name: str  # "model", "backbone" or "decoder": the file's stem and its key in Deployment.files
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _parts(model: nn.Module, num_frames: int, split: bool) -> list[_Part]:
    if not split:
        return [_Part("model", exportable(model), (INPUT_NAME,), (OUTPUT_NAME,))]
    if not isinstance(model, EVL):
        raise ValueError(
            f"a split export separates EVL's frozen backbone from its decoder; this run's model is a "
            f"{type(model).__name__}, which is exported whole"
        )
    backbone, decoder = _evl_parts(model, num_frames)
    names = _feature_names(model, num_frames)
    return [
        _Part("backbone", backbone, (INPUT_NAME,), names),
        _Part("decoder", decoder, names, (OUTPUT_NAME,)),
    ]


@contextlib.contextmanager
def _reference_formulation(model: nn.Module) -> Iterator[None]:
    """Every EVL decoder of ``model`` in its "reference" formulation (what a traced graph holds, whatever
    formulation was set on it), restored on exit."""
    decoders = [m for m in model.modules() if isinstance(m, EVLDecoder)]
    saved = [d.formulation for d in decoders]
    for decoder in decoders:
        decoder.formulation = "reference"
    try:
        yield
    finally:
        for decoder, formulation in zip(decoders, saved, strict=True):
            decoder.formulation = formulation


# --------------------------------------------------------------------------------------------- writing


def _batch_dynamic(inputs: Sequence[torch.Tensor], packed: bool) -> tuple[Any, ...]:
    """``dynamic_shapes``: axis 0 of every input is the batch, one size for all; ``packed``: the inputs
    are one ``*args`` parameter of the traced function."""
    batch = torch.export.Dim("batch", min=1)
    shapes = tuple({0: batch} for _ in inputs)
    return (shapes,) if packed else shapes


def _write_onnx(part: _Part, example: tuple[torch.Tensor, ...], path: Path, opset: int | None) -> int:
    """The part as an ONNX file; -> the default-domain opset it uses."""
    program = torch.onnx.export(
        part.module,
        example,
        dynamo=True,  # the exporter on torch.export's graph; the TorchScript one is deprecated
        dynamic_shapes=_batch_dynamic(example, packed=isinstance(part.module, _PartModule)),
        input_names=list(part.inputs),
        output_names=list(part.outputs),
        opset_version=opset,
        verbose=False,
    )
    program.save(str(path))  # weights inline, unless over protobuf's 2 GB (then beside it, path + ".data")
    return int(program.model.opset_imports[""])


def _write_program(part: _Part, example: tuple[torch.Tensor, ...], path: Path) -> None:
    dynamic = _batch_dynamic(example, packed=isinstance(part.module, _PartModule))
    program = torch.export.export(part.module, example, dynamic_shapes=dynamic)
    torch.export.save(program, str(path))


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    deployment: Deployment
    # Largest |exported - eager| score on a random batch of CHECK_BATCH clips (None: not checked).
    max_difference: float | None

    @property
    def paths(self) -> list[Path]:
        return [self.directory / name for name in self.deployment.files.values()]


def export_run(
    run: LoadedRun,
    output_dir: str | Path,
    format: str = "onnx",
    split: bool = False,
    opset: int | None = None,
    check: bool = True,
) -> ExportResult:
    """Export ``run``'s model (loaded on the CPU) into ``output_dir`` with its ``deployment.json``.

    ``format``: "onnx" or "torch-export" (a ``torch.export.save`` program). ``split`` (EVL): the frozen
    backbone and the decoder with the head as two files, whose composition is the whole model. ``opset``:
    the ONNX opset (default: the exporter's). ``check``: run the export on random frames of a batch size
    other than the traced one and compare with the eager model (:attr:`ExportResult.max_difference`).
    """
    if format not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}; got {format!r}")
    if format == "onnx":
        _require("ONNX export", "onnx", "onnxscript")
        if check:
            _require("checking an ONNX export", "onnxruntime")
    model = run.model
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("export traces the model on the CPU: load the run with device='cpu'")
    deployment = _deployment(run, format, split)
    parts = _parts(model, deployment.num_frames, split)
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    opsets = []
    frames = _random_frames(TRACE_BATCH, deployment)
    with torch.no_grad(), inference_context(model), _reference_formulation(model):
        example: tuple[torch.Tensor, ...] = (frames,)
        for part in parts:
            path = directory / deployment.files[part.name]
            if format == "onnx":
                opsets.append(_write_onnx(part, example, path, opset))
            else:
                _write_program(part, example, path)
            logger.info("wrote %s", path)
            if part.name == "backbone":
                example = tuple(part.module(*example))  # the decoder part is traced on these
    if opsets:
        deployment = dataclasses.replace(deployment, opset=max(opsets))
    atomic_write_text(directory / DEPLOYMENT_FILE, json.dumps(deployment.to_dict(), indent=2) + "\n")
    difference = _max_difference(model, directory, deployment) if check else None
    return ExportResult(directory, deployment, difference)


def _deployment(run: LoadedRun, format: str, split: bool) -> Deployment:
    """What the export folder will hold, from the run's evaluation views (as ``evl predict`` reads)."""
    model = run.model
    views = EvalViews.for_encoder(run.run.data, model.vision_config)
    sampling, transform = views.sampling, views.transform.config
    names = _feature_names(model, sampling.num_frames) if isinstance(model, EVL) else ()
    if split:
        io = {"backbone": ((INPUT_NAME,), names), "decoder": (names, (OUTPUT_NAME,))}
    else:
        io = {"model": ((INPUT_NAME,), (OUTPUT_NAME,))}
    spec = method_spec(run.run.method.name)
    return Deployment(
        format=format,
        files={part: part + FORMATS[format] for part in io},
        inputs={part: inputs for part, (inputs, _) in io.items()},
        outputs={part: outputs for part, (_, outputs) in io.items()},
        method=spec.name,
        classes=tuple(run.classes),
        num_frames=sampling.num_frames,
        image_size=transform.size,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        sampling=sampling.kind,
        frame_stride=sampling.stride,
        num_temporal_views=sampling.num_temporal_views,
        num_spatial_views=transform.num_spatial_views,
        templates=templates_for(run.run.method) if spec.reads_text else None,
    )


def _random_frames(batch: int, deployment: Deployment, seed: int = 0) -> torch.Tensor:
    """Normalised-looking frames [batch, T, 3, S, S]: the tracer needs shapes, the check any values."""
    size = deployment.image_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, deployment.num_frames, 3, size, size, generator=generator)


def _max_difference(model: nn.Module, directory: Path, deployment: Deployment) -> float:
    frames = _random_frames(CHECK_BATCH, deployment, seed=1)
    with torch.no_grad(), inference_context(model):
        eager = model(frames)
    exported = load_exported(directory)(frames)
    return float((exported - eager).abs().max())


# --------------------------------------------------------------------------------------------- running


def load_exported(directory: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """An export folder as a function: frames [B, T, 3, S, S] (float32, preprocessed as its
    :class:`Deployment` says) -> scores [B, K]. ONNX files run in onnxruntime on the CPU; programs
    through ``torch.export.load``; split parts one after the other."""
    directory = Path(directory)
    deployment = read_deployment(directory)
    parts = [_load_part(directory, deployment, name) for name in deployment.files]

    def run(frames: torch.Tensor) -> torch.Tensor:
        values: tuple[torch.Tensor, ...] = (frames,)
        for part in parts:
            values = part(*values)
        (scores,) = values
        return scores

    return run


def _load_part(directory: Path, deployment: Deployment, name: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    path = directory / deployment.files[name]
    if deployment.format == "torch-export":
        module = torch.export.load(str(path)).module()

        def run_program(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                out = module(*inputs)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

        return run_program
    _require("running an ONNX export", "onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = deployment.inputs[name]

    def run_session(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {
            key: np.ascontiguousarray(v.numpy(), dtype=np.float32)
            for key, v in zip(inputs, values, strict=True)
        }
        return tuple(torch.from_numpy(out) for out in session.run(list(deployment.outputs[name]), feed))

    return run_session
