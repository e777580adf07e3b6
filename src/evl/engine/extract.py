"""``evl extract`` as one engine call: one list of a run config -> a feature cache.

The cache format and the extraction loop are :mod:`evl.engine.features`; this module only picks the list
and builds the model whose frozen backbone fills the cache (through the method registry).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from evl.config import RunConfig, SettingError
from evl.devices import pick_device
from evl.engine.features import ExtractResult, extract
from evl.engine.methods import build_feature_model
from evl.engine.train import load_lists

SPLITS = ("train", "val")


def extract_list(
    run: RunConfig,
    split: str,
    out_dir: str | Path,
    batch_size: int = 4,
    blocks: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Cache what the decoder reads from every video of the run's ``split`` list ("train" or "val") in
    ``out_dir`` (resumed when it holds a partial cache of the same list and model).

    ``blocks`` defaults to the blocks the run's decoder reads. A random-init backbone is saved in
    ``out_dir``, so that ``evl train --features`` builds the same one.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    classes, train_entries, val_entries = load_lists(run)
    entries = train_entries if split == "train" else val_entries
    if not entries:
        raise SettingError(f"data.{split}_list", f"no {split} list to extract: set data.{split}_list")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_feature_model(run, out_dir, classes).to(pick_device(device))
    return extract(
        model, run, entries, classes, out_dir, batch_size=batch_size, blocks=blocks, progress=progress
    )
