"""Feature cache: extraction, resumption, compatibility checks, and training from cached features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from evl.cli import main
from evl.engine.cached_data import to_frame_features
from evl.engine.checkpoint import list_checkpoints
from evl.engine.feature_cache import DONE, PENDING, FeatureCache, cache_bytes_per_clip
from evl.engine.run import load_run
from evl.models.registry import create_backbone
from evl.synth import make_dataset
from evl.video.dataset import EvalViews
from evl.video.lists import read_list, resolve_path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return make_dataset(
        root, num_train_per_class=2, num_val_per_class=1, num_frames=10, size=48, progress=False
    )


def common(dataset):
    return [
        "--data-root", str(dataset.root),
        "--train-list", str(dataset.train_list),
        "--val-list", str(dataset.val_list),
        "--classes", str(dataset.classes_file),
        "--backbone", "random:ViT-T/16@112",
        "--num-frames", "4",
        "--frame-stride", "2",
        "--num-workers", "0",
        "--decoder-layers", "2",
    ]  # fmt: skip


def train_args(run_dir, *extra):
    return [
        "train", "--output-dir", str(run_dir), "--steps", "3", "--batch-size", "2", "--lr", "1e-3",
        "--eval-every", "3", "--save-every", "3", "--quiet", "--seed", "3",
        "--set", "data.rand_augment=null", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def caches(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    train_cache, val_cache = root / "train", root / "val"
    assert main(["extract", *common(dataset), "--output", str(train_cache), "--quiet"]) == 0
    # The validation cache must use the same random backbone: it is read from the training cache.
    backbone = train_cache / "backbone.safetensors"
    args = ["extract", *common(dataset), "--split", "val", "--output", str(val_cache), "--quiet"]
    val_cache.mkdir()
    (val_cache / "backbone.safetensors").write_bytes(backbone.read_bytes())
    assert main(args) == 0
    return train_cache, val_cache


def test_cache_layout_and_size(caches, dataset):
    cache = FeatureCache.open(caches[0])
    meta = cache.meta
    assert meta.blocks == (4, 5) and meta.num_frames == 4 and meta.num_videos == 8
    assert (np.asarray(cache.status()) == DONE).all()
    out = np.load(caches[0] / "block5.out.npy", mmap_mode="r")
    attn = np.load(caches[0] / "block5.attn.npy", mmap_mode="r")
    assert out.dtype == np.float16 and out.shape == (8, 4, 50, 192)
    assert attn.shape == (8, 2, 3, 49, 49)
    # Rows of the attention maps are softmax averages: they sum to one (within float16 error).
    np.testing.assert_allclose(attn[0].astype(np.float32).sum(-1), 1.0, atol=2e-3)
    assert cache_bytes_per_clip(meta) == 2 * 2 * (4 * 50 * 192 + 2 * 3 * 49 * 49)
    assert [p for p, _ in cache.entries()] == [e.path for e in read_list(dataset.train_list)]


def test_rows_read_are_the_stored_rows_and_writing_to_them_never_reaches_the_file(caches):
    stored = np.load(caches[0] / "block5.out.npy", mmap_mode="r")[2].copy()
    out, attn = FeatureCache.open(caches[0]).read(2, (5,))[0]
    assert out.dtype == torch.float16 and attn.shape == (2, 3, 49, 49)
    np.testing.assert_array_equal(out.numpy(), stored)
    out.fill_(7)  # a reader's row is its own: the cache on disk keeps its values
    reread, _ = FeatureCache.open(caches[0]).read(2, (5,))[0]
    np.testing.assert_array_equal(reread.numpy(), stored)


def test_cached_features_give_the_logits_of_the_videos(caches, dataset, tmp_path):
    run_dir = tmp_path / "run"
    assert main(train_args(run_dir, *common(dataset), "--features", str(caches[0]))) == 0
    loaded = load_run(run_dir)
    model, cache = loaded.model, FeatureCache.open(caches[0])
    data = loaded.run.data
    entry = read_list(dataset.train_list)[5]
    views = EvalViews.for_encoder(data, model.vision_config)
    clips = views.load(resolve_path(entry, dataset.root))
    with torch.no_grad():
        direct = model(clips[:1])
        rows = [(o[None], a[None]) for o, a in cache.read(5, model.blocks)]
        cached = model.forward_head(to_frame_features(rows, torch.device("cpu")))
    assert direct.abs().max() > 1e-3
    # float16 storage: relative error ~1e-3 of the features
    torch.testing.assert_close(cached, direct, atol=5e-3 * direct.abs().max().item(), rtol=0)


def test_training_from_features_validates_on_cached_features(caches, dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = train_args(
        run_dir, *common(dataset), "--features", str(caches[0]), "--val-features", str(caches[1])
    )
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["val"]["num_videos"] == 4
    # Training never needed the list files: the cache carries entries and class names.
    assert (run_dir / "classes.txt").read_text().splitlines() == FeatureCache.open(caches[0]).meta.classes


def test_feature_training_is_reproducible_and_resumes(caches, dataset, tmp_path):
    def final_weights(run_dir):
        return load_run(run_dir).model.trainable_state_dict()

    args = (*common(dataset), "--features", str(caches[0]), "--save-every", "1")
    assert main(train_args(tmp_path / "a", *args)) == 0
    assert main(train_args(tmp_path / "b", *args)) == 0
    for step, weights in list_checkpoints(tmp_path / "b"):
        if step == 3:  # as if killed before the last step: delete its checkpoint, then resume from step 2
            for path in weights.parent.glob("*000003*"):
                path.unlink()
    assert [step for step, _ in list_checkpoints(tmp_path / "b")] == [2]
    assert main(train_args(tmp_path / "b", *args)) == 0
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_interrupted_extraction_resumes(dataset, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["extract", *common(dataset), "--output", str(out), "--quiet"]) == 0
    capsys.readouterr()
    cache = FeatureCache.open(out, mode="r+")
    before = np.array(np.load(out / "block4.out.npy", mmap_mode="r")[2:4])
    cache.mark([2, 3], PENDING)  # as if killed before these rows were finished
    assert main(["extract", *common(dataset), "--output", str(out), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["extracted_now"] == 2 and report["videos"] == 8
    np.testing.assert_array_equal(np.load(out / "block4.out.npy", mmap_mode="r")[2:4], before)


def test_incomplete_or_foreign_caches_are_refused(caches, dataset, tmp_path, capsys):
    cache = FeatureCache.open(caches[1], mode="r+")
    cache.mark([0], PENDING)
    try:
        code = main(train_args(tmp_path / "r", *common(dataset), "--features", str(caches[1])))
        assert code == 2
        assert "extraction is incomplete" in capsys.readouterr().err
    finally:
        cache.mark([0], DONE)
    # A run whose own backbone differs from the one that made the cache is refused (weights fingerprint).
    other = tmp_path / "x"
    other.mkdir()
    backbone, _ = create_backbone("random:ViT-T/16@112")
    save_file(
        {k: v.contiguous() for k, v in backbone.state_dict().items()}, str(other / "backbone.safetensors")
    )
    assert main(train_args(other, *common(dataset), "--features", str(caches[0]))) == 2
    assert "other backbone weights" in capsys.readouterr().err
    code = main(
        train_args(tmp_path / "y", *common(dataset), "--features", str(caches[0]), "--decoder-layers", "3")
    )
    err = capsys.readouterr().err
    assert code == 2 and "the decoder reads blocks [3, 4, 5]" in err and "Traceback" not in err
    assert main(["train", "--output-dir", str(tmp_path / "z"), "--features", str(tmp_path)]) == 2
    assert "not a feature cache" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_stops_or_skips_and_keeps_the_last_good_checkpoint(
    caches, dataset, tmp_path, policy, capsys
):
    import evl.engine.train as train_module

    run_dir = tmp_path / "run"
    args = train_args(run_dir, *common(dataset), "--features", str(caches[0]), "--save-every", "1")
    assert main([*args, "--steps", "2"]) == 0  # two good steps, checkpointed
    good = load_run(run_dir).model.trainable_state_dict()
    original = train_module.to_frame_features

    def poisoned(rows, device):  # every later batch carries a NaN feature
        features = original(rows, device)
        features[0].out[0, 0, 0, 0] = float("nan")
        return features

    train_module.to_frame_features = poisoned
    try:
        code = main([*args, "--steps", "4", "--set", f"train.on_nonfinite={policy}"])
    finally:
        train_module.to_frame_features = original
    err = capsys.readouterr().err
    if policy == "stop":
        assert code == 2 and "loss became nan at step 3" in err and "Traceback" not in err
        assert [s for s, _ in list_checkpoints(run_dir)][-1] == 2
    else:
        assert code == 0 and "update skipped" in err
    # Either way the weights are the last good ones: a stopped run keeps them, skipped updates keep them.
    after = load_run(run_dir).model.trainable_state_dict()
    for key, value in good.items():
        assert torch.equal(after[key], value), key


@pytest.mark.slow
def test_compiled_feature_training_follows_the_eager_run(caches, dataset, tmp_path, capsys):
    """`--compile` changes how the step runs, not what it computes (minutes of compilation: slow test).
    Dropout off: compiled code draws its masks from another generator. Compared through the losses and
    validation accuracy, not the weights: AdamW turns rounding noise in near-zero gradients (the key bias's is
    exactly zero) into full-size steps of either sign."""
    no_dropout = ("--set", "decoder.mlp_dropout=0", "--set", "decoder.head_dropout=0")
    args = (*common(dataset), "--features", str(caches[0]), *no_dropout)
    summaries = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        capsys.readouterr()
        assert main(train_args(tmp_path / name, *args, *extra)) == 0
        summaries[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert config["run"]["train"]["compile"] is True
    assert summaries["compiled"]["final_loss"] == pytest.approx(summaries["eager"]["final_loss"], rel=1e-4)
    assert summaries["compiled"]["val"] == summaries["eager"]["val"]
