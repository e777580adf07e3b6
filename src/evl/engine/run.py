"""A run directory: what a training run writes, and how any later command gets the model back.

```
RUN_DIR/
  config.json            the resolved RunConfig (``run``), the method, and what was built (``model``)
  classes.txt            class names, one per line (index = label)
  backbone.safetensors   only for random-init CLIP weights, which no file elsewhere could restore
  checkpoints/           trained weights (safetensors) and optimiser state, see engine.checkpoint:
                         EVL decoder + head; ViFi-CLIP the tuned encoders; X-CLIP all but the text tower;
                         vifi_prompt the prompt vectors (its frozen towers are re-read from the ViFi-CLIP
                         run or CLIP weights named in config.json); zero-shot runs have none
  metrics.csv            step,split,name,value
  skipped_videos.txt     videos that could not be decoded, with the reason
  tb/                    TensorBoard events
```
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evl.config import (
    BackboneSpec,
    DataConfig,
    MethodConfig,
    RunConfig,
    SettingError,
    to_dict,
)
from evl.devices import configure_device, pick_device
from evl.engine.checkpoint import load_checkpoint
from evl.engine.methods import (
    BACKBONE_FILE,
    ZEROSHOT,
    build_model,
    has_trainable_parameters,
    method_spec,
    set_classes,
)
from evl.io import atomic_write_text
from evl.recipes import load_resolved
from evl.video.lists import read_class_names

__all__ = [
    "BACKBONE_FILE",
    "CLASSES_FILE",
    "CONFIG_FILE",
    "LoadedRun",
    "RunDirError",
    "load_run",
    "load_source",
    "pick_device",
    "read_run_config",
    "write_run_files",
    "zeroshot_run",
]

CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.txt"


class RunDirError(FileNotFoundError):
    """A folder that is not a usable run directory."""


def write_run_files(
    run_dir: Path, run: RunConfig, model: dict[str, Any], classes: list[str], write: bool = True
) -> dict[str, Any]:
    """Write config.json and classes.txt (unless ``write`` is false: processes other than the first of a
    distributed run); returns the config payload (also what checkpoints record).

    ``model`` describes the built model (:class:`~evl.engine.methods.BuiltModel` ``payload``).
    """
    payload = {"run": to_dict(run), "method": run.method.name, "model": model}
    if not write:
        return payload
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(run_dir / CLASSES_FILE, "".join(f"{c}\n" for c in classes))
    return payload


@dataclass
class LoadedRun:
    run_dir: Path | None  # None for a zero-shot model built without a run directory
    run: RunConfig
    model: nn.Module
    classes: list[str]
    step: int


def read_run_config(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """The run config and the saved description of its model (``config.json``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no {CONFIG_FILE}); train one with 'evl train'")
    run = load_resolved(path)  # a damaged file is one line naming it (and the JSON line)
    payload: dict[str, Any] = json.loads(path.read_text())
    check_payload = method_spec(run.method.name).check_payload
    if check_payload is not None:
        check_payload(payload["model"])  # a damaged description fails here, by name
    return run, payload["model"]


# Fields model descriptions gained after runs had been saved without them, each with the value that
# reproduces what those runs computed: a saved description that lacks one reads as having that value.
FIELDS_ADDED_SINCE: dict[str, Any] = {"family": "clip", "register_tokens": 0, "pool_head": True}


def _differences(saved: Any, built: Any, where: str = "") -> list[str]:
    """Dotted keys where two JSON values differ."""
    if isinstance(saved, dict) and isinstance(built, dict):
        saved = {k: v for k, v in FIELDS_ADDED_SINCE.items() if k in built} | saved
        keys = sorted(set(saved) | set(built))
        return [d for k in keys for d in _differences(saved.get(k), built.get(k), f"{where}.{k}".lstrip("."))]
    return [] if saved == built else [f"{where or '<root>'}: saved {saved!r}, now {built!r}"]


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> LoadedRun:
    """The model of a run directory at its latest complete checkpoint, in eval mode.

    A zero-shot run has nothing trained and no checkpoint; its model is CLIP as configured.
    """
    run_dir = Path(run_dir)
    run, saved = read_run_config(run_dir)
    classes = read_class_names(run_dir / CLASSES_FILE)
    built = build_model(run, run_dir, classes)
    differences = _differences(saved, json.loads(json.dumps(built.payload)))  # tuples -> lists, as saved
    if differences:
        raise RunDirError(
            f"{run_dir}: the model built from {run.backbone.name} differs from the one the run was trained "
            f"on ({'; '.join(differences[:3])})"
        )
    model, step = built.model, 0
    if has_trainable_parameters(model):
        checkpoint = load_checkpoint(run_dir)
        model.load_trainable_state_dict(checkpoint.model_state, source=str(checkpoint.path))
        step = checkpoint.step
    device = pick_device(device)
    configure_device(device, tf32=run.train.tf32)
    return LoadedRun(run_dir, run, model.to(device).eval(), classes, step)


def zeroshot_run(
    clip: str | Path,
    classes: Sequence[str],
    data: DataConfig | None = None,
    method: MethodConfig | None = None,
    heads: int | None = None,
    device: str | torch.device | None = None,
) -> LoadedRun:
    """Zero-shot CLIP over ``classes`` from CLIP weights alone (no run directory, no training).

    ``data`` sets frames, sampling and views (defaults: 8 dense frames, one view); ``method`` the prompt
    templates and normalisation (its name is forced to ``zeroshot``).
    """
    method = dataclasses.replace(method or MethodConfig(), name=ZEROSHOT.name)
    return _untrained_run(clip, classes, data, method, heads, device)


def _untrained_run(
    clip: str | Path,
    classes: Sequence[str],
    data: DataConfig | None,
    method: MethodConfig,
    heads: int | None,
    device: str | torch.device | None,
) -> LoadedRun:
    """A method with nothing to train, built from CLIP weights alone over ``classes``."""
    if str(clip).startswith("random:"):
        raise ValueError("zero-shot classification needs trained CLIP weights: pass a checkpoint path")
    if method_spec(method.name).trains:
        raise ValueError(f"method {method.name} is trained: {clip} must be a run directory")
    run = RunConfig(
        backbone=BackboneSpec(name=str(clip), heads=heads), data=data or DataConfig(), method=method
    )
    built = build_model(run, None, list(classes))
    return LoadedRun(None, run, built.model.to(pick_device(device)).eval(), list(classes), 0)


def load_source(
    source: str | Path,
    method: str | None = None,
    classes: str | Path | None = None,
    templates: Sequence[str] | None = None,
    data: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> LoadedRun:
    """The model to evaluate or predict with: a run directory's, or one built from CLIP weights.

    ``source`` is a run directory; or, with ``method`` naming a method that trains nothing (zero-shot
    CLIP), CLIP weights, with ``data`` (:class:`DataConfig` fields) setting frames and sampling. A run
    directory wins over ``method``. ``classes`` (a class file, see :func:`read_class_names`) and
    ``templates`` replace the run's class names and prompts: a text method takes any list; a fixed
    classifier takes new names for as many classes, and no templates.
    """
    templates = tuple(templates) if templates else None
    source = Path(source)
    if method is not None and not (source / CONFIG_FILE).is_file():
        if not classes:
            raise SettingError("data.classes", "zero-shot classification from CLIP weights needs class names")
        data_config = DataConfig(**{k: v for k, v in (data or {}).items() if v is not None})
        method_config = MethodConfig(name=method, templates=templates)
        names = read_class_names(classes)
        return _untrained_run(source, names, data_config, method_config, heads=None, device=device)
    loaded = load_run(source, device=device)
    spec = method_spec(loaded.run.method.name)
    if spec.reads_text:
        method_config = loaded.run.method
        if templates is not None:
            method_config = dataclasses.replace(method_config, templates=templates)
            loaded.run = dataclasses.replace(loaded.run, method=method_config)
        if classes or templates is not None:
            loaded.classes = read_class_names(classes) if classes else loaded.classes
            set_classes(loaded.model, method_config, loaded.classes)
    elif classes or templates is not None:
        if templates is not None:
            raise ValueError(
                f"{source}: an {spec.title} run has a trained classifier, not class prompts (templates)"
            )
        names = read_class_names(classes)
        set_classes(loaded.model, loaded.run.method, names)  # same count, new names
        loaded.classes = names
    return loaded
