"""Mixup and CutMix of a training micro-batch, and the soft-target cross-entropy that trains on it.

As timm's ``Mixup`` (batch mode) with ``SoftTargetCrossEntropy``, which X-CLIP and ViFi-CLIP train with
(mixup 0.8, cutmix 1.0, switch probability 0.5, label smoothing 0.1):

- per micro-batch, CutMix with probability ``switch_prob`` when both are on, else Mixup (or the one on);
- lambda ~ Beta(alpha, alpha) of the chosen one;
- clip i is mixed with clip B-1-i: the batch with its reverse;
- Mixup: ``x = lam * x + (1 - lam) * x_reversed``;
- CutMix: a box of about (1 - lam) of the frame, the same box on every frame of a clip, is pasted from the
  reversed batch, and lam becomes the share of the frame left outside the box (the box is clipped at the
  border, so it can be smaller than drawn);
- targets: one-hot smoothed (``1 - eps + eps/K`` on the label, ``eps/K`` elsewhere), then
  ``lam * y + (1 - lam) * y_reversed``: each row sums to one.

Determinism: the draws of a micro-batch (switch, lambda, box) come from a generator seeded by the run's seed
and the micro-batch's first stream position, never from a global random state. A micro-batch is thus mixed
the same way however the run was started, stopped or resumed, like the clips it holds (see
:mod:`evl.video.dataset`).

Distributed runs: under torchrun each process mixes its own micro-batch (its clips are stream positions
``r, r + N, ...``), keyed by that micro-batch's first position, so processes draw differently and every run
with the same seed and process count mixes alike. The pairs are within a process's micro-batch, as in the
references (each GPU mixes its own loader batch); a run with another process count or ``batch_split``
pairs other clips, so it is not the same run as a one-process one, as with every per-batch statistic.
A micro-batch of one clip is mixed with itself: nothing changes but the label smoothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from evl.config import TrainConfig

# Mixed into the seed of the mixing draws, so that they are not the draws of the clip at the same position
# (whose generator is seeded by (seed, position), see evl.video.dataset).
MIX_STREAM = 0x6D6978  # "mix"


@dataclass(frozen=True)
class MixDraw:
    """How one micro-batch is mixed: ``lam`` is the weight of each clip's own target; ``box`` the CutMix
    region ``(top, bottom, left, right)`` taken from the reversed batch, or None for Mixup."""

    lam: float
    box: tuple[int, int, int, int] | None = None


def mixing_rng(seed: int, position: int) -> np.random.Generator:
    """The generator of the mixing draws of the micro-batch whose first clip is at stream ``position``."""
    return np.random.default_rng([seed, position, MIX_STREAM])


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox``: a box of sides ``int(side * sqrt(1 - lam))`` centred on a uniform pixel and
    clipped at the border. Returns ``(top, bottom, left, right)``, end-exclusive."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return top, bottom, left, right


def box_lam(box: tuple[int, int, int, int], height: int, width: int) -> float:
    """The share of the frame outside ``box``: the weight of a clip's own target after CutMix."""
    top, bottom, left, right = box
    return 1.0 - (bottom - top) * (right - left) / float(height * width)


def mix_inputs(inputs: torch.Tensor, draw: MixDraw) -> torch.Tensor:
    """Mix a batch [B, ..., H, W] with its reverse as ``draw`` says; a new tensor (``inputs`` is kept)."""
    # NOTE(ref): X-CLIP / ViFi-CLIP pair clips by a torch.randperm from the global random state; we pair each
    # with its mirror in the batch, as timm: nothing to draw, and the batch is already in a random order.
    if draw.box is None:
        return draw.lam * inputs + (1.0 - draw.lam) * inputs.flip(0)
    top, bottom, left, right = draw.box
    mixed = inputs.clone()
    # The straightforward form is ``inputs.flip(0)[..., top:bottom, left:right]``; reversing only the box is
    # the same values without a copy of the whole batch. The box spans every frame (and channel) alike.
    mixed[..., top:bottom, left:right] = inputs[..., top:bottom, left:right].flip(0)
    return mixed


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """[B] class indices -> float32 [B, K]: ``1 - smoothing + smoothing / K`` on the label, ``smoothing / K``
    elsewhere (the targets ``F.cross_entropy(label_smoothing=smoothing)`` trains towards)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    targets = torch.full((len(labels), num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), on)


def mix_targets(labels: torch.Tensor, num_classes: int, lam: float, smoothing: float = 0.0) -> torch.Tensor:
    """timm's ``mixup_target``: smoothed one-hot targets mixed with the reversed batch's. [B] -> [B, K]."""
    targets = smoothed_one_hot(labels, num_classes, smoothing)
    return lam * targets + (1.0 - lam) * targets.flip(0)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """timm's ``SoftTargetCrossEntropy``: ``mean_i sum_k -targets[i, k] * log_softmax(logits)[i, k]``."""
    return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()


class BatchMixing:
    """Mixup / CutMix of training micro-batches, keyed by the run's ``seed`` and each micro-batch's first
    stream position. ``mixup`` and ``cutmix`` are the Beta parameters (0: that one is off)."""

    def __init__(self, mixup: float, cutmix: float, switch_prob: float = 0.5, seed: int = 0) -> None:
        if mixup < 0 or cutmix < 0 or not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"invalid mixing settings: mixup {mixup}, cutmix {cutmix}, switch {switch_prob}")
        if mixup == 0 and cutmix == 0:
            raise ValueError("BatchMixing needs mixup or cutmix > 0 (with both 0, train without it)")
        self.mixup, self.cutmix, self.switch_prob, self.seed = mixup, cutmix, switch_prob, seed

    @classmethod
    def from_config(cls, train: TrainConfig) -> BatchMixing | None:
        """The mixing a run's train section asks for, or None when mixup and cutmix are 0."""
        if train.mixup == 0 and train.cutmix == 0:
            return None
        return cls(train.mixup, train.cutmix, train.mix_switch_prob, train.seed)

    def draw(self, position: int, height: int, width: int) -> MixDraw:
        """The draws for the micro-batch starting at stream ``position``, in timm's order: the switch
        (only when both are on), lambda, then the CutMix box centre (row, column)."""
        rng = mixing_rng(self.seed, position)
        if self.mixup > 0 and self.cutmix > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix > 0
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return MixDraw(lam)
        box = cutmix_box(height, width, lam, rng)
        return MixDraw(box_lam(box, height, width), box)

    def __call__(self, inputs: torch.Tensor, position: int) -> tuple[torch.Tensor, MixDraw]:
        """Mixed clips [B, T, C, H, W] (or any [B, ..., H, W]) and the draw, whose ``lam`` mixes the targets
        (:func:`mix_targets`)."""
        draw = self.draw(position, inputs.shape[-2], inputs.shape[-1])
        return mix_inputs(inputs, draw), draw
