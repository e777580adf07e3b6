"""Run by tests/test_distributed.py in a process of its own: one DDP training step of a tiny model, built with
``wrap_ddp`` for an NCCL-like world of two on the stand-in accelerator, through a recording process group.

Prints one JSON line: the collectives (collective, device, dtype) received while DDP was built, during the
forward and during the backward, and whether the gradients are those of one process with the whole batch.
The stand-in is made the process's accelerator (autograd needs one to run backward on it), which a test
process must not be: hence the separate process.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from evl.engine.distributed import DistEnv, wrap_ddp
from recording_group import RecordingProcessGroup, recording_world
from stand_in_device import use_stand_in


class TinyModel(nn.Module):
    """Frozen layer -> trained layers, and a constant buffer, like the video models (odd sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(3, 5).requires_grad_(False)
        self.trained = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 2))
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trained(self.frozen(x) * self.scale)


def _calls(group: RecordingProcessGroup) -> list[list[str]]:
    calls = [[c.collective, str(c.device), str(c.dtype)] for c in group.calls]
    group.calls.clear()
    return calls


def main() -> dict:
    report: dict = {}
    # The device first: autograd sizes its per-device queues at the process's first backward.
    with use_stand_in(as_accelerator=True) as device, recording_world(device) as group:
        torch.manual_seed(0)
        model = TinyModel()
        inputs = torch.randn(4, 3)
        model(inputs).square().sum().backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)

        env = DistEnv(rank=0, world_size=2, backend="nccl", collective_device=device)
        model = model.to(device)
        ddp = wrap_ddp(model, env)
        report["construction"] = _calls(group)
        loss = ddp(inputs.to(device)).square().sum()
        report["forward"] = _calls(group)
        loss.backward()
        report["backward"] = _calls(group)
        # Both ranks hold the same batch: their average gradient is this batch's gradient.
        report["grads_match"] = all(
            torch.allclose(p.grad.cpu(), expected[n], atol=1e-6)
            for n, p in model.named_parameters()
            if p.requires_grad
        )
        report["grad_devices"] = sorted({str(p.grad.device) for p in model.parameters() if p.requires_grad})
    return report


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
    # Straight out: the autograd thread torch started for the stand-in device does not survive the
    # interpreter's teardown (it aborts), and there is nothing left to clean up.
    sys.stderr.flush()
    os._exit(0)
