"""Video embeddings: per method, what the model itself computes (EVL's head reads it, the text methods
compare it with their class texts); the embeddings file (rows, video index, paths, windows); list files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from evl.cli import main
from evl.engine.embed import embed_videos, read_embeddings, read_video_paths
from evl.engine.methods import METHODS
from evl.engine.window_pass import plan_video_windows
from evl.models.registry import clip_state_dict, create_clip
from evl.synth import write_action_change_video
from evl.video.decode import probe
from factories import TINY_BACKBONE
from long_videos import reference_clip, tiny_predictor

FPS = 8.0


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three short videos (3 s each) in a folder, sorted as a folder is read: a_left, b_up, c_down_right."""
    root = tmp_path_factory.mktemp("videos")
    moves = {"a_left": ("left", "left"), "b_up": ("up", "up"), "c_down_right": ("down", "right")}
    return [
        write_action_change_video(root / f"{name}.mp4", fps=FPS, directions=d, seconds=(1.5, 1.5), seed=i)
        for i, (name, d) in enumerate(moves.items())
    ]


@pytest.fixture(scope="module")
def predictors():
    return {method: tiny_predictor(method) for method in METHODS}


def test_every_method_says_what_its_embedding_is():
    assert all(spec.embed is not None for spec in METHODS.values())


@pytest.mark.parametrize("method", list(METHODS))
def test_an_embedding_is_what_the_model_classifies_by(predictors, videos, method):
    predictor = predictors[method]
    model, path = predictor.model, videos[1]
    embedding = predictor.embed(path)
    views = predictor.views.load(path)  # [1, T, 3, S, S]: one clip, one crop
    with torch.no_grad():
        if method == "evl":
            # The decoder's final query: the head turns it into the video's logits.
            assert embedding.shape == (192,)  # the encoder's width
            probabilities = model.head(embedding[None]).softmax(dim=-1)[0]
            torch.testing.assert_close(
                probabilities, predictor.probabilities(path).float(), rtol=0, atol=1e-6
            )
        elif method == "xclip":
            outputs = model.forward_outputs(views, model.class_tokens)
            assert embedding.shape == (128,)  # the joint space
            torch.testing.assert_close(embedding, outputs.video_embeds[0], rtol=0, atol=1e-6)
        else:
            # ViFi-CLIP and zero-shot CLIP: unit vectors whose cosines with the class texts are the logits.
            assert embedding.shape == (128,)
            torch.testing.assert_close(embedding, model.encode_video(views)[0], rtol=0, atol=1e-6)
            logits = model.logit_scale.exp() * embedding @ model.encode_text().t()
            torch.testing.assert_close(
                logits.softmax(dim=-1), predictor.probabilities(path).float(), rtol=0, atol=1e-6
            )
        if method != "evl":
            assert embedding.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_one_row_per_video_indexed_by_path(predictors, videos, tmp_path):
    predictor = predictors["evl"]
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video\n")
    paths = [*read_video_paths(videos[0].parent), broken]
    written = embed_videos(predictor, paths, tmp_path / "emb.safetensors", batch_size=2)

    read = read_embeddings(tmp_path / "emb.safetensors")
    assert read.paths == written.paths == [str(v) for v in videos]
    assert [path for path, _ in read.failed] == [str(broken)] and "not a readable video" in read.failed[0][1]
    assert read.embeddings.shape == (3, 192) and read.video.tolist() == [0, 1, 2]
    assert read.start is None and read.metadata["method"] == "evl"
    for row, path in zip(read.embeddings, videos, strict=True):
        torch.testing.assert_close(row, predictor.embed(path), rtol=0, atol=1e-5)  # batched: rounding


@pytest.mark.parametrize("method", ["evl", "zeroshot"])
def test_one_row_per_window(predictors, videos, tmp_path, method):
    predictor = predictors[method]
    long_video = write_action_change_video(tmp_path / "long.mp4", fps=FPS, seconds=(10.0, 10.0))
    paths = [long_video, videos[0]]
    out = tmp_path / "windows.safetensors"
    read = embed_videos(predictor, paths, out, window=2.0, stride=1.0, batch_size=8)

    plans = [plan_video_windows(predictor.views, probe(path), window=2.0, stride=1.0) for path in paths]
    counts = [len(plan) for plan in plans]  # the timeline's windows (test_timeline)
    assert counts == [19, 2]  # 20 s and 3 s: windows start every second while they fit
    assert read.embeddings.shape[0] == sum(counts) and read.paths == [str(p) for p in paths]
    assert read.video.tolist() == [0] * 19 + [1] * 2
    np.testing.assert_allclose(read.start.numpy(), [*range(19), 0, 1])
    np.testing.assert_allclose((read.end - read.start).numpy(), 2.0)
    assert json.loads(read.metadata["window"])["seconds"] == 2.0

    embed = predictor.run.run.method.name
    for k in (0, 9, 18):
        clip = reference_clip(predictor, long_video, plans[0].indices[k])
        with torch.no_grad():
            model = predictor.model
            expected = model.embed(clip[None])[0] if embed == "evl" else model.encode_video(clip[None])[0]
        torch.testing.assert_close(read.embeddings[k], expected, rtol=0, atol=1e-5)


def test_videos_to_embed_from_a_folder_a_labelled_list_or_plain_paths(videos, tmp_path):
    root = videos[0].parent
    assert read_video_paths(root) == videos
    labelled = tmp_path / "val.txt"
    labelled.write_text("".join(f"{v.name} {i}\n" for i, v in enumerate(videos)))
    assert read_video_paths(labelled, data_root=root) == videos
    plain = tmp_path / "paths.txt"
    plain.write_text(f"# my clips\n{videos[2]}\n\n{videos[0]}\n")
    assert read_video_paths(plain) == [videos[2], videos[0]]
    assert read_video_paths(videos[1]) == [videos[1]]


# ------------------------------------------------------------------------------------- command line


def test_embed_command_from_clip_weights(videos, tmp_path, capsys):
    torch.manual_seed(11)
    clip = tmp_path / "clip.safetensors"
    save_file(clip_state_dict(create_clip(TINY_BACKBONE)), str(clip))
    out = tmp_path / "emb.safetensors"
    args = ["embed", str(clip), str(videos[0].parent), "--method", "zeroshot", "--num-frames", "4"]
    assert main([*args, "--output", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 3 and summary["dim"] == 128
    assert read_embeddings(out).paths == [str(v) for v in videos]
    windowed = tmp_path / "windows.safetensors"
    assert main([*args, "--output", str(windowed), "--window", "2", "--stride", "1", "--quiet"]) == 0
    assert read_embeddings(windowed).embeddings.shape == (6, 128)
