"""Parameter groups and the learning-rate schedule."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from evl.engine.optim import (
    CosineSchedule,
    allocate_adamw_state,
    build_optimizer,
    build_scheduler,
    lr_at,
    param_groups,
)


class TinyHead(nn.Module):
    """Names like the decoder's: a query, per-layer position tables, a conv, norms, linears."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(5))
        self.temporal_pos_embed = nn.ParameterList([nn.Parameter(torch.zeros(3, 5)) for _ in range(2)])
        self.conv = nn.Conv1d(5, 5, 3, padding=1, groups=5)
        self.norm = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 7)
        self.new = nn.Linear(7, 3)
        self.frozen = nn.Linear(5, 5).requires_grad_(False)


def _names(groups, decay: bool) -> set[str]:
    return {n for g in groups if (g["weight_decay"] > 0) == decay for n in g["param_names"]}


def test_lr_at_exact_values():
    base, total, warmup = 1e-3, 110, 10
    assert lr_at(0, total, base, warmup) == 0.0
    assert lr_at(5, total, base, warmup) == pytest.approx(0.5e-3)
    assert lr_at(10, total, base, warmup) == pytest.approx(base)  # warmup end: the peak
    assert lr_at(60, total, base, warmup) == pytest.approx(base / 2)  # half-way down the cosine
    assert lr_at(110, total, base, warmup) == pytest.approx(0.0)
    assert lr_at(500, total, base, warmup, min_lr=1e-5) == pytest.approx(1e-5)  # clamped past the end
    assert lr_at(60, total, base, warmup, min_lr=1e-4) == pytest.approx(1e-4 + 0.9e-3 / 2)


def test_lr_at_without_warmup_matches_cosine_annealing():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    for step in range(21):
        assert lr_at(step, 20, 0.4) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        reference.step()
    with pytest.raises(ValueError):
        lr_at(0, 10, 1.0, warmup_steps=11)


def test_param_groups_decay_split():
    groups = param_groups(TinyHead(), weight_decay=0.05)
    assert _names(groups, decay=True) == {"conv.weight", "fc.weight", "new.weight"}
    assert _names(groups, decay=False) == {
        "query",
        "temporal_pos_embed.0",
        "temporal_pos_embed.1",
        "conv.bias",
        "norm.weight",
        "norm.bias",
        "fc.bias",
        "new.bias",
    }
    assert all(g["weight_decay"] in (0.0, 0.05) for g in groups)


def test_param_groups_decay_all_is_the_official_behaviour():
    groups = param_groups(TinyHead(), weight_decay=0.05, decay_all=True)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05
    assert len(groups[0]["params"]) == 11  # every trainable parameter; the frozen Linear is left out


def test_param_groups_honours_no_weight_decay_method():
    class Head(TinyHead):
        def no_weight_decay(self) -> set[str]:
            return {"fc.weight"}

    assert "fc.weight" in _names(param_groups(Head(), 0.05), decay=False)


def test_lr_scale_applied_through_optimizer_and_scheduler():
    model = TinyHead()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, lr_scale={"new": 10.0})
    scaled = [g for g in opt.param_groups if g["lr_scale"] == 10.0]
    assert {n for g in scaled for n in g["param_names"]} == {"new.weight", "new.bias"}
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    for _ in range(6):
        for group in opt.param_groups:
            expected = lr_at(sched.last_epoch, 10, 1e-3 * group["lr_scale"], 2, 1e-4 * group["lr_scale"])
            assert group["lr"] == pytest.approx(expected)
        opt.step()
        sched.step()


def test_scheduler_state_round_trip_resumes_identical_lrs():
    def run(steps: int, resume_from: dict | None = None) -> tuple[list[float], dict]:
        model = TinyHead()
        opt = build_optimizer(model, lr=4e-4, weight_decay=0.05, lr_scale={"new": 10.0})
        sched = build_scheduler(opt, total_steps=12, warmup_steps=3)
        if resume_from is not None:
            opt.load_state_dict(resume_from["optimizer"])
            sched.load_state_dict(resume_from["scheduler"])
        lrs = []
        for _ in range(steps):
            opt.step()
            sched.step()
            lrs.append([g["lr"] for g in opt.param_groups])
        return lrs, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}

    straight, _ = run(10)
    first, state = run(4)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # as the checkpoint loads it
    resumed, _ = run(6, resume_from=state)
    assert first + resumed == straight


def test_cosine_schedule_is_a_multiplier():
    schedule = CosineSchedule(total_steps=4, warmup_steps=0, min_lr_ratio=0.0)
    expected = [(1 + math.cos(math.pi * s / 4)) / 2 for s in range(5)]  # 1, 0.854, 0.5, 0.146, 0
    assert [schedule(s) for s in range(5)] == pytest.approx(expected)


def test_fused_adamw_follows_the_default_implementation():
    """build_optimizer takes torch's fused kernel where it exists; the trajectory is AdamW's to rounding."""
    from evl.engine.optim import fused_adamw_supported

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    fused = build_optimizer(model, lr=1e-2, weight_decay=0.05)
    assert fused.defaults["fused"] is fused_adamw_supported(model.parameters())
    plain = torch.optim.AdamW(param_groups(reference, 0.05), lr=1e-2, weight_decay=0.05, foreach=False)
    data = torch.randn(16, 6)
    for _ in range(5):
        for net, optimizer in ((model, fused), (reference, plain)):
            optimizer.zero_grad()
            net(data).square().mean().backward()
            optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(model[0].weight, initial[0].weight, atol=1e-3)  # the steps did move them


def test_fused_adamw_needs_floating_parameters_on_a_supported_device():
    from evl.engine.optim import fused_adamw_supported

    assert not fused_adamw_supported([])
    assert not fused_adamw_supported([torch.zeros(3, dtype=torch.long)])
    assert not fused_adamw_supported([torch.zeros(3, device="meta")])


@pytest.mark.parametrize("decay_all", [False, True])
def test_allocated_adamw_state_leaves_the_trajectory_exactly_as_a_fresh_optimiser(decay_all):
    torch.manual_seed(0)
    model = TinyHead()
    twin = copy.deepcopy(model)
    fresh = build_optimizer(model, lr=1e-2, weight_decay=0.05, decay_all=decay_all)
    early = build_optimizer(twin, lr=1e-2, weight_decay=0.05, decay_all=decay_all)
    schedules = [build_scheduler(o, total_steps=10, warmup_steps=2) for o in (fresh, early)]
    allocate_adamw_state(early)
    trainable = [p for p in twin.parameters() if p.requires_grad]
    assert len(early.state) == len(trainable) and all(p.grad is None for p in trainable)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    assert [g["lr"] for g in early.param_groups] == [g["lr"] for g in fresh.param_groups]
    data = torch.randn(4, 3, 5)
    for _ in range(3):
        for net, optimizer in ((model, fresh), (twin, early)):
            optimizer.zero_grad(set_to_none=True)
            x = net.conv(data.transpose(1, 2)).transpose(1, 2) + net.query
            x = x + net.temporal_pos_embed[0] + 2 * net.temporal_pos_embed[1]
            net.new(net.fc(net.norm(x))).square().mean().backward()
            optimizer.step()
        for schedule in schedules:
            schedule.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(trainable, [p for p in model.parameters() if p.requires_grad], strict=True):
        assert torch.equal(early.state[p]["exp_avg"], fresh.state[q]["exp_avg"])
        assert float(early.state[p]["step"]) == float(fresh.state[q]["step"]) == 3
    allocate_adamw_state(early)  # an optimiser with state is left alone
    assert float(next(iter(early.state.values()))["step"]) == 3
