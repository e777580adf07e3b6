"""Training state that a checkpoint carries besides the weights: optimizer, scheduler, grad scaler, the
data position, and every random number generator (python, numpy, torch CPU/CUDA and any passed in).

Everything is reduced to tensors, numbers, strings, lists and dicts, so that the state file loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from evl.engine.checkpoint import CheckpointError


def _plain(value: Any) -> Any:
    """numpy arrays -> lists, recursively: a weights-only load refuses arrays but takes lists of ints."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _generator_state(generator: np.random.Generator | torch.Generator) -> Any:
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    return _plain(generator.bit_generator.state)


def _set_generator_state(generator: np.random.Generator | torch.Generator, state: Any) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state.cpu())
    else:
        generator.bit_generator.state = state


def capture_rng_state(
    generators: Mapping[str, np.random.Generator | torch.Generator] | None = None,
) -> dict[str, Any]:
    """Snapshot of the global RNGs (python, numpy, torch CPU, torch CUDA if present) and of ``generators``.

    The result holds only tensors, lists, dicts and numbers, so it survives ``torch.load(weights_only=True)``.
    """
    py_version, py_words, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [py_version, list(py_words), py_gauss],
        "numpy": _plain(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generators:
        state["generators"] = {name: _generator_state(g) for name, g in generators.items()}
    return state


def restore_rng_state(
    state: Mapping[str, Any],
    generators: Mapping[str, np.random.Generator | torch.Generator] | None = None,
) -> None:
    """Restore what :func:`capture_rng_state` captured; ``generators`` are updated in place."""
    py_version, py_words, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_words), py_gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda", [])
    if cuda_states and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count != len(cuda_states):
            warnings.warn(
                f"restoring CUDA RNG state saved on {len(cuda_states)} devices onto {count}", stacklevel=2
            )
        for index, device_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(device_state.cpu(), index)
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"no saved state for generator {name!r} (saved: {sorted(saved)})")
        _set_generator_state(generator, saved[name])


def make_train_state(
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    data: dict[str, Any] | None = None,
    generators: Mapping[str, np.random.Generator | torch.Generator] | None = None,
) -> dict[str, Any]:
    """The usual ``train_state`` for :func:`save_checkpoint`: optimizer, scheduler, grad scaler, RNGs and
    the data-loader position (``data``, e.g. ``{"epoch": 3, "index": 1280}``)."""
    state: dict[str, Any] = {"optimizer": optimizer.state_dict(), "rng": capture_rng_state(generators)}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if data is not None:
        state["data"] = data
    return state


def restore_train_state(
    train_state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    generators: Mapping[str, np.random.Generator | torch.Generator] | None = None,
) -> dict[str, Any]:
    """Load what :func:`make_train_state` saved into live objects; returns the data-loader position."""
    optimizer.load_state_dict(train_state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(train_state["scheduler"])
    if scaler is not None and "scaler" in train_state:
        scaler.load_state_dict(train_state["scaler"])
    restore_rng_state(train_state["rng"], generators)
    return dict(train_state.get("data", {}))
