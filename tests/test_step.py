"""The training step shared by `evl train` and `evl bench`: accumulation, loss scaling, skipped updates."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evl.devices import DeviceOutOfMemory
from evl.engine.step import TrainStep


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3))


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 7), torch.randint(0, 3, (n,))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_micro_batches_accumulate_to_the_gradient_of_the_whole_batch():
    whole, split = _model(), None
    split = copy.deepcopy(whole)
    x, y = _batch(6)
    one = TrainStep(whole, torch.optim.SGD(whole.parameters(), lr=0.1), label_smoothing=0.1)
    two = TrainStep(split, torch.optim.SGD(split.parameters(), lr=0.1), label_smoothing=0.1, batch_split=2)
    loss_one = one.run([(x, y)])
    loss_two = two.run([(x[:3], y[:3]), (x[3:], y[3:])])
    expected = F.cross_entropy(whole(x), y, label_smoothing=0.1)
    torch.testing.assert_close(loss_one, expected.detach())
    torch.testing.assert_close(loss_two, expected.detach())
    for a, b in zip(_grads(whole), _grads(split), strict=True):
        torch.testing.assert_close(a, b)


def test_a_step_starts_from_zero_gradients_and_checks_its_micro_batch_count():
    model = _model()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _batch()
    step.run([(x, y)])
    first = _grads(model)
    step.run([(x, y)])  # the previous step's gradients are not added to
    for a, b in zip(first, _grads(model), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="2 micro-batches was given 1"):
        TrainStep(model, step.optimizer, batch_split=2).run([(x, y)])


def test_loss_scaling_leaves_the_update_unchanged():
    plain = _model()
    scaled = copy.deepcopy(plain)
    x, y = _batch()
    # SGD's update is proportional to the gradient: a scale left in the gradients would show.
    unscaled_step = TrainStep(plain, torch.optim.SGD(plain.parameters(), lr=0.5))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled_step = TrainStep(scaled, torch.optim.SGD(scaled.parameters(), lr=0.5), scaler=scaler)
    for step in (unscaled_step, scaled_step):
        step.run([(x, y)])
        step.apply()
    assert not unscaled_step.scaler.is_enabled() and scaled_step.scaler.is_enabled()
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_float16_compute_scales_the_loss_and_updates_as_float32_does():
    reference = _model()
    half = copy.deepcopy(reference)
    x, y = _batch()
    float32_step = TrainStep(reference, torch.optim.SGD(reference.parameters(), lr=0.5))
    float16_step = TrainStep(half, torch.optim.SGD(half.parameters(), lr=0.5), compute_dtype=torch.float16)
    assert float16_step.scaler.is_enabled()  # chosen from the compute dtype
    for step in (float32_step, float16_step):
        step.run([(x, y)])
        step.apply()
    for a, b in zip(reference.parameters(), half.parameters(), strict=True):
        assert b.dtype == torch.float32  # autocast computes in float16; the weights stay float32
        torch.testing.assert_close(a, b, rtol=1e-2, atol=2e-3)


def test_a_skipped_step_leaves_the_weights_and_the_optimiser_untouched():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    step = TrainStep(model, optimizer)
    x, y = _batch()
    x[0, 0] = float("nan")
    loss = step.run([(x, y)])
    assert not torch.isfinite(loss)
    step.skip()
    assert all(p.grad is None for p in model.parameters())
    assert not optimizer.state  # no moment estimates made from the bad step
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_the_scaler_skips_an_update_whose_gradients_overflowed():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.5), scaler=scaler)
    x, y = _batch()
    step.run([(x, y)])
    model[0].weight.grad[0, 0] = float("inf")
    step.apply()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert scaler.get_scale() < 2.0**12  # lowered for the next step


class _RecordingWrapper(nn.Module):
    """Stands in for DDP: records which forwards ran under ``no_sync``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.synced, self._inside = module, [], False

    @contextlib.contextmanager
    def no_sync(self):
        self._inside = True
        try:
            yield
        finally:
            self._inside = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.synced.append(not self._inside)
        return self.module(x)


def test_gradients_are_exchanged_on_the_last_micro_batch_only():
    model = _model()
    wrapper = _RecordingWrapper(model)
    step = TrainStep(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        step_model=wrapper,
        batch_split=3,
        distributed=True,
    )
    x, y = _batch(6)
    step.run([(x[i : i + 2], y[i : i + 2]) for i in (0, 2, 4)])
    assert wrapper.synced == [False, False, True]


def test_out_of_memory_names_the_batch_and_its_split():
    model = _model()

    def out_of_memory(x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    step = TrainStep(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        step_model=out_of_memory,
        batch_split=2,
        batch_size=8,
    )
    x, y = _batch(4)
    with pytest.raises(DeviceOutOfMemory) as caught:
        step.run([(x, y), (x, y)])
    assert (caught.value.batch_size, caught.value.micro_batch, caught.value.batch_split) == (8, 4, 2)
