"""Tests for evl.recipes: shipped recipes, `_base_` merging, `--set` parsing, precedence and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evl.config import BackboneSpec, RunConfig, to_dict
from evl.engine.methods import method_spec
from evl.recipes import (
    RecipeError,
    build_run_config,
    load_recipe,
    load_resolved,
    parse_override,
    save_resolved,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def check_error(info: pytest.ExceptionInfo, *fragments: str) -> None:
    """The error is one line and mentions every fragment."""
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------- shipped recipes


def test_the_paper_recipes_are_shipped():
    names = {path.stem for path in SHIPPED}
    expected = {
        "k400_b16_8f",
        "k400_b16_16f",
        "k400_b16_32f",
        "k400_l14_8f",
        "k400_l14_16f",
        "k400_l14_32f",
        "k400_l14_336_32f",
        "ssv2_b16_8f",
        "ssv2_l14_8f",
        "ucf101_l14_32f",
        "hmdb51_l14_32f",
        "demo_synth",
        "vifi_k400_b16_16f",
        "vifi_k400_zeroshot_b16_32f",
        "vifi_few_shot_b16_32f",
        "vifi_base2novel_b16_32f",
        "xclip_k400_b16_8f",
        "zeroshot_clip_b16_8f",
    }
    assert expected <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_resolves(path, tmp_path):
    config = build_run_config(path)
    assert isinstance(config, RunConfig)
    assert config.decoder.num_frames == config.data.num_frames
    assert load_resolved(save_resolved(config, tmp_path / "config.json")) == config


def test_k400_b16_8f_is_the_paper_default():
    config = build_run_config(CONFIG_DIR / "k400_b16_8f.yaml")
    assert config.backbone.name == "ViT-B/16" and config.backbone.freeze
    decoder = config.decoder
    assert (decoder.num_layers, decoder.mlp_dropout, decoder.head_dropout) == (4, 0.5, 0.5)
    assert decoder.temporal_conv and decoder.temporal_pos_embed and decoder.temporal_cross_attention
    data = config.data
    assert (data.sampling, data.num_frames, data.frame_stride) == ("dense", 8, 16)
    assert (data.num_temporal_views, data.num_spatial_views) == (3, 1)
    assert data.rand_augment == "rand-m7-n4-mstd0.5-inc1"
    assert data.flip and data.train_scale == (0.08, 1.0)
    train = config.train
    assert (train.steps, train.batch_size, train.batch_split) == (50_000, 256, 1)
    assert (train.lr, train.weight_decay, train.warmup_steps, train.min_lr_ratio) == (4e-4, 0.05, 0, 0.0)


@pytest.mark.parametrize(
    ("name", "backbone", "frames", "stride", "views", "batch_split"),
    [
        ("k400_b16_16f", "ViT-B/16", 16, 16, (1, 3), 1),
        ("k400_b16_32f", "ViT-B/16", 32, 8, (1, 3), 1),
        ("k400_l14_8f", "ViT-L/14", 8, 16, (3, 1), 1),
        ("k400_l14_16f", "ViT-L/14", 16, 16, (1, 3), 2),
        ("k400_l14_32f", "ViT-L/14", 32, 8, (1, 3), 4),
        ("k400_l14_336_32f", "ViT-L/14@336", 32, 8, (1, 3), 4),
    ],
)
def test_k400_variants(name, backbone, frames, stride, views, batch_split):
    config = build_run_config(CONFIG_DIR / f"{name}.yaml")
    assert config.backbone.name == backbone
    assert (config.data.num_frames, config.data.frame_stride) == (frames, stride)
    assert (config.data.num_temporal_views, config.data.num_spatial_views) == views
    assert config.train.batch_split == batch_split
    assert (config.decoder.num_layers, config.train.lr, config.train.steps) == (4, 4e-4, 50_000)


@pytest.mark.parametrize(
    ("name", "backbone", "layers"), [("ssv2_b16_8f", "ViT-B/16", 12), ("ssv2_l14_8f", "ViT-L/14", 24)]
)
def test_ssv2_recipes(name, backbone, layers):
    config = build_run_config(CONFIG_DIR / f"{name}.yaml")
    assert (config.backbone.name, config.decoder.num_layers) == (backbone, layers)
    assert (config.data.sampling, config.data.num_frames) == ("segment", 8)
    assert (config.data.num_temporal_views, config.data.num_spatial_views) == (1, 3)
    assert not config.data.flip and config.data.flip_label_map is None
    assert config.train.steps == 30_000


@pytest.mark.parametrize("name", ["ucf101_l14_32f", "hmdb51_l14_32f"])
def test_small_dataset_finetuning_recipes(name):
    config = build_run_config(CONFIG_DIR / f"{name}.yaml")
    assert config.backbone.name == "ViT-L/14"
    assert (config.data.num_frames, config.data.frame_stride) == (32, 2)
    assert (config.data.num_temporal_views, config.data.num_spatial_views) == (2, 3)
    assert (config.train.lr, config.train.weight_decay) == (4e-5, 0.005)


@pytest.mark.parametrize(
    ("name", "frames", "lr", "batch_size", "epochs", "views"),
    [
        ("vifi_k400_b16_16f", 16, 2.2e-5, 512, 30, (4, 3)),
        ("vifi_k400_zeroshot_b16_32f", 32, 8e-6, 256, 10, (1, 1)),
        ("vifi_few_shot_b16_32f", 32, 2e-6, 64, 50, (1, 1)),
        ("vifi_base2novel_b16_32f", 32, 2e-6, 64, 11, (1, 1)),
    ],
)
def test_vifi_recipes(name, frames, lr, batch_size, epochs, views):
    config = build_run_config(CONFIG_DIR / f"{name}.yaml")
    method = config.method
    assert (method.name, method.tune, method.templates) == ("vifi", "both", None)
    assert method.normalization == "auto"
    # ViFi-CLIP fine-tunes both encoders itself: the recipe leaves backbone.freeze alone.
    assert config.backbone == BackboneSpec(name="ViT-B/16")
    data = config.data
    assert (data.sampling, data.num_frames, data.rand_augment) == ("segment", frames, None)
    assert (data.num_temporal_views, data.num_spatial_views) == views
    train = config.train
    assert (train.lr, train.batch_size, train.weight_decay) == (lr, batch_size, 0.001)
    assert train.decay_all and train.betas == (0.9, 0.98)
    assert (train.label_smoothing, train.min_lr_ratio) == (0.1, 0.01)
    assert train.batch_size % train.batch_split == 0
    # 5 of the epochs warm up, whatever the steps per epoch.
    assert abs(train.warmup_steps * epochs - 5 * train.steps) <= epochs


def test_vifi_recipe_step_counts():
    steps = {
        name: build_run_config(CONFIG_DIR / f"{name}.yaml").train.steps
        for name in ("vifi_k400_b16_16f", "vifi_k400_zeroshot_b16_32f", "vifi_few_shot_b16_32f")
    }
    assert abs(steps["vifi_k400_b16_16f"] - 30 * 240_000 / 512) < 100  # ~240k K400 videos
    assert abs(steps["vifi_k400_zeroshot_b16_32f"] - 10 * 240_000 / 256) < 100
    assert steps["vifi_few_shot_b16_32f"] == round(50 * 51 * 16 / 64)  # HMDB-51, 16 shots
    base2novel = build_run_config(CONFIG_DIR / "vifi_base2novel_b16_32f.yaml").train.steps
    assert base2novel == 11 * 200 * 16 // 64  # K400: 200 base classes x 16 shots


def test_xclip_recipe():
    config = build_run_config(CONFIG_DIR / "xclip_k400_b16_8f.yaml")
    method = config.method
    assert method.name == "xclip" and method.freeze_text and method.templates is None
    assert (method.mit_layers, method.prompt_layers, method.prompt_alpha) == (1, 2, 0.1)
    assert config.backbone.name == "ViT-B/16"
    data = config.data
    assert (data.sampling, data.num_frames, data.rand_augment) == ("segment", 8, None)
    assert (data.num_temporal_views, data.num_spatial_views) == (4, 3)
    train = config.train
    assert (train.lr, train.batch_size, train.weight_decay) == (8e-6, 256, 0.001)
    assert not train.decay_all and train.betas == (0.9, 0.98)
    assert (train.label_smoothing, train.min_lr_ratio) == (0.1, 0.01)
    assert abs(train.warmup_steps * 30 - 5 * train.steps) <= 30
    assert abs(train.steps - 30 * 240_000 / 256) < 200


def test_zeroshot_clip_recipe():
    config = build_run_config(CONFIG_DIR / "zeroshot_clip_b16_8f.yaml")
    assert (config.method.name, config.method.templates) == ("zeroshot", None)
    assert method_spec(config.method.name).reads_text
    assert (config.backbone.name, config.data.num_frames) == ("ViT-B/16", 8)
    assert config.data.train_list is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('method.templates=["a photo of a {}."]', ("a photo of a {}.",)),
        ("method.templates=['{}', 'a video of a person {}.']", ("{}", "a video of a person {}.")),
        ("method.templates=null", None),
    ],
)
def test_templates_override_parses_into_a_tuple_of_strings(text, expected):
    section, key, value = parse_override(text)
    assert (section, key, value) == ("method", "templates", expected)
    if expected is not None:
        assert type(value) is tuple and all(type(v) is str for v in value)
    config = build_run_config(CONFIG_DIR / "vifi_k400_b16_16f.yaml", [text])
    assert config.method.templates == expected


def test_templates_in_a_recipe_and_their_errors(tmp_path):
    path = write(tmp_path / "r.yaml", "_base_: x.yaml\nmethod:\n  templates: ['{}', 'a clip of {}.']\n")
    write(tmp_path / "x.yaml", "method: {name: vifi}\n")
    config = build_run_config(path)
    assert (config.method.name, config.method.templates) == ("vifi", ("{}", "a clip of {}."))
    # A template is a list item: a bare string, an unquoted {} (a YAML mapping) or no {} are errors.
    with pytest.raises(RecipeError) as info:
        parse_override("method.templates=a photo of a {}.")
    check_error(info, "expected [str, ...] or null")
    with pytest.raises(RecipeError) as info:
        parse_override("method.templates=[{}]")
    check_error(info, "expected [str, ...] or null")
    with pytest.raises(RecipeError) as info:
        build_run_config(overrides=["method.templates=['a photo']"])
    check_error(info, "--set method.templates", "has no {} for the class name")
    with pytest.raises(RecipeError) as info:
        build_run_config(overrides=["method.templates=[]"])
    check_error(info, "method.templates is empty")


def test_demo_recipe_runs_without_downloads():
    config = build_run_config(CONFIG_DIR / "demo_synth.yaml")
    assert config.backbone.name.startswith("random:")
    assert config.data.rand_augment is None
    assert config.train.steps < 1000 and config.train.batch_size <= 32


# ---------------------------------------------------------------------------------------------- _base_


def test_base_is_deep_merged_and_the_child_wins(tmp_path):
    write(
        tmp_path / "base.yaml",
        "backbone: {name: ViT-L/14}\ntrain:\n  lr: 1.0e-3\n  steps: 100\ndata:\n  train_scale: [0.5, 1.0]\n",
    )
    child = write(tmp_path / "sub" / "child.yaml", "_base_: ../base.yaml\ntrain:\n  lr: 2e-3\n")
    recipe = load_recipe(child)
    assert recipe == {
        "backbone": {"name": "ViT-L/14"},
        "train": {"lr": 2e-3, "steps": 100},
        "data": {"train_scale": (0.5, 1.0)},
    }


def test_a_list_of_bases_merges_in_order(tmp_path):
    write(tmp_path / "a.yaml", "train: {lr: 1.0e-3, steps: 10}\n")
    write(tmp_path / "b.yaml", "train: {lr: 2.0e-3}\n")
    child = write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\ntrain: {seed: 3}\n")
    assert load_recipe(child) == {"train": {"lr": 2e-3, "steps": 10, "seed": 3}}


def test_recipe_values_are_coerced_to_field_types(tmp_path):
    path = write(tmp_path / "r.yaml", "train:\n  lr: 2e-4\n  steps: 5e4\ndata:\n  train_scale: [0, 1]\n")
    recipe = load_recipe(path)
    assert recipe["train"] == {"lr": 2e-4, "steps": 50_000}
    assert type(recipe["train"]["lr"]) is float and type(recipe["train"]["steps"]) is int
    assert recipe["data"]["train_scale"] == (0.0, 1.0)


def test_empty_recipe_and_empty_section_mean_defaults(tmp_path):
    assert build_run_config(write(tmp_path / "empty.yaml", "")) == RunConfig()
    assert build_run_config(write(tmp_path / "blank.yaml", "train:\n")) == RunConfig()


# --------------------------------------------------------------------------------------------- --set


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.lr=2e-4", ("train", "lr", 2e-4)),
        ("train.lr=1E-3", ("train", "lr", 1e-3)),
        ("train.lr=1.5e+2", ("train", "lr", 150.0)),
        ("train.lr=.5", ("train", "lr", 0.5)),
        ("train.lr=1", ("train", "lr", 1.0)),  # an int where a float is expected
        ("train.steps=1000", ("train", "steps", 1000)),
        ("train.steps=1e3", ("train", "steps", 1000)),
        ("data.flip=true", ("data", "flip", True)),
        ("data.flip=false", ("data", "flip", False)),
        ("data.rand_augment=null", ("data", "rand_augment", None)),
        ("data.rand_augment=rand-m9-n2", ("data", "rand_augment", "rand-m9-n2")),
        ("data.train_scale=[0.5,1.0]", ("data", "train_scale", (0.5, 1.0))),
        ("data.train_scale=[0.5, 1]", ("data", "train_scale", (0.5, 1.0))),
        ("decoder.blocks=[8,9,10,11]", ("decoder", "blocks", (8, 9, 10, 11))),
        ("decoder.blocks=null", ("decoder", "blocks", None)),
        ("backbone.heads=16", ("backbone", "heads", 16)),
        ("backbone.name=random:ViT-T/16@112", ("backbone", "name", "random:ViT-T/16@112")),
        ("backbone.name='ViT-L/14'", ("backbone", "name", "ViT-L/14")),
        ("data.data_root=/data/k400 videos", ("data", "data_root", "/data/k400 videos")),
        ("data.data_root=2024", ("data", "data_root", "2024")),  # a string field keeps the text
        ("data.data_root=@archive", ("data", "data_root", "@archive")),
        (" train.lr = 3e-4", ("train", "lr", 3e-4)),
    ],
)
def test_parse_override(text, expected):
    parsed = parse_override(text)
    assert parsed == expected
    assert type(parsed[2]) is type(expected[2])
    if isinstance(expected[2], tuple):
        assert [type(v) for v in parsed[2]] == [type(v) for v in expected[2]]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("trainlr=1", ["--set trainlr=1", "section.key=value"]),
        ("train.lr", ["--set train.lr:", "section.key=value"]),
        ("train.=1", ["section.key=value"]),
        ("train.lr.x=1", ["section.key=value"]),
        ("trian.lr=1", ["--set trian.lr=1", "unknown section 'trian'", "did you mean 'train'"]),
        ("train.lrr=1", ["--set train.lrr=1", "unknown train field 'lrr'", "did you mean 'lr'"]),
        ("train.zzz=1", ["unknown train field 'zzz'", "valid: steps, batch_size"]),
        ("train.steps=abc", ["--set train.steps=abc", "expected int", "'abc'"]),
        ("train.steps=1.5", ["expected int", "1.5"]),
        ("train.steps=true", ["expected int", "True (bool)"]),
        ("train.lr=abc", ["expected float", "'abc'"]),
        ("data.flip=1", ["expected bool", "1 (int)"]),
        ("data.train_scale=[0.5]", ["expected [float, float]"]),
        ("data.train_scale=0.5", ["expected [float, float]"]),
        ("decoder.blocks=[1, a]", ["expected [int, ...] or null"]),
        ("backbone.name=null", ["expected str, got null"]),
        ("train.lr=[", ["--set train.lr=[", "invalid value"]),
        ("decoder.num_frames=16", ["decoder.num_frames cannot be set", "data.num_frames"]),
        ("decoder.num_classes=10", ["decoder.num_classes cannot be set", "class list"]),
    ],
)
def test_bad_overrides(text, fragments):
    with pytest.raises(RecipeError) as info:
        parse_override(text)
    check_error(info, *fragments)


def test_recipe_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_override("train.steps=abc")


# ----------------------------------------------------------------------------------------- precedence


def test_precedence_defaults_recipe_flags_overrides(tmp_path):
    recipe = write(tmp_path / "r.yaml", "train:\n  lr: 1.0e-3\n  steps: 10\n  seed: 1\n")
    assert build_run_config(recipe).train.lr == 1e-3
    flags = {"train.lr": 2e-3, "train.seed": 2, "data.num_frames": None}
    config = build_run_config(recipe, **flags)
    assert (config.train.lr, config.train.seed, config.train.steps) == (2e-3, 2, 10)
    assert config.data.num_frames == 8  # None means "flag not given"
    config = build_run_config(recipe, ["train.lr=3e-3"], **flags)
    assert (config.train.lr, config.train.seed, config.train.steps) == (3e-3, 2, 10)
    assert config.train.batch_size == 256  # untouched fields keep the dataclass default


def test_later_overrides_win():
    assert build_run_config(overrides=["train.seed=1", "train.seed=2"]).train.seed == 2


def test_flags_are_coerced_and_checked():
    config = build_run_config(**{"data.train_scale": [0.5, 1], "train.lr": 1})
    assert config.data.train_scale == (0.5, 1.0) and type(config.train.lr) is float
    with pytest.raises(RecipeError) as info:
        build_run_config(**{"train.steps": "many"})
    check_error(info, "flag train.steps", "expected int")
    with pytest.raises(RecipeError) as info:
        build_run_config(**{"steps": 3})
    check_error(info, "flag steps", "expected a section.key name")


def test_decoder_frames_follow_the_data_section():
    config = build_run_config(overrides=["data.num_frames=16"])
    assert config.decoder.num_frames == 16


def test_dataclass_checks_name_their_sources(tmp_path):
    recipe = write(tmp_path / "r.yaml", "train:\n  batch_size: 10\n")
    with pytest.raises(RecipeError) as info:
        build_run_config(recipe, ["train.batch_split=3"])
    check_error(info, str(recipe), "--set train.batch_split=3", "not divisible")
    with pytest.raises(RecipeError) as info:
        build_run_config(overrides=["data.sampling=sparse"])
    check_error(info, "--set data.sampling=sparse", "'dense' or 'segment'")
    with pytest.raises(RecipeError) as info:
        build_run_config(overrides=["data.num_frames=0"])
    check_error(info, "--set data.num_frames=0", "num_frames must be >= 1")


def test_a_single_string_is_not_a_list_of_overrides():
    with pytest.raises(TypeError):
        build_run_config(overrides="train.lr=1e-3")


# ------------------------------------------------------------------------------------- recipe errors


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("trian:\n  lr: 1\n", ["trian: unknown section 'trian'", "did you mean 'train'"]),
        ("train:\n  lrr: 1\n", ["train.lrr: unknown train field 'lrr'", "did you mean 'lr'"]),
        ("data:\n  num_frame: 8\n", ["data.num_frame", "did you mean 'num_frames'"]),
        ("train:\n  steps: abc\n", ["train.steps: expected int, got 'abc' (str)"]),
        ("data:\n  train_scale: [1, 2, 3]\n", ["data.train_scale: expected [float, float]"]),
        ("train: 3\n", ["train: expected a mapping of TrainConfig fields"]),
        ("- a\n- b\n", ["expected a mapping of sections"]),
        ("decoder:\n  num_frames: 16\n", ["decoder.num_frames cannot be set"]),
        ("_base_: 3\n", ["_base_: expected a path or a list of paths"]),
    ],
)
def test_bad_recipes(tmp_path, text, fragments):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    check_error(info, f"{path}: ", *fragments)


def test_errors_inside_a_base_name_the_base(tmp_path):
    base = write(tmp_path / "base.yaml", "train:\n  lrr: 1\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    check_error(info, f"{base}: train.lrr")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("train:\n  lr: 1\n    steps: 2\n", 3),
        ("data:\n  flip: true\n  train_scale: [0.5, 1.0\nfoo: 1\n", 4),
        ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", 3),  # duplicate keys are not silently dropped
    ],
)
def test_yaml_syntax_errors_carry_the_line(tmp_path, text, line):
    path = write(tmp_path / "broken.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    check_error(info, f"{path}:{line}: invalid YAML")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        build_run_config(tmp_path / "nope.yaml")
    check_error(info, "nope.yaml", "not found")


def test_missing_base_file_names_the_child(tmp_path):
    child = write(tmp_path / "child.yaml", "_base_: gone.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    check_error(info, f"{child}: _base_:", "'gone.yaml' not found")


def test_base_cycles_are_errors(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "a.yaml")
    check_error(info, "_base_: cycle a.yaml -> b.yaml -> a.yaml")
    write(tmp_path / "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "self.yaml")
    check_error(info, "cycle self.yaml -> self.yaml")


def test_a_shared_base_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", "train: {steps: 7}\n")
    write(tmp_path / "left.yaml", "_base_: root.yaml\n")
    write(tmp_path / "right.yaml", "_base_: root.yaml\n")
    top = write(tmp_path / "top.yaml", "_base_: [left.yaml, right.yaml]\n")
    assert load_recipe(top) == {"train": {"steps": 7}}


# ----------------------------------------------------------------------------------------- resolved JSON


def test_resolved_json_round_trip(tmp_path):
    config = build_run_config(
        CONFIG_DIR / "k400_b16_8f.yaml", ["decoder.blocks=[8,9,10,11]", "data.rand_augment=null"]
    )
    path = save_resolved(config, tmp_path / "run" / "config.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(to_dict(config)))
    assert load_resolved(path) == config
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temporary file left behind


def test_load_resolved_reads_a_run_directory_config(tmp_path):
    config = build_run_config(overrides=["train.steps=5"])
    path = write(tmp_path / "config.json", json.dumps({"run": to_dict(config), "model": {}}))
    assert load_resolved(path) == config


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('{\n  "train": {\n    "steps": 5,\n  }\n}\n', [":4: invalid JSON"]),
        ('{"trian": {}}', ["unknown sections"]),
        ('{"train": {"stepz": 1}}', ["unknown fields"]),
        ("[1, 2]", ["expected a JSON object"]),
    ],
)
def test_load_resolved_errors(tmp_path, text, fragments):
    path = write(tmp_path / "config.json", text)
    with pytest.raises(RecipeError) as info:
        load_resolved(path)
    check_error(info, str(path), *fragments)


def test_load_resolved_missing_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_resolved(tmp_path / "config.json")
    check_error(info, "config.json", "not found")
