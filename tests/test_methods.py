"""The four methods through one engine, on generated mp4 files: ViFi-CLIP and X-CLIP train, evaluate and
predict through the engine's API; zero-shot CLIP runs with no training step; text methods take new class
lists; base/novel/HM. What only the CLI does (flags, exit codes, its one-line errors) is tested through it."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from evl.cli import main
from evl.config import MethodConfig
from evl.engine.checkpoint import list_checkpoints, load_checkpoint
from evl.engine.evaluate import evaluate, write_evaluation
from evl.engine.methods import set_classes, templates_for
from evl.engine.metrics import harmonic_mean, read_scores
from evl.engine.predict import Predictor, expand_video_paths
from evl.engine.run import load_run, zeroshot_run
from evl.engine.train import train
from evl.models.registry import clip_state_dict, create_clip
from evl.tokenizer import default_tokenizer
from evl.video.lists import read_list, write_class_names, write_list
from factories import tiny_dataset, tiny_run, train_flags


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"), train_per_class=3, val_per_class=2)


SETTINGS = ("train.lr=1e-5", "train.eval_every=2", "train.save_every=1", "data.rand_augment=null")


def method_run(dataset, method, *overrides, steps=2):
    """A two-clip-batch run of ``method`` on ``dataset``, for the engine's API."""
    return tiny_run(dataset, f"method.name={method}", *SETTINGS, *overrides, steps=steps, batch_size=2)


def train_args(dataset, run_dir, method, steps=2, extra=()):
    """The same run as ``evl train`` flags, for what the CLI itself does."""
    settings = [arg for setting in SETTINGS for arg in ("--set", setting)]
    return train_flags(
        dataset, run_dir, "--method", method, *settings, *extra, steps=steps, batch_size=2
    )  # fmt: skip


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def vifi_run(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vifi") / "run"
    assert train(method_run(dataset, "vifi"), run_dir, progress=False).step == 2
    return run_dir


@pytest.fixture(scope="module")
def xclip_run(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("xclip") / "run"
    assert train(method_run(dataset, "xclip"), run_dir, progress=False).step == 2
    return run_dir


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A random CLIP checkpoint in OpenAI's layout (both towers and the logit scale), as a file."""
    torch.manual_seed(11)
    towers = create_clip("random:ViT-T/16@112")
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_file(clip_state_dict(towers), str(path))
    return path


def _eval(run_or_weights, tmp_path, *extra) -> dict:
    out = tmp_path / "metrics.json"
    args = ["eval", str(run_or_weights), "--output", str(out), "--num-workers", "0", "--quiet", *extra]
    assert main(args) == 0
    return json.loads(out.read_text())


def _evaluate_run(run_dir) -> dict:
    """The run evaluated on its validation list, scores written to ``RUN/eval`` (as ``evl eval RUN``)."""
    loaded = load_run(run_dir)
    data = loaded.run.data
    entries = read_list(data.val_list, num_classes=len(loaded.classes), data_root=data.data_root)
    evaluation = evaluate(loaded.model, entries, data, batch_size=2, progress=False)
    write_evaluation(evaluation, run_dir / "eval", loaded.classes, None)
    return evaluation.result.to_dict()


def _hand_top1(scores_csv, val_list) -> float:
    scores = read_scores(scores_csv)
    return 100.0 * float(np.mean(scores.scores.argmax(axis=1) == scores.labels))


# --------------------------------------------------------------------------------------------- ViFi-CLIP


def test_vifi_trains_both_encoders_and_evaluates(vifi_run, dataset):
    checkpoint = load_checkpoint(vifi_run)
    keys = set(checkpoint.model_state)
    assert checkpoint.step == 2
    assert any(k.startswith("visual.transformer.") for k in keys)
    assert any(k.startswith("text.transformer.") for k in keys)
    assert "logit_scale" in keys
    # Token embeddings are frozen (the reference precomputes them), so they are not a trained weight.
    assert not any(k.startswith("text.token_embedding") for k in keys)
    config = json.loads((vifi_run / "config.json").read_text())
    assert config["method"] == "vifi" and config["model"]["tune"] == "both"
    # The reference's normalisation for ViFi-CLIP: ImageNet statistics.
    assert config["model"]["vision"]["mean"] == [0.485, 0.456, 0.406]

    metrics = _evaluate_run(vifi_run)
    assert metrics["num_videos"] == 8
    assert metrics["top1"] == pytest.approx(_hand_top1(vifi_run / "eval" / "scores.csv", dataset.val_list))

    predictor = Predictor(load_run(vifi_run))
    videos = expand_video_paths([dataset.root / "videos" / "val"])
    names = dataset.classes_file.read_text().split()
    assert len(videos) == 8
    for video in videos:
        prediction = predictor.predict(video, topk=2)
        assert prediction.classes[0] in names and len(prediction.classes) == 2
        assert sum(prediction.probabilities) <= 1.0 + 1e-6


def test_vifi_run_loads_back_its_trained_weights(vifi_run):
    loaded = load_run(vifi_run)
    saved = load_checkpoint(vifi_run).model_state
    state = loaded.model.trainable_state_dict()
    assert set(state) == set(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert loaded.step == 2 and not loaded.model.training


def test_vifi_resumes_where_it_stopped(vifi_run, dataset, tmp_path, caplog):
    # The run as a kill after step 1 leaves it: step 2 never written.
    run_dir = tmp_path / "resumed"
    shutil.copytree(vifi_run, run_dir)
    for path in (run_dir / "checkpoints").glob("step-00000002*"):
        path.unlink()
    with pytest.warns(UserWarning, match="trying an older one"), caplog.at_level(logging.INFO, logger="evl"):
        assert train(method_run(dataset, "vifi"), run_dir, progress=False).step == 2
    assert "at step 1" in caplog.text
    # Same seed, same data, same schedule: the resumed run ends where the uninterrupted one did.
    a, b = load_checkpoint(run_dir).model_state, load_checkpoint(vifi_run).model_state
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_vifi_image_only_tuning_saves_only_the_image_encoder(dataset, tmp_path):
    run_dir = tmp_path / "image"
    assert train(method_run(dataset, "vifi", "method.tune=image", steps=1), run_dir, progress=False).step == 1
    keys = set(load_checkpoint(run_dir).model_state)
    assert keys and all(k.startswith("visual.") for k in keys)


# ------------------------------------------------------------------------------------------------- X-CLIP


def test_xclip_trains_all_but_the_text_encoder(xclip_run, dataset):
    checkpoint = load_checkpoint(xclip_run)
    keys = set(checkpoint.model_state)
    assert not any(k.startswith("text.") for k in keys) and "logit_scale" not in keys
    for part in ("mit.", "prompts_generator.", "prompts_visual_proj", "visual.conv1.weight"):
        assert any(k.startswith(part) for k in keys), part
    assert any(".message_" in k for k in keys)
    # X-CLIP's optimizer groups: the new modules at 10x the CLIP learning rate.
    groups = checkpoint.train_state["optimizer"]["param_groups"]
    scales = {round(g["initial_lr"] / 1e-5, 6) for g in groups}
    assert scales == {1.0, 10.0}
    metrics = _evaluate_run(xclip_run)
    assert metrics["num_videos"] == 8
    assert metrics["top1"] == pytest.approx(_hand_top1(xclip_run / "eval" / "scores.csv", dataset.val_list))

    video = dataset.root / "videos" / "val" / "up" / "0001.mp4"
    prediction = Predictor(load_run(xclip_run)).predict(video, topk=4)
    assert sorted(prediction.classes) == sorted(dataset.classes_file.read_text().split())


def test_xclip_text_embeddings_are_cached_across_batches(xclip_run):
    model = load_run(xclip_run).model
    calls = []
    model.text.register_forward_hook(lambda *_: calls.append(1))
    video = torch.randn(2, 4, 3, 112, 112)
    with torch.no_grad():
        model(video)
        model(video)
    assert len(calls) == 1
    names = ["up", "down"]
    set_classes(model, MethodConfig(name="xclip"), names)
    with torch.no_grad():
        assert model(video).shape == (2, 2)
    assert len(calls) == 2  # a new class list is encoded anew


# ------------------------------------------------------------------------------------------- zero-shot


def test_zeroshot_train_runs_no_step_and_matches_weights_alone(clip_file, dataset, tmp_path, capsys):
    run_dir = tmp_path / "zs"
    args = train_args(dataset, run_dir, "zeroshot", extra=["--backbone", str(clip_file)])
    args.remove("--train-list")
    args.remove(str(dataset.train_list))
    assert main(args) == 0
    summary = _summary(capsys)
    assert summary["step"] == 0 and summary["final_loss"] is None
    assert summary["val"]["num_videos"] == 8
    assert not list_checkpoints(run_dir)

    from_run = _eval(run_dir, tmp_path / "a")
    flags = ["--classes", str(dataset.classes_file), "--val-list", str(dataset.val_list)]
    flags += ["--data-root", str(dataset.root), "--num-frames", "4", "--frame-stride", "2"]
    out_dir = tmp_path / "b"
    from_weights = _eval(clip_file, tmp_path / "b", "--method", "zeroshot", "--out-dir", str(out_dir), *flags)
    assert from_weights == from_run
    a = read_scores(run_dir / "eval" / "scores.csv").scores
    b = read_scores(out_dir / "scores.csv").scores
    np.testing.assert_allclose(a, b, atol=1e-6)

    capsys.readouterr()
    video = str(dataset.root / "videos" / "val" / "left" / "0000.mp4")
    predict = ["predict", str(clip_file), video, "--method", "zeroshot", "--json"]
    assert main([*predict, "--classes", str(dataset.classes_file), "--num-frames", "4"]) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 4


def test_zeroshot_logits_are_scaled_cosines_to_the_bare_class_names(clip_file, dataset):
    names = dataset.classes_file.read_text().split()
    loaded = zeroshot_run(clip_file, names)
    model = loaded.model
    towers = create_clip(clip_file)
    video = torch.randn(2, 4, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        frames = towers.visual(video.flatten(0, 1)).view(2, 4, -1)
        video_emb = F.normalize(frames.mean(dim=1), dim=-1)
        text_emb = F.normalize(towers.text(default_tokenizer()(names)), dim=-1)
        expected = torch.tensor(towers.logit_scale).exp() * video_emb @ text_emb.t()
        torch.testing.assert_close(model(video), expected, rtol=1e-5, atol=1e-5)
    assert templates_for(loaded.run.method) == ("{}",)


def test_zeroshot_refuses_random_weights_and_missing_classes(dataset, clip_file, capsys):
    classes = str(dataset.classes_file)
    assert main(["eval", "random:ViT-T/16@112", "--method", "zeroshot", "--classes", classes]) == 2
    assert "needs trained CLIP weights" in capsys.readouterr().err
    assert main(["eval", str(clip_file), "--method", "zeroshot", "--val-list", str(dataset.val_list)]) == 2
    assert "needs class names; pass --classes" in capsys.readouterr().err  # the CLI names the flag


# -------------------------------------------------------------------------------------- class lists


def test_text_methods_evaluate_any_class_list(vifi_run, dataset, tmp_path):
    # Two of the four classes, re-indexed: a text method needs no retraining for them.
    entries = read_list(dataset.val_list)
    names = dataset.classes_file.read_text().split()
    keep = [3, 1]
    subset = [dataclasses.replace(e, label=keep.index(e.label)) for e in entries if e.label in keep]
    write_list(tmp_path / "sub.txt", subset)
    write_class_names(tmp_path / "sub_classes.txt", [names[i] for i in keep])
    metrics = _eval(
        vifi_run,
        tmp_path,
        "--val-list",
        str(tmp_path / "sub.txt"),
        "--classes",
        str(tmp_path / "sub_classes.txt"),
    )
    assert metrics["num_videos"] == len(subset) == 4
    scores = read_scores(vifi_run / "eval" / "scores.csv")
    assert scores.scores.shape == (4, 2)


def test_evl_refuses_a_class_list_of_another_size(dataset, tmp_path, capsys):
    run_dir = tmp_path / "evl"
    train(method_run(dataset, "evl", "backbone.heads=3", steps=1), run_dir, progress=False)
    write_class_names(tmp_path / "two.txt", ["a", "b"])
    assert main(["eval", str(run_dir), "--classes", str(tmp_path / "two.txt"), "--quiet"]) == 2
    assert "needs a text-matching method" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--base-novel", str(tmp_path), "--quiet"]) == 2
    assert "text-matching method" in capsys.readouterr().err


def test_text_methods_need_class_names(dataset, tmp_path, capsys):
    args = train_args(dataset, tmp_path / "r", "vifi")
    i = args.index("--classes")
    del args[i : i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pass --classes" in err and len(err.strip().splitlines()) == 1


def test_feature_caches_are_for_evl_only(dataset, tmp_path, capsys):
    args = train_args(dataset, tmp_path / "r", "xclip", extra=["--features", str(tmp_path)])
    assert main(args) == 2
    assert "feature caches hold what EVL's decoder reads" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- protocols


def test_base_novel_split_and_evaluation(vifi_run, dataset, tmp_path, capsys):
    split = tmp_path / "split"
    args = ["splits", "base-novel", "--list", str(dataset.train_list), "--classes", str(dataset.classes_file)]
    args += ["--val-list", str(dataset.val_list), "--shots", "2", "--seeds", "1,2", "--out-dir", str(split)]
    assert main(args) == 0
    assert main([*args[:-1], str(tmp_path / "again")]) == 0
    for name in ("fs_base_s1_train.txt", "fs_base_s2_train.txt", "base_val.txt", "novel_val.txt"):
        assert (split / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    base = (split / "base_classes.txt").read_text().split()
    novel = (split / "novel_classes.txt").read_text().split()
    assert len(base) == 2 and len(novel) == 2 and not set(base) & set(novel)
    assert len(read_list(split / "fs_base_s1_train.txt")) == 4  # 2 shots x 2 base classes
    capsys.readouterr()

    out = tmp_path / "bn.json"
    assert main(["eval", str(vifi_run), "--base-novel", str(split), "--output", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["base"]["num_videos"] == 4 and result["novel"]["num_videos"] == 4
    assert result["harmonic_mean"] == pytest.approx(harmonic_mean(result["base_top1"], result["novel_top1"]))
    assert "harmonic mean" in capsys.readouterr().out
    novel_scores = read_scores(vifi_run / "eval" / "novel" / "scores.csv")
    assert novel_scores.scores.shape == (4, 2)


def test_few_shot_splits_are_seeded_and_nested(dataset, tmp_path):
    for out in ("a", "b"):
        args = ["splits", "few-shot", "--list", str(dataset.train_list), "--k", "1,2", "--seed", "3"]
        assert main([*args, "--out-dir", str(tmp_path / out)]) == 0
    one = tmp_path / "a" / "train_few_shot_1.txt"
    two = tmp_path / "a" / "train_few_shot_2.txt"
    assert one.read_bytes() == (tmp_path / "b" / one.name).read_bytes()
    ones, twos = read_list(one), read_list(two)
    assert len(ones) == 4 and len(twos) == 8
    assert {e.path for e in ones} <= {e.path for e in twos}
    assert sorted(e.label for e in twos) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_clip_file_round_trip(clip_file):
    state = load_file(str(clip_file))
    towers = create_clip(clip_file)
    assert torch.equal(towers.visual.conv1.weight, state["visual.conv1.weight"])
    assert torch.equal(towers.text.token_embedding.weight, state["token_embedding.weight"])
    assert towers.logit_scale == pytest.approx(float(state["logit_scale"]))


def test_xclip_from_a_hugging_face_xclip_folder(dataset, tmp_path, capsys):
    from transformers import XCLIPConfig as HFXCLIPConfig
    from transformers import XCLIPModel

    # A tiny XCLIPModel with CLIP's vocabulary (our tokenizer's ids), 3 frames of 40 px.
    torch.manual_seed(0)
    vision = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=3)
    vision |= dict(image_size=40, patch_size=8, num_frames=3, mit_hidden_size=24, mit_intermediate_size=41)
    vision |= dict(mit_num_hidden_layers=1, mit_num_attention_heads=2)
    text = dict(hidden_size=32, intermediate_size=45, num_hidden_layers=2, num_attention_heads=2)
    config = HFXCLIPConfig(
        text_config=text, vision_config=vision, projection_dim=24, prompt_num_attention_heads=3
    )
    folder = tmp_path / "xclip_hf"
    XCLIPModel(config).save_pretrained(folder)

    run_dir = tmp_path / "run"
    run = method_run(dataset, "xclip", f"backbone.name={folder}", "data.num_frames=3", steps=1)
    result = train(run, run_dir, progress=False)
    assert result.step == 1 and result.evaluation.result.num_videos == 8
    saved = json.loads((run_dir / "config.json").read_text())["model"]["xclip"]
    assert saved["vision"]["image_size"] == 40 and saved["num_frames"] == 3
    assert _evaluate_run(run_dir)["num_videos"] == 8

    # The integration transformer has one position per frame: another frame count is refused.
    assert (
        main(train_args(dataset, tmp_path / "r4", "xclip", steps=1, extra=["--backbone", str(folder)])) == 2
    )
    assert "set data.num_frames=3" in capsys.readouterr().err


def test_python_zeroshot_predictor(clip_file, dataset):
    import evl

    names = dataset.classes_file.read_text().split()
    predictor = evl.zeroshot(clip_file, names, num_frames=4, templates=["a {} motion"])
    assert predictor.run.run.method.templates == ("a {} motion",)
    prediction = predictor.predict(dataset.root / "videos" / "val" / "up" / "0000.mp4", topk=4)
    assert sorted(prediction.classes) == sorted(names)
    assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-5)
