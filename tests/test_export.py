"""Exports for deployment: ONNX (through onnxruntime) and torch.export programs give the eager model's scores
at any batch size, EVL's backbone and decoder parts compose to the whole, a text method's export holds its
class list, deployment.json round-trips, and the example script predicts as ``Predictor`` does."""

from __future__ import annotations

import ast
import importlib.util
import json
import operator
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evl.cli
import evl.engine.export
from evl.config import BackboneSpec, DataConfig, DecoderConfig, MethodConfig, RunConfig
from evl.engine.export import (
    DEPLOYMENT_FILE,
    Deployment,
    ExportDependencyError,
    export_run,
    exportable,
    load_exported,
    read_deployment,
)
from evl.engine.methods import build_model, inference_context
from evl.engine.predict import Predictor
from evl.engine.run import LoadedRun, write_run_files
from evl.video.encode import write_video
from factories import TINY_BACKBONE, randomize_

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "onnx_predict.py"
CLASSES = ["run", "jump", "swim", "climb", "throw"]
TOLERANCE = 1e-4

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="the export extra (onnx, onnxscript, onnxruntime) is not installed",
)


def untrained(method: str, run_dir: Path | None = None, **data) -> LoadedRun:
    """A model of ``method`` built through the registry on the tiny random backbone (2 decoder layers, 4
    frames), nothing trained; with ``run_dir``, written there as a run directory ``load_run`` reads."""
    run = RunConfig(
        backbone=BackboneSpec(name=TINY_BACKBONE),
        decoder=DecoderConfig(num_layers=2),
        data=DataConfig(num_frames=4, frame_stride=2, **data),
        method=MethodConfig(name=method),
    )
    built = build_model(run, run_dir, CLASSES, seed=0)
    if run_dir is not None:
        write_run_files(run_dir, run, built.payload, CLASSES)
    model = built.model.eval()
    if method == "evl":
        randomize_(model)  # zero-initialised tables (query, position embedding, cross-frame weights) drawn
    return LoadedRun(run_dir, run, model, CLASSES, 0)


def frames(batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 4, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def eager(loaded: LoadedRun, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), inference_context(loaded.model):
        return loaded.model(video)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def evl_run() -> LoadedRun:
    # Two temporal x three spatial views: six clips a video, which the example script batches as well.
    return untrained("evl", num_temporal_views=2, num_spatial_views=3)


@pytest.fixture(scope="module")
def evl_onnx(evl_run, tmp_path_factory):
    return export_run(evl_run, tmp_path_factory.mktemp("onnx"), format="onnx")


# ------------------------------------------------------------------------------------------------ EVL


@needs_onnx
def test_onnx_scores_equal_the_model_at_any_batch_size(evl_run, evl_onnx):
    import onnx

    assert evl_onnx.max_difference is not None and evl_onnx.max_difference <= TOLERANCE
    run = load_exported(evl_onnx.directory)
    for batch in (2, 3, 1):  # traced at 2
        assert_close(run(frames(batch)), eager(evl_run, frames(batch)))
    proto = onnx.load(str(evl_onnx.paths[0]))
    (video,), (scores,) = proto.graph.input, proto.graph.output
    assert (video.name, scores.name) == ("frames", "scores")
    assert video.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in video.type.tensor_type.shape.dim[1:]] == [4, 3, 112, 112]
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert evl_onnx.deployment.opset == opsets[""]


@needs_onnx
def test_split_backbone_and_decoder_compose_to_the_whole(evl_run, evl_onnx, tmp_path):
    import onnxruntime

    result = export_run(evl_run, tmp_path, format="onnx", split=True, check=False)
    deployment = result.deployment
    assert deployment.files == {"backbone": "backbone.onnx", "decoder": "decoder.onnx"}
    names = ("layer0_out", "layer0_attn", "layer1_out", "layer1_attn")
    assert deployment.outputs["backbone"] == deployment.inputs["decoder"] == names
    video = frames(3)
    backbone = onnxruntime.InferenceSession(str(tmp_path / "backbone.onnx"))
    features = backbone.run(list(names), {"frames": video.numpy()})
    # The decoder's inputs: per layer the block output [B, T, L, C] and the cross-frame maps.
    expected = evl_run.model.extract_features(video)
    for (out, attn), f in zip(zip(features[::2], features[1::2], strict=True), expected, strict=True):
        assert out.shape == (3, 4, 50, 192) and attn.shape == (3, 2, 3, 49, 49)
        assert_close(torch.from_numpy(out), f.out)
        assert_close(torch.from_numpy(attn), f.attn)
    decoder = onnxruntime.InferenceSession(str(tmp_path / "decoder.onnx"))
    (scores,) = decoder.run(["scores"], dict(zip(names, features, strict=True)))
    scores_whole = load_exported(evl_onnx.directory)
    assert_close(torch.from_numpy(scores), scores_whole(video))
    assert_close(load_exported(tmp_path)(video), eager(evl_run, video))
    config = json.loads((tmp_path / DEPLOYMENT_FILE).read_text())  # the example script runs both parts too
    assert_close(
        torch.from_numpy(_example_module().scores(tmp_path, config, video.numpy())), scores_whole(video)
    )


def test_torch_export_program_equals_the_model_in_plain_aten_ops(evl_run, tmp_path):
    result = export_run(evl_run, tmp_path, format="torch-export", check=False)
    assert result.paths == [tmp_path / "model.pt2"] and result.deployment.opset is None
    program = torch.export.load(str(tmp_path / "model.pt2"))
    for batch in (2, 3):
        with torch.no_grad():
            assert_close(program.module()(frames(batch)), eager(evl_run, frames(batch)))
    # The straightforward formulation: aten operators only (and Python's on symbolic sizes), no custom
    # autograd Function or other wrapper.
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert all(
        isinstance(t, torch._ops.OpOverload) or t is getattr(operator, t.__name__, None) for t in calls
    )
    assert evl_run.model.decoder.formulation == "auto"  # the model's own formulation is left as it was


def test_split_is_for_evl_only(tmp_path):
    with pytest.raises(ValueError, match="split export separates EVL's frozen backbone"):
        export_run(untrained("vifi"), tmp_path, format="torch-export", split=True)


# ----------------------------------------------------------------------------------------- text methods


@needs_onnx
def test_text_method_export_holds_its_class_list_without_the_text_tower(tmp_path):
    loaded = untrained("vifi")
    fixed = exportable(loaded.model)
    assert not any(name.startswith("text.") for name, _ in fixed.named_parameters())
    assert fixed.class_embeddings.shape[0] == len(CLASSES)
    result = export_run(loaded, tmp_path, format="onnx", check=False)
    assert result.deployment.classes == tuple(CLASSES)
    assert result.deployment.templates == ("a photo of a {}.",)
    assert_close(load_exported(tmp_path)(frames(3)), eager(loaded, frames(3)))


@pytest.mark.slow
def test_xclip_export_holds_its_class_list(tmp_path):
    loaded = untrained("xclip")
    assert not any(name.startswith("text.") for name, _ in exportable(loaded.model).named_parameters())
    export_run(loaded, tmp_path, format="torch-export", check=False)
    assert_close(load_exported(tmp_path)(frames(3)), eager(loaded, frames(3)))


# ------------------------------------------------------------------------------------- deployment.json


@needs_onnx
def test_deployment_json_round_trips_and_describes_the_views(evl_onnx):
    text = (evl_onnx.directory / DEPLOYMENT_FILE).read_text()
    deployment = read_deployment(evl_onnx.directory)
    assert deployment == evl_onnx.deployment == Deployment.from_dict(json.loads(text))
    assert Deployment.from_dict(deployment.to_dict()) == deployment
    assert deployment.classes == tuple(CLASSES) and deployment.method == "evl"
    assert (deployment.num_frames, deployment.image_size, deployment.sampling) == (4, 112, "dense")
    assert (deployment.frame_stride, deployment.num_temporal_views, deployment.num_spatial_views) == (2, 2, 3)
    assert deployment.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert deployment.inputs == {"model": ("frames",)} and deployment.outputs == {"model": ("scores",)}
    assert deployment.templates is None and deployment.dtype == "float32"


def test_reading_a_folder_without_deployment_json_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        read_deployment(tmp_path)


# --------------------------------------------------------------------------------------- example script


def _example_module():
    spec = importlib.util.spec_from_file_location("onnx_predict", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_onnx
def test_example_script_predicts_as_predictor_does(evl_run, evl_onnx, tmp_path, capsys):
    # A landscape video longer than a clip: a resize of both sides, three crops along the width, two clips.
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (60, 80, 3)).astype(np.float64)
    video = np.stack([np.roll(base, 3 * t, axis=1) for t in range(20)])
    path = write_video(
        tmp_path / "clip.mp4", np.clip(video + rng.normal(0, 8, video.shape), 0, 255).astype(np.uint8)
    )
    predictor = Predictor(evl_run)
    example = _example_module()
    config = json.loads((evl_onnx.directory / DEPLOYMENT_FILE).read_text())
    clips = example.read_frames(str(path), config)
    views = example.preprocess(clips, config)
    torch.testing.assert_close(torch.from_numpy(views), predictor.views.load(path), atol=1e-4, rtol=0)
    _, probabilities = example.probabilities(evl_onnx.directory, str(path))
    torch.testing.assert_close(
        torch.from_numpy(probabilities).double(), predictor.probabilities(path), atol=1e-5, rtol=0
    )

    example.main([str(evl_onnx.directory), str(path), "--topk", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(path) and len(lines) == 4
    assert lines[1].split()[-1] == predictor.predict(path, topk=1).classes[0]


# ----------------------------------------------------------------------------------- missing packages


def test_missing_onnx_packages_are_one_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what an import of a missing package raises
    with pytest.raises(ExportDependencyError) as error:
        export_run(untrained("evl"), tmp_path, format="onnx")
    message = str(error.value)
    assert "\n" not in message and "onnxscript" in message and "pip install 'evl[export]'" in message
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_onnx_packages_are_imported_only_inside_functions():
    source = Path(evl.engine.export.__file__).read_text()
    top_level = [node for node in ast.parse(source).body if isinstance(node, ast.Import | ast.ImportFrom)]
    names = [a.name for n in top_level for a in n.names] + [
        n.module for n in top_level if isinstance(n, ast.ImportFrom)
    ]
    assert not [name for name in names if name.split(".")[0].startswith("onnx")]


# -------------------------------------------------------------------------------------------- command


def test_cli_exports_a_run_directory(tmp_path, capsys):
    from evl.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    loaded = untrained("zeroshot", run_dir)  # nothing trained: a run directory without checkpoints
    assert main(["export", str(run_dir), "--format", "torch-export"]) == 0
    out = capsys.readouterr().out
    assert "model.pt2" in out and DEPLOYMENT_FILE in out
    deployment = read_deployment(run_dir / "export")
    assert deployment.method == "zeroshot" and deployment.templates == ("{}",)
    assert_close(load_exported(run_dir / "export")(frames(2)), eager(loaded, frames(2)))
    assert main(["export", str(run_dir), "--split", "--format", "torch-export"]) == 2
    assert "split export separates EVL's frozen backbone" in capsys.readouterr().err
