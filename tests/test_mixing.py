"""Mixup / CutMix of training micro-batches and the soft-target loss: targets, boxes, determinism by stream
position, the step without mixing unchanged, the recipes and flags, and resumption with mixing on."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evl.config import SettingError, TrainConfig
from evl.engine.step import TrainStep
from evl.recipes import RecipeError, build_run_config
from evl.video.dataset import collate_train
from evl.video.mixing import (
    BatchMixing,
    MixDraw,
    box_lam,
    mix_inputs,
    mix_targets,
    smoothed_one_hot,
    soft_target_cross_entropy,
)
from factories import tiny_dataset, tiny_run

# ------------------------------------------------------------------------------------------ targets


def test_mixed_targets_sum_to_one_and_equal_the_hand_formula():
    labels = torch.tensor([0, 2, 1, 2, 4])
    num_classes, lam, eps = 5, 0.3, 0.1
    targets = mix_targets(labels, num_classes, lam, eps)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(5))
    off, on = eps / num_classes, 1 - eps + eps / num_classes
    for i in range(5):
        partner = 4 - i  # the batch is mixed with its reverse
        for k in range(num_classes):
            own = on if labels[i] == k else off
            other = on if labels[partner] == k else off
            assert targets[i, k].item() == pytest.approx(lam * own + (1 - lam) * other, abs=1e-7)


def test_smoothed_one_hot_is_what_label_smoothing_trains_towards():
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 3, 0])
    soft = soft_target_cross_entropy(logits, smoothed_one_hot(labels, 4, 0.1))
    torch.testing.assert_close(soft, F.cross_entropy(logits, labels, label_smoothing=0.1))
    # lam = 1: no mixing, only smoothing
    torch.testing.assert_close(mix_targets(labels, 4, 1.0, 0.1), smoothed_one_hot(labels, 4, 0.1))


# ------------------------------------------------------------------------------------------ inputs


def _clips(batch: int = 4, frames: int = 3, size: tuple[int, int] = (12, 17)) -> torch.Tensor:
    """[B, T, 3, H, W] where clip b holds the value b everywhere: the source of every pixel can be read."""
    return torch.arange(float(batch)).view(batch, 1, 1, 1, 1).expand(batch, frames, 3, *size).clone()


def test_cutmix_box_area_matches_lambda_on_every_frame():
    mixing = BatchMixing(mixup=0.0, cutmix=1.0)
    clips = _clips()
    height, width = clips.shape[-2:]
    seen_clipped = False
    for position in range(200):
        mixed, draw = mixing(clips, position)
        assert draw.box is not None
        top, bottom, left, right = draw.box
        assert 0 <= top <= bottom <= height and 0 <= left <= right <= width
        assert draw.lam == pytest.approx(1 - (bottom - top) * (right - left) / (height * width))
        assert draw.lam == box_lam(draw.box, height, width)
        for b in range(len(clips)):
            from_partner = (mixed[b] == len(clips) - 1 - b).float().mean(dim=(1, 2, 3))  # per frame
            if b != len(clips) - 1 - b:
                torch.testing.assert_close(from_partner, torch.full((3,), 1 - draw.lam))
        seen_clipped |= top == 0 or left == 0 or bottom == height or right == width
    assert seen_clipped  # boxes clipped at the border were drawn, and their lam corrected


def test_mixup_is_the_convex_combination_with_the_reversed_batch():
    clips = torch.randn(4, 2, 3, 5, 6)
    mixed, draw = BatchMixing(mixup=0.8, cutmix=0.0)(clips, 11)
    assert draw.box is None and 0 < draw.lam < 1
    torch.testing.assert_close(mixed, draw.lam * clips + (1 - draw.lam) * clips.flip(0))
    assert torch.equal(mix_inputs(clips, MixDraw(1.0)), clips)


def test_switch_probability_chooses_cutmix():
    def cutmix_share(switch_prob: float) -> float:
        mixing = BatchMixing(mixup=0.8, cutmix=1.0, switch_prob=switch_prob)
        return sum(mixing.draw(p, 16, 16).box is not None for p in range(400)) / 400

    assert cutmix_share(0.0) == 0.0 and cutmix_share(1.0) == 1.0
    assert 0.4 < cutmix_share(0.5) < 0.6


def test_mixup_lambda_follows_its_beta_distribution():
    lams = torch.tensor([BatchMixing(mixup=0.8, cutmix=0.0).draw(p, 8, 8).lam for p in range(2000)])
    # Beta(0.8, 0.8): mean 1/2, variance 1 / (4 (2 * 0.8 + 1)) = 0.096
    assert abs(lams.mean().item() - 0.5) < 0.03 and abs(lams.var().item() - 0.096) < 0.01


def test_same_seed_and_position_same_batch_else_another():
    clips = torch.randn(4, 2, 3, 16, 16)
    mixing = BatchMixing(mixup=0.8, cutmix=1.0, seed=3)
    a, draw_a = mixing(clips, 40)
    b, draw_b = BatchMixing(mixup=0.8, cutmix=1.0, seed=3)(clips.clone(), 40)
    assert draw_a == draw_b and torch.equal(a, b)
    assert mixing.draw(41, 16, 16) != draw_a  # the next micro-batch (or another process's) draws anew
    assert BatchMixing(mixup=0.8, cutmix=1.0, seed=4).draw(40, 16, 16) != draw_a
    assert torch.equal(clips, clips.clone())  # the input batch is left as it was
    _, again = mixing(clips, 40)
    assert again == draw_a


def test_collated_batches_carry_their_stream_positions():
    items = [{"video": torch.zeros(2, 3, 4, 4), "label": 1, "position": p, "skipped": []} for p in (8, 9)]
    assert collate_train(items)["position"].tolist() == [8, 9]


# ------------------------------------------------------------------------------------------ the step


def _model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 4 * 5, 3))


def test_step_without_mixing_has_todays_loss_exactly():
    assert BatchMixing.from_config(TrainConfig()) is None
    assert BatchMixing.from_config(TrainConfig(label_smoothing=0.1, mix_switch_prob=0.9)) is None
    model = _model()
    x, y = torch.randn(6, 2, 3, 4, 5), torch.randint(0, 3, (6,))
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), label_smoothing=0.1)
    loss = step.run([(x, y)])
    assert torch.equal(loss, F.cross_entropy(model(x), y, label_smoothing=0.1).detach())
    assert torch.equal(step.run([(x, y, 123)]), loss)  # a position changes nothing without mixing


def test_step_with_mixing_trains_on_the_mixed_batch_and_soft_targets():
    model = _model()
    x, y = torch.randn(6, 2, 3, 4, 5), torch.randint(0, 3, (6,))
    mixing = BatchMixing(mixup=0.8, cutmix=1.0, seed=1)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), label_smoothing=0.1, mixing=mixing)
    for position in (0, 6, 12, 18):
        loss = step.run([(x, y, position)])
        mixed, draw = mixing(x, position)
        expected = soft_target_cross_entropy(model(mixed), mix_targets(y, 3, draw.lam, 0.1))
        torch.testing.assert_close(loss, expected.detach())
    with pytest.raises(ValueError, match="stream position"):
        step.run([(x, y)])


# ------------------------------------------------------------------------------------------ config


def test_mixing_settings_are_checked():
    with pytest.raises(ValueError, match=r"train\.mixup"):
        TrainConfig(mixup=-0.1)
    with pytest.raises(ValueError, match="mix_switch_prob"):
        TrainConfig(mix_switch_prob=1.5)
    with pytest.raises(RecipeError, match="expected float"):
        build_run_config(None, ["train.cutmix=yes"])


def test_flags_and_overrides_reach_the_run_config():
    run = build_run_config(
        None,
        ["data.grayscale=0.2"],
        **{
            "train.mixup": 0.8,
            "train.cutmix": 1.0,
            "train.mix_switch_prob": 0.25,
            "data.multi_scale_crop": [1, 0.875],
            "data.color_jitter": 0.8,
        },
    )
    assert (run.train.mixup, run.train.cutmix, run.train.mix_switch_prob) == (0.8, 1.0, 0.25)
    assert run.data.multi_scale_crop == (1.0, 0.875)
    assert (run.data.color_jitter, run.data.grayscale) == (0.8, 0.2)


def test_the_cli_takes_the_augmentation_flags():
    from evl.cli.app import build_parser
    from evl.cli.flags import TRAIN_FLAGS, field_dest

    args = build_parser().parse_args(
        ["train", "--output-dir", "x", "--mixup", "0.8", "--cutmix", "1", "--multi-scale-crop", "1,.875,.75"]
    )
    flags = {field: getattr(args, field_dest(field)) for _, field, _, _ in TRAIN_FLAGS}
    run = build_run_config(None, **flags)
    assert (run.train.mixup, run.train.cutmix) == (0.8, 1.0)
    assert run.data.multi_scale_crop == (1.0, 0.875, 0.75)


@pytest.mark.parametrize(
    "name", ["xclip_k400_b16_8f", "vifi_k400_b16_16f", "vifi_few_shot_b16_32f", "vifi_base2novel_b16_32f"]
)
def test_xclip_and_vifi_recipes_train_with_their_augmentation(name):
    run = build_run_config(name)
    assert (run.train.mixup, run.train.cutmix, run.train.mix_switch_prob) == (0.8, 1.0, 0.5)
    assert run.train.label_smoothing == 0.1
    data = run.data
    assert data.multi_scale_crop == (1.0, 0.875, 0.75, 0.66) and data.rand_augment is None and data.flip
    assert (data.color_jitter, data.grayscale) == (0.8, 0.2)
    assert data.color_jitter_strength == (0.4, 0.4, 0.2, 0.1)


def test_evl_recipes_keep_their_pipeline():
    run = build_run_config("k400_b16_8f")
    assert (run.train.mixup, run.train.cutmix) == (0.0, 0.0)
    assert run.data.multi_scale_crop is None and (run.data.color_jitter, run.data.grayscale) == (0.0, 0.0)


def test_mixing_refuses_a_feature_cache(tmp_path):
    from evl.engine.train import train

    run = build_run_config(None, ["data.features=no-cache-here", "train.cutmix=1.0"])
    with pytest.raises(SettingError, match="feature cache") as info:
        train(run, tmp_path / "run", device="cpu", progress=False)
    assert info.value.field == "train.mixup" and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ resumption


def test_a_resumed_run_equals_an_uninterrupted_one_with_mixing_on(tmp_path, monkeypatch, caplog):
    from evl.engine.checkpoint import checkpoint_name, load_checkpoint
    from evl.engine.train import train

    mixed_at: list[int] = []  # the first stream position of every micro-batch mixed
    real_call = BatchMixing.__call__

    def recording_call(self, inputs, position):
        mixed_at.append(position)
        return real_call(self, inputs, position)

    monkeypatch.setattr(BatchMixing, "__call__", recording_call)

    dataset = tiny_dataset(tmp_path / "data", train_per_class=1)
    augment = [
        "train.mixup=0.8",
        "train.cutmix=1.0",
        "data.multi_scale_crop=[1.0,0.875,0.75,0.66]",
        "data.color_jitter=0.8",
        "data.grayscale=0.2",
    ]
    schedule = [
        "decoder.num_layers=1",
        "train.lr=1e-2",
        "train.seed=3",
        "train.save_every=1",
        "train.keep_last=5",
    ]
    run = tiny_run(dataset, *augment, *schedule, steps=3, batch_size=2, val=False)
    whole = train(run, tmp_path / "whole", device="cpu", progress=False)
    assert mixed_at == [0, 2, 4]  # 3 steps of 2 clips
    # A run stopped after step 1: the uninterrupted run's directory with only the checkpoint of step 1.
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "whole", stopped)
    for path in (stopped / "checkpoints").glob("step-*"):
        if not path.name.startswith(f"{checkpoint_name(1)}."):
            path.unlink()
    (stopped / "checkpoints" / "latest").write_text(f"{checkpoint_name(1)}\n")
    with caplog.at_level(logging.INFO, logger="evl.engine.train"):
        resumed = train(run, stopped, device="cpu", progress=False)
    assert "resumed from" in caplog.text and mixed_at[3:] == [2, 4]
    assert resumed.step == whole.step == 3 and resumed.final_loss == whole.final_loss
    reference, state = load_checkpoint(tmp_path / "whole").model_state, load_checkpoint(stopped).model_state
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
