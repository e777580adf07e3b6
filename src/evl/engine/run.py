"""A run directory: what a training run writes, and how any later command gets the model back.

```
RUN_DIR/
  config.json            the resolved RunConfig (``run``) and ModelConfig (``model``)
  classes.txt            class names, one per line (index = label)
  backbone.safetensors   only for random-init backbones, which no file elsewhere could restore
  checkpoints/           decoder + head weights (safetensors) and optimiser state, see engine.checkpoint
  metrics.csv            step,split,name,value
  skipped_videos.txt     videos that could not be decoded, with the reason
  tb/                    TensorBoard events
```
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from evl.config import (
    VISION_PRESETS,
    ModelConfig,
    RunConfig,
    model_config_from_dict,
    run_config_from_dict,
    to_dict,
    vision_preset,
)
from evl.engine.checkpoint import atomic_path, atomic_write_text, load_checkpoint
from evl.models.clip_vit import CLIPVisionTransformer
from evl.models.evl import EVL
from evl.models.registry import create_backbone
from evl.video.lists import read_class_names

CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.txt"
BACKBONE_FILE = "backbone.safetensors"


class RunDirError(FileNotFoundError):
    """A folder that is not a usable run directory."""


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_backbone(run: RunConfig, run_dir: Path) -> tuple[CLIPVisionTransformer, str]:
    """The run's backbone; a random-init one is saved into the run so later commands get the same one."""
    saved = run_dir / BACKBONE_FILE
    if saved.is_file():
        name = run.backbone.name.removeprefix("random:")
        heads = run.backbone.heads or (vision_preset(name).heads if name in VISION_PRESETS else None)
        module, _ = create_backbone(saved, heads=heads)
        return module, name
    module, name = create_backbone(run.backbone.name, heads=run.backbone.heads)
    if run.backbone.name.startswith("random:"):
        with atomic_path(saved) as tmp:
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))
    return module, name


def model_config_for(
    run: RunConfig, backbone: CLIPVisionTransformer, num_classes: int, name: str
) -> ModelConfig:
    decoder = dataclasses.replace(run.decoder, num_frames=run.data.num_frames, num_classes=num_classes)
    return ModelConfig(
        backbone=backbone.config,
        decoder=decoder,
        backbone_name=name,
        freeze_backbone=run.backbone.freeze,
        backbone_dtype=run.backbone.dtype,
    )


def write_run_files(
    run_dir: Path, run: RunConfig, model: ModelConfig, classes: list[str], write: bool = True
) -> dict[str, Any]:
    """Write config.json and classes.txt (unless ``write`` is false: processes other than the first of a
    distributed run); returns the config payload (also what checkpoints record)."""
    payload = {"run": to_dict(run), "model": to_dict(model)}
    if not write:
        return payload
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(run_dir / CLASSES_FILE, "".join(f"{c}\n" for c in classes))
    return payload


@dataclass
class LoadedRun:
    run_dir: Path
    run: RunConfig
    model: EVL
    classes: list[str]
    step: int


def read_run_config(run_dir: str | Path) -> tuple[RunConfig, ModelConfig]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no {CONFIG_FILE}); train one with 'evl train'")
    payload: dict[str, Any] = json.loads(path.read_text())
    return run_config_from_dict(payload["run"]), model_config_from_dict(payload["model"])


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> LoadedRun:
    """The model of a run directory at its latest complete checkpoint, in eval mode."""
    run_dir = Path(run_dir)
    run, model_config = read_run_config(run_dir)
    backbone, _ = build_backbone(run, run_dir)
    if backbone.config != model_config.backbone:
        raise RunDirError(
            f"{run_dir}: the backbone {run.backbone.name} differs from the one the run was trained on"
        )
    model = EVL(model_config, backbone)
    checkpoint = load_checkpoint(run_dir)
    model.load_trainable_state_dict(checkpoint.model_state, source=str(checkpoint.path))
    classes = read_class_names(run_dir / CLASSES_FILE)
    return LoadedRun(run_dir, run, model.to(pick_device(device)).eval(), classes, checkpoint.step)
