"""evl explain (engine/explain.py, engine/explain_plot.py, cli/explain.py): what is explained, the patch
choice, the pictures and tensors written, the text methods' per-frame similarity, and the command."""

from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from evl.cli import main
from evl.engine.explain import (
    SUMMARY_FILE,
    TENSORS_FILE,
    choose_patch,
    explain_video,
    explanation_tensors,
    explanation_views,
    save_explanation,
)
from evl.models.registry import clip_state_dict, create_clip
from evl.synth import write_action_change_video
from factories import TINY_BACKBONE, tiny_dataset, train_flags
from long_videos import tiny_predictor

FPS = 8.0


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("videos") / "left.mp4"
    return write_action_change_video(path, fps=FPS, directions=("left",), seconds=(2.0,), seed=3)


@pytest.fixture(scope="module")
def evl_predictor():
    return tiny_predictor("evl")


@pytest.fixture(scope="module")
def evl_explanation(evl_predictor, video):
    return explain_video(evl_predictor, video)


def test_evl_explains_the_view_it_classifies(evl_predictor, evl_explanation, video):
    e = evl_explanation
    view = explanation_views(evl_predictor).load(video)[:1]  # [1, T, 3, S, S]
    with torch.no_grad():
        probabilities = evl_predictor.model(view).softmax(dim=-1)[0]
    torch.testing.assert_close(e.probabilities, probabilities, atol=1e-5, rtol=0)
    assert e.frames.shape == (4, 112, 112, 3) and e.frames.dtype == torch.uint8
    # The frames are the view de-normalised: normalising them again gives the view back (to rounding).
    config = explanation_views(evl_predictor).transform.config
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (config.mean, config.std))
    again = (e.frames.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert (again - view[0]).abs().max() < 0.5 / 255 / min(std.flatten()) + 1e-4
    assert e.attention.query.shape == (1, 4, 4, 50)  # 4 decoder layers, 4 frames, 1 + 7x7 tokens
    assert e.frame_similarity is None


def test_the_default_patch_is_the_most_attended_with_both_neighbours(evl_explanation):
    e = evl_explanation
    maps = e.attention.query_patches()[0, -1]  # [T, 7, 7], the last layer's
    inner = maps[1:-1]
    t, rest = divmod(int(inner.flatten().argmax()), 49)
    assert (e.patch.layer, e.patch.frame, e.patch.row, e.patch.col) == (3, t + 1, *divmod(rest, 7))


def test_chosen_frame_patch_and_layer(evl_explanation):
    a = evl_explanation.attention
    on_frame = choose_patch(a, layer=0, frame=3)
    assert on_frame.layer == 0 and on_frame.frame == 3
    assert a.query_patches()[0, 0, 3, on_frame.row, on_frame.col] == a.query_patches()[0, 0, 3].max()
    fixed = choose_patch(a, patch=(2, 5))
    assert (fixed.row, fixed.col) == (2, 5)
    assert fixed.frame == 1 + int(a.query_patches()[0, -1, 1:-1, 2, 5].argmax())  # a frame with neighbours
    assert choose_patch(a, frame=0, patch=(6, 6)) == type(fixed)(3, 0, 6, 6)
    with pytest.raises(ValueError, match=r"layer 4 is outside this model's 4 decoder layers"):
        choose_patch(a, layer=4)
    with pytest.raises(ValueError, match=r"patch column 7 is outside this model's 7 patch columns"):
        choose_patch(a, patch=(0, 7))
    with pytest.raises(ValueError, match=r"frame -1 is outside"):
        choose_patch(a, frame=-1)


def test_saved_pictures_and_tensors(evl_explanation, tmp_path):
    written = save_explanation(evl_explanation, tmp_path / "out", dpi=40)
    names = [p.name for p in written]
    assert names == [
        "attention_layer0.png",
        "attention_layer1.png",
        "attention_layer2.png",
        "attention_layer3.png",
        "cross_frame.png",
        SUMMARY_FILE,
        TENSORS_FILE,
    ]
    for png in written[:5]:
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 100
        assert image[..., :3].std() > 0.05  # something was drawn
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["pictures"] == names[:5]
    assert summary["patch"]["frame"] == evl_explanation.patch.frame
    for layer in summary["layers"]:  # each frame's share and the class tokens' share sum to one
        assert sum(layer["frame_mass"]) == pytest.approx(1.0, abs=1e-4)
        assert 0.0 <= layer["prefix_mass"] <= 1.0
    tensors = load_file(tmp_path / "out" / TENSORS_FILE)
    expected = explanation_tensors(evl_explanation)
    assert set(tensors) == {
        "frames",
        "probabilities",
        "query_attention",
        "class_token_attention",
        "cross_frame_attention",
    }
    for name, value in expected.items():
        assert torch.equal(tensors[name], value), name


@pytest.mark.parametrize("method", ["vifi", "vifi_prompt", "zeroshot", "xclip"])
def test_text_methods_explain_each_frames_similarity(method, video, tmp_path):
    predictor = tiny_predictor(method)
    e = explain_video(predictor, video)
    assert e.attention is None and e.patch is None
    assert e.frame_similarity.shape == (4, 4)  # frames x the four motion classes
    assert e.frame_similarity.abs().max() <= 1.0 + 1e-5
    view = explanation_views(predictor).load(video)[:1]
    model = predictor.model
    with torch.no_grad():
        if method == "xclip":
            frames, patches = model.visual(view)
            tokens = model.prompts_visual_ln(patches) @ model.prompts_visual_proj
            text = model.prompt_text(model.class_text_features(model.class_tokens), tokens)[0]
            expected = F.normalize(frames[0], dim=-1) @ F.normalize(text, dim=-1).t()
        else:
            frames = F.normalize(model._encode_frames(view[0]), dim=-1)  # with vifi_prompt's prompts
            expected = frames @ model.encode_text().t()
            # The video's score is the cosine of the frames' mean with each class: the mean of these rows,
            # scaled by the mean embedding's length.
            mean = frames.mean(dim=0)
            logits = model(view)[0] / model.logit_scale.exp()
            torch.testing.assert_close(
                logits, e.frame_similarity.mean(dim=0) / mean.norm(), atol=1e-5, rtol=0
            )
    torch.testing.assert_close(e.frame_similarity, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(e.probabilities.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    written = save_explanation(e, tmp_path / method, dpi=40)
    assert [p.name for p in written] == ["class_similarity.png", SUMMARY_FILE, TENSORS_FILE]
    assert set(load_file(written[-1])) == {"frames", "probabilities", "frame_similarity"}
    with pytest.raises(ValueError, match="layer, frame and patch choose a patch of the attention maps"):
        explain_video(predictor, video, layer=0)


def test_the_python_api(evl_predictor, evl_explanation, video):
    again = evl_predictor.explain(video, frame=2)
    assert again.patch.frame == 2
    assert torch.equal(again.attention.query, evl_explanation.attention.query)


# ------------------------------------------------------------------------------------- command line


def test_explain_command_on_a_trained_run(tmp_path, video, capsys):
    dataset = tiny_dataset(tmp_path / "data", train_per_class=1, val_per_class=1)
    run_dir = tmp_path / "run"
    assert main(train_flags(dataset, run_dir, val=False)) == 0
    out = tmp_path / "explained"
    assert (
        main(["explain", str(run_dir), str(video), "--out", str(out), "--patch", "3,4", "--dpi", "40"]) == 0
    )
    printed = capsys.readouterr().out
    assert "cross-frame patch: layer 3, frame" in printed and "row 3, column 4" in printed
    assert (out / "cross_frame.png").is_file() and (out / "attention_layer3.png").is_file()
    assert json.loads((out / SUMMARY_FILE).read_text())["patch"]["col"] == 4
    with pytest.raises(SystemExit):
        main(["explain", str(run_dir), str(video), "--out", str(out), "--patch", "3"])
    assert "expected ROW,COL (two integers), got '3'" in capsys.readouterr().err
    assert main(["explain", str(run_dir), str(video), "--out", str(out), "--layer", "5"]) == 2
    assert "evl explain: error: layer 5 is outside this model's 4 decoder layers" in capsys.readouterr().err


def test_explain_command_from_clip_weights(tmp_path, video, capsys):
    torch.manual_seed(11)
    clip = tmp_path / "clip.safetensors"
    save_file(clip_state_dict(create_clip(TINY_BACKBONE)), str(clip))
    classes = tmp_path / "classes.txt"
    classes.write_text("left\nup\njuggling\n")
    out = tmp_path / "explained"
    args = ["explain", str(clip), str(video), "--method", "zeroshot", "--classes", str(classes)]
    assert main([*args, "--num-frames", "4", "--out", str(out), "--dpi", "40"]) == 0
    assert "class_similarity.png" in capsys.readouterr().out
    tensors = load_file(out / TENSORS_FILE)
    assert tensors["frame_similarity"].shape == (4, 3)
    assert main([*args, "--out", str(out), "--frame", "1"]) == 2
    assert "zero-shot CLIP has none" in capsys.readouterr().err
