"""What ``evl bench`` measures: the model, its sizes, the repetitions and the machine settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from evl.config import ModelConfig, model_preset


@dataclass(frozen=True)
class BenchConfig:
    model: str = "evl-b16"
    num_frames: int = 8
    train_batch_sizes: tuple[int, ...] = (1, 2)
    open_batch_size: int = 1
    infer_batch_size: int = 8  # throughput batch; latency is always batch 1
    cached_batch_size: int = 4  # micro-batch of the cached-feature step (memory is no constraint there)
    # Clips per optimiser step in the cached-feature epoch (the recipes' train.batch_size, reached with
    # train.batch_split micro-batches): the optimiser's own time is shared by this many clips.
    epoch_batch_size: int = 256
    repeats: int = 3  # timed repetitions after one warm-up; the median is reported
    device: str = "auto"
    threads: int | None = None  # CPU threads (default: torch's choice, one per core)
    dataloader: bool = True
    allocator: bool = True  # evl.runtime.tune_cpu_allocator in each measuring process, as the CLI does
    skip: tuple[str, ...] = field(default_factory=tuple)  # names of measurements to leave out

    def model_config(self, freeze: bool = True) -> ModelConfig:
        return dataclasses.replace(
            model_preset(self.model, num_frames=self.num_frames), freeze_backbone=freeze
        )


def resolve_device(name: str) -> torch.device:
    """``BenchConfig.device`` as a torch device; "auto" is the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
