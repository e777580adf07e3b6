"""Count the aten ops a step dispatches: on a GPU each one is a kernel launch of several microseconds, so an
op count that grows with the batch makes a step launch-bound. ``benchmarks/kernel_count.py`` prints it."""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from evl.config import ModelConfig
from evl.models.evl import EVL, FrameFeatures

# Ops that return a view of their input (or metadata) and launch no kernel.
VIEW_OPS = {
    "alias", "as_strided", "detach", "expand", "permute", "select", "slice", "split", "split_with_sizes",
    "squeeze", "t", "transpose", "unbind", "unflatten", "unsqueeze", "view", "_unsafe_view",
    "_reshape_alias", "unfold", "diagonal", "chunk", "flatten", "reshape", "view_as", "expand_as",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def non_view(self) -> collections.Counter[str]:
        return collections.Counter({k: v for k, v in self.counts.items() if k not in VIEW_OPS})


def count_decoder_step(
    config: ModelConfig, batch_size: int, formulation: str = "batched", recompute: bool | None = None
) -> dict:
    """Ops of one decoder + head training step (forward, cross-entropy, backward) on the meta device."""
    device = torch.device("meta")
    with device:
        model = EVL(config)
    model.train()
    model.decoder.formulation = formulation
    model.decoder.checkpoint_memory = recompute
    vision, t = config.backbone, config.decoder.num_frames
    p, length = vision.grid_size**2, vision.grid_size**2 + 1
    features = [
        FrameFeatures(
            torch.empty(batch_size, t, length, vision.width, device=device),
            torch.empty(batch_size, 2, t - 1, p, p, device=device) if t > 1 else None,
        )
        for _ in model.blocks
    ]
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    with OpCounter() as forward:
        loss = F.cross_entropy(model.forward_head(features).float(), labels)
    with OpCounter() as backward:
        loss.backward()
    batched, recomputed = model.decoder.execution(device)
    top = (forward.non_view + backward.non_view).most_common(8)
    return {
        "batch_size": batch_size,
        "formulation": "batched" if batched else "cpu",
        "recompute_memory": recomputed,
        "forward_ops": forward.total,
        "backward_ops": backward.total,
        "non_view_ops": sum(forward.non_view.values()) + sum(backward.non_view.values()),
        "forward_non_view_ops": sum(forward.non_view.values()),
        "backward_non_view_ops": sum(backward.non_view.values()),
        "top_non_view_ops": dict(top),
    }
