"""vifi_prompt (ViFi-CLIP's bridge-and-prompt stage) through the engine and the CLI, on generated mp4
files: trained from random CLIP and from a ViFi-CLIP run directory, loaded back exactly, only prompts
checkpointed; its settings, recipes and one-line refusals."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from evl.cli import main
from evl.config import MethodConfig, to_dict
from evl.engine.checkpoint import load_checkpoint
from evl.engine.evaluate import evaluate
from evl.engine.methods import BACKBONE_FILE, build_model, templates_for
from evl.engine.run import load_run
from evl.engine.train import train
from evl.models.prompted_clip import PromptedVideoCLIP
from evl.models.registry import create_clip
from evl.recipes import build_run_config, load_resolved
from evl.tokenizer import default_tokenizer
from evl.video.lists import read_list
from factories import tiny_dataset, tiny_run, train_flags

# The tiny CLIP (ViT-T/16 at 112 px) has 6 image and 4 text blocks: the default depths (12) do not fit.
PROMPTS = (
    "method.prompt_vision_tokens=5",
    "method.prompt_vision_depth=4",
    "method.prompt_text_tokens=3",
    "method.prompt_text_depth=4",
)
SETTINGS = ("train.lr=8e-3", "train.eval_every=2", "train.save_every=2", "data.rand_augment=null")
PROMPT_KEYS = {"vision_prompts.vectors": (4, 5, 192), "text_prompts.vectors": (4, 3, 128)}


def settings(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"), train_per_class=2, val_per_class=1)


@pytest.fixture(scope="module")
def bridge(dataset, tmp_path_factory):
    """A tiny ViFi-CLIP run (both towers tuned two steps from a random CLIP saved in the run)."""
    run_dir = tmp_path_factory.mktemp("bridge") / "vifi"
    run = tiny_run(
        dataset, "method.name=vifi", "train.lr=1e-4", "data.rand_augment=null", steps=2, batch_size=2
    )
    assert train(run, run_dir, progress=False).step == 2
    return run_dir


@pytest.fixture(scope="module")
def prompted_from_clip(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("from_clip") / "run"
    args = train_flags(
        dataset, run_dir, "--method", "vifi_prompt", *settings(*PROMPTS, *SETTINGS), batch_size=2
    )
    assert main(args) == 0
    return run_dir


@pytest.fixture(scope="module")
def prompted_from_bridge(dataset, bridge, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("from_bridge") / "run"
    args = train_flags(
        dataset, run_dir, "--method", "vifi_prompt", *settings(*PROMPTS, *SETTINGS), batch_size=2
    )
    args += ["--backbone", str(bridge)]  # the last --backbone wins
    assert main(args) == 0
    return run_dir


def frames(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 4, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def hand_built(visual, text, logit_scale: float, checkpoint_state, classes) -> PromptedVideoCLIP:
    """The prompted model assembled by hand from frozen towers and the checkpoint's prompt vectors."""
    model = PromptedVideoCLIP(
        visual, text, logit_scale, vision_tokens=5, vision_depth=4, text_tokens=3, text_depth=4
    )
    model.load_trainable_state_dict(checkpoint_state)
    model.set_class_tokens(default_tokenizer()([f"a photo of a {c}." for c in classes]))
    return model.eval()


# ------------------------------------------------------------------------------------------ training


def test_prompted_run_from_random_clip_checkpoints_only_prompts_and_loads_back(prompted_from_clip, capsys):
    checkpoint = load_checkpoint(prompted_from_clip)
    assert checkpoint.step == 2
    assert {k: tuple(v.shape) for k, v in checkpoint.model_state.items()} == PROMPT_KEYS
    config = json.loads((prompted_from_clip / "config.json").read_text())
    assert config["method"] == "vifi_prompt" and config["model"]["bridge"] is None
    # 3 context tokens: initialised from "a photo of a", whose words stay the prompt's text.
    assert config["model"]["prompts"]["template"] == "a photo of a {}."
    assert config["model"]["vision"]["mean"] == [0.485, 0.456, 0.406]  # ViFi-CLIP's ImageNet statistics
    # The random CLIP was saved into the run, and load_run rebuilds exactly the same model from it.
    loaded = load_run(prompted_from_clip)
    towers = create_clip(prompted_from_clip / BACKBONE_FILE)
    expected = hand_built(
        towers.visual, towers.text, towers.logit_scale, checkpoint.model_state, loaded.classes
    )
    with torch.no_grad():
        assert torch.equal(loaded.model(frames()), expected(frames()))
    assert isinstance(loaded.model, PromptedVideoCLIP) and loaded.step == 2


def test_prompted_run_from_a_vifi_run_prompts_its_tuned_towers(prompted_from_bridge, bridge):
    config = json.loads((prompted_from_bridge / "config.json").read_text())
    assert config["model"]["bridge"] == {"run": str(bridge), "step": 2}
    assert config["run"]["backbone"]["name"] == str(bridge)
    assert not (prompted_from_bridge / BACKBONE_FILE).exists()  # the towers are the bridge's, re-read
    checkpoint = load_checkpoint(prompted_from_bridge)
    assert {k: tuple(v.shape) for k, v in checkpoint.model_state.items()} == PROMPT_KEYS
    loaded, vifi = load_run(prompted_from_bridge), load_run(bridge)
    # The frozen towers are the ViFi run's tuned ones, which differ from the random CLIP it started from.
    untuned = create_clip(bridge / BACKBONE_FILE)
    for name, value in vifi.model.state_dict().items():
        if name.startswith(("visual.", "text.")):
            assert torch.equal(loaded.model.state_dict()[name], value), name
    assert not torch.equal(loaded.model.visual.conv1.weight, untuned.visual.conv1.weight)
    assert not torch.equal(loaded.model.text.ln_final.weight, untuned.text.ln_final.weight)
    assert loaded.model.logit_scale.item() == vifi.model.logit_scale.item()
    visual, text, scale = vifi.model.visual, vifi.model.text, vifi.model.logit_scale.item()
    expected = hand_built(visual, text, scale, checkpoint.model_state, loaded.classes)
    with torch.no_grad():
        assert torch.equal(loaded.model(frames()), expected(frames()))


def test_loaded_run_scores_as_the_trained_model_did(dataset, bridge, tmp_path):
    """The validation at the last step runs on the in-memory model; the loaded one scores the same."""
    run = tiny_run(dataset, "method.name=vifi_prompt", f"backbone.name={bridge}", *PROMPTS, *SETTINGS,
                   steps=2, batch_size=2)  # fmt: skip
    result = train(run, tmp_path / "run", progress=False)
    loaded = load_run(tmp_path / "run")
    entries = read_list(run.data.val_list, num_classes=len(loaded.classes), data_root=run.data.data_root)
    evaluation = evaluate(loaded.model, entries, run.data, batch_size=2, progress=False)
    np.testing.assert_allclose(evaluation.scores, result.evaluation.scores, atol=1e-6, rtol=0)
    # The prompts moved and nothing else did: the towers are still the bridge's.
    first = build_model(run, None, loaded.classes, seed=run.train.seed).model
    assert not torch.equal(first.vision_prompts.vectors, loaded.model.vision_prompts.vectors)
    assert torch.equal(first.visual.proj, loaded.model.visual.proj)


def test_eval_takes_new_classes_and_refuses_templates(prompted_from_clip, dataset, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("up\ndown\nleft\nright\n")
    out = tmp_path / "metrics.json"
    args = ["eval", str(prompted_from_clip), "--classes", str(names), "--output", str(out), "--quiet"]
    assert main([*args, "--num-workers", "0"]) == 0
    assert json.loads(out.read_text())["num_videos"] == 4
    assert main([*args, "--template", "a video of {}."]) == 2
    err = capsys.readouterr().err.strip()
    assert "method.templates" in err and "\n" not in err


def test_a_missing_bridge_is_one_line_naming_it(prompted_from_bridge, bridge):
    moved = bridge.with_name("moved")
    shutil.move(bridge, moved)
    try:
        with pytest.raises(FileNotFoundError, match=r"backbone\.name: .* does not exist") as err:
            load_run(prompted_from_bridge)
        assert "\n" not in str(err.value)
    finally:
        shutil.move(moved, bridge)


# ----------------------------------------------------------------------------------------- settings


def test_templates_and_settings():
    assert templates_for(MethodConfig(name="vifi_prompt")) == ("X X X X X X X X X X {}.",)
    assert templates_for(MethodConfig(name="vifi_prompt", prompt_text_tokens=4)) == ("a photo of a {}.",)
    assert templates_for(MethodConfig(name="vifi_prompt", prompt_text_tokens=2, prompt_init=None)) == (
        "X X {}.",
    )
    with pytest.raises(ValueError, match=r"^method\.templates: vifi_prompt learns"):
        templates_for(MethodConfig(name="vifi_prompt", templates=("a video of {}.",)))
    for field, value in [
        ("prompt_vision_tokens", -1),
        ("prompt_text_tokens", -2),
        ("prompt_vision_depth", 0),
        ("prompt_text_depth", 0),
    ]:
        with pytest.raises(ValueError, match=rf"method\.{field} must be at least"):
            MethodConfig(name="vifi_prompt", **{field: value})
    for bad in ("", "  ", "a {} of"):
        with pytest.raises(ValueError, match=r"method\.prompt_init"):
            MethodConfig(prompt_init=bad)
    run = build_run_config(None, ["method.name=vifi_prompt", "method.prompt_init=null"])
    assert run.method.prompt_init is None


def test_run_configs_saved_before_the_prompt_fields_still_load(tmp_path):
    path = tmp_path / "config.json"
    run = build_run_config(None, ["method.name=vifi"])
    saved = json.loads(json.dumps({"run": to_dict(run)}))
    for field in ("prompt_vision_tokens", "prompt_text_tokens", "prompt_vision_depth", "prompt_text_depth",
                  "prompt_init"):  # fmt: skip
        del saved["run"]["method"][field]
    path.write_text(json.dumps(saved))
    assert load_resolved(path) == run


@pytest.mark.parametrize(
    ("name", "tokens", "depth", "lr", "steps"),
    [
        ("vifi_prompt_few_shot_b16_32f", 10, 12, 8e-3, 638),
        ("vifi_prompt_base2novel_b16_32f", 16, 9, 4e-2, 550),
    ],
)
def test_recipes(name, tokens, depth, lr, steps):
    run = build_run_config(name)
    method = run.method
    assert method.name == "vifi_prompt" and method.templates is None
    assert (method.prompt_vision_tokens, method.prompt_text_tokens) == (tokens, tokens)
    assert (method.prompt_vision_depth, method.prompt_text_depth) == (depth, depth)
    assert (run.train.lr, run.train.steps, run.train.batch_size) == (lr, steps, 64)
    assert run.data.num_frames == 32 and run.train.betas == (0.9, 0.98)


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("method.templates=['a video of {}.']",), r"^method\.templates: vifi_prompt"),
        (("method.prompt_vision_depth=7",), r"^method\.prompt_vision_depth=7 is more than the 6 layers"),
        (("method.prompt_text_depth=5",), r"^method\.prompt_text_depth=5 is more than the 4 layers"),
    ],
)
def test_refusals_name_the_field(dataset, tmp_path, overrides, message):
    base = ["method.name=vifi_prompt", "method.prompt_vision_depth=6", "method.prompt_text_depth=4"]
    run = tiny_run(dataset, *base, *overrides, steps=1, batch_size=2)
    with pytest.raises(ValueError, match=message) as err:
        train(run, tmp_path / "run", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_run_of_another_method_is_no_bridge(dataset, prompted_from_clip, tmp_path, capsys):
    args = train_flags(dataset, tmp_path / "run", "--method", "vifi_prompt", *settings(*PROMPTS), steps=1)
    assert main([*args, "--backbone", str(prompted_from_clip)]) == 2
    err = capsys.readouterr().err.strip()
    assert "backbone.name" in err and "ViFi-CLIP bridge and prompt run" in err and "\n" not in err
    assert main([*args, "--backbone", str(tmp_path / "gone")]) == 2
    err = capsys.readouterr().err.strip()
    assert "backbone.name" in err and "does not exist" in err and "\n" not in err


def test_siglip_towers_are_refused(dataset, tmp_path):
    pytest.importorskip("sentencepiece")
    from transformers import SiglipConfig, SiglipModel

    from test_text_towers import SIGLIP_TEXT, VISION, _save, write_siglip_tokenizer

    folder = tmp_path / "siglip"
    torch.manual_seed(0)
    _save(
        SiglipModel(SiglipConfig(text_config=dict(SIGLIP_TEXT, vocab_size=160), vision_config=VISION)), folder
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_siglip_tokenizer(folder)
    run = tiny_run(dataset, "method.name=vifi_prompt", f"backbone.name={folder}", *PROMPTS, steps=1)
    with pytest.raises(
        ValueError, match=r"^backbone\.name: vifi_prompt's prompts enter CLIP's .* siglip"
    ) as err:
        build_model(run, None, ["a", "b"])
    assert "\n" not in str(err.value)
