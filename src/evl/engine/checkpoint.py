"""Crash-safe checkpoints: weights in safetensors, training state in a weights-only torch file.

Layout inside a run directory::

    checkpoints/
        step-00001000.safetensors   trainable weights; metadata: step, config (JSON), sha256 of the
                                    tensors, sha256 of the paired state file
        step-00001000.state.pt      optimizer, scheduler, grad scaler, RNG states, data-loader position
        latest                      basename of the newest complete checkpoint ("step-00001000")

Every file goes to a temporary sibling, is fsynced and renamed into place, so a reader sees the old file
or the new one, never half of one. The state file is written first and the weights second (their
metadata carries the state file's digest, which ties the pair together), and ``latest`` moves last: the
checkpoint that ``latest`` names is always complete. One writer per run directory is assumed.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from evl.io import atomic_path, atomic_write_text

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".state.pt"
FORMAT = "evl.checkpoint.v1"

_NAME_RE = re.compile(r"step-(\d+)")
# The temporary files that evl.io.atomic_path names, for the files checkpoints write.
_TEMP_RE = re.compile(r"\.(step-\d+(\.safetensors|\.state\.pt)|latest)\.[0-9a-f]+-[0-9a-f]+\.tmp")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, incomplete or does not match what the caller expects."""


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``path`` is its ``.safetensors`` file."""

    step: int
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    config: dict[str, Any]
    path: Path


# ----------------------------------------------------------------------------------------------------------
# Digests and names


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of ``tensors`` (in sorted name order), as hex."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # A uint8 view hashes any dtype (bfloat16 and bool included), where numpy could not hold it.
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def file_digest(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_name(step: int) -> str:
    """Basename of the checkpoint saved at ``step``: ``step-00001000``."""
    return f"step-{step:08d}"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints``."""
    return Path(run_dir) / CHECKPOINT_DIR


def _state_path(weights_path: Path) -> Path:
    return weights_path.with_name(weights_path.name.removesuffix(WEIGHTS_SUFFIX) + STATE_SUFFIX)


def _step_of(path: Path, suffix: str) -> int | None:
    if not path.name.endswith(suffix):
        return None
    match = _NAME_RE.fullmatch(path.name.removesuffix(suffix))
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, weights path)`` of every checkpoint whose weights file exists, oldest first.

    Accepts a run directory or its ``checkpoints/`` directory. Nothing is verified here.
    """
    ckpt_dir = _as_checkpoint_dir(Path(run_dir))
    if not ckpt_dir.is_dir():
        return []
    found = [(_step_of(p, WEIGHTS_SUFFIX), p) for p in ckpt_dir.iterdir()]
    return sorted((step, p) for step, p in found if step is not None)


def _as_checkpoint_dir(path: Path) -> Path:
    return path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path


def _latest_target(ckpt_dir: Path) -> Path:
    """The weights file that ``latest`` names; raises :class:`CheckpointError` if it names none."""
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        raise CheckpointError(f"no checkpoint in {ckpt_dir}: {latest} not found")
    name = latest.read_text(encoding="utf-8").strip()
    if not _NAME_RE.fullmatch(name):
        raise CheckpointError(f"{latest}: does not name a checkpoint ({name[:40]!r})")
    return ckpt_dir / f"{name}{WEIGHTS_SUFFIX}"


def resolve_checkpoint(path: str | Path) -> Path:
    """The weights file meant by ``path``: a run directory or ``checkpoints/`` directory (follows
    ``latest``), a ``.safetensors`` or ``.state.pt`` file, or a basename such as ``.../step-00001000``.
    """
    path = Path(path)
    if path.is_dir():
        return _latest_target(_as_checkpoint_dir(path))
    if path.name.endswith(STATE_SUFFIX):
        return path.with_name(path.name.removesuffix(STATE_SUFFIX) + WEIGHTS_SUFFIX)
    if path.name.endswith(WEIGHTS_SUFFIX):
        return path
    if path.with_name(path.name + WEIGHTS_SUFFIX).is_file():
        return path.with_name(path.name + WEIGHTS_SUFFIX)
    raise CheckpointError(f"no checkpoint at {path}")


# ----------------------------------------------------------------------------------------------------------
# Save


# Exact types, not isinstance: numpy scalars subclass float/int, yet a weights-only load refuses them.
_LEAF_TYPES = (str, bytes, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def _check_storable(value: Any, where: str) -> None:
    """Fail at save time, not at resume, on anything a weights-only ``torch.load`` would refuse."""
    if isinstance(value, torch.Tensor) or type(value) in _LEAF_TYPES:
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_storable(item, f"{where}[{i}]")
    elif type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: dict key {key!r} is neither str nor int")
            _check_storable(item, f"{where}[{key!r}]")
    else:
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a weights-only load "
            "refuses; store tensors, numbers, strings, lists and dicts"
        )


def _cpu_tensors(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory (safetensors refuses shared storage, e.g. tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    train_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int | None = 2,
) -> Path:
    """Save the checkpoint of ``step`` under ``run_dir/checkpoints`` and return its ``.safetensors`` path.

    Args:
        model_state: the trainable weights (the frozen backbone is not saved).
        train_state: optimizer / scheduler / scaler state dicts, RNG state, data position (see
            :func:`make_train_state`); only tensors, numbers, strings, lists and dicts.
        config: the resolved run config; must be JSON-serialisable.
        keep_last: how many checkpoints to keep (None keeps all). Pruning only considers steps up to
            ``step``: checkpoints of higher steps (left by a run restarted from an earlier one) are kept.
    """
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    _check_storable(train_state, "train_state")
    config_json = json.dumps(config, sort_keys=True)
    tensors = _cpu_tensors(model_state)

    ckpt_dir = checkpoint_dir(run_dir)
    name = checkpoint_name(step)
    weights_path = ckpt_dir / f"{name}{WEIGHTS_SUFFIX}"
    state_path = _state_path(weights_path)

    with atomic_path(state_path) as tmp:
        torch.save({"format": FORMAT, "step": step, "train_state": train_state}, tmp)
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "config": config_json,
        "sha256": tensor_digest(tensors),
        "state_sha256": file_digest(state_path),
    }
    with atomic_path(weights_path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    atomic_write_text(ckpt_dir / LATEST, f"{name}\n")

    if keep_last is not None:
        _prune(ckpt_dir, step, keep_last)
    return weights_path


def _prune(ckpt_dir: Path, saved_step: int, keep_last: int) -> None:
    """Delete checkpoints beyond the ``keep_last`` newest up to ``saved_step``, and stale temp files.

    ``latest`` names the checkpoint just saved, which is the newest of those considered, so neither it nor
    the newest complete checkpoint can be deleted.
    """
    steps = {
        step
        for p in ckpt_dir.iterdir()
        for step in (_step_of(p, WEIGHTS_SUFFIX), _step_of(p, STATE_SUFFIX))
        if step is not None and step <= saved_step
    }
    keep = set(sorted(steps)[-keep_last:]) | {saved_step}
    for step in steps - keep:
        name = checkpoint_name(step)
        # State file first: a weights file without its state fails verification, never the reverse.
        (ckpt_dir / f"{name}{STATE_SUFFIX}").unlink(missing_ok=True)
        (ckpt_dir / f"{name}{WEIGHTS_SUFFIX}").unlink(missing_ok=True)
    for p in ckpt_dir.iterdir():
        if _TEMP_RE.fullmatch(p.name):  # left by a writer that was killed mid-write
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Load


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: damaged or truncated safetensors file ({e})") from e
    return tensors, metadata


def _read_checkpoint(weights_path: Path, map_location: Any = "cpu") -> Checkpoint:
    """Load one checkpoint and verify every link: checksum, state pair, state digest, step."""
    tensors, metadata = _read_weights(weights_path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{weights_path}: not an evl checkpoint (format {metadata.get('format')!r})")
    try:
        step = int(metadata["step"])
        config = json.loads(metadata["config"])
        tensor_sha, state_sha = metadata["sha256"], metadata["state_sha256"]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{weights_path}: damaged metadata ({e!r})") from e
    if tensor_digest(tensors) != tensor_sha:
        raise CheckpointError(f"{weights_path}: checksum mismatch, the weights are damaged")

    state_path = _state_path(weights_path)
    if not state_path.is_file():
        raise CheckpointError(f"{weights_path}: its training state {state_path.name} is missing")
    if file_digest(state_path) != state_sha:
        raise CheckpointError(
            f"{state_path}: checksum mismatch, damaged or not paired with {weights_path.name}"
        )
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types (RuntimeError, UnpicklingError, EOFError)
        raise CheckpointError(f"{state_path}: unreadable training state ({e})") from e
    if not isinstance(state, dict) or state.get("step") != step:
        raise CheckpointError(f"{state_path}: holds step {state.get('step')!r}, its weights step {step}")

    if str(map_location) != "cpu":
        tensors = {name: t.to(map_location) for name, t in tensors.items()}
    return Checkpoint(step, tensors, state["train_state"], config, weights_path)


def _config_diffs(expected: Any, saved: Any, prefix: str = "") -> list[str]:
    """Dotted keys where ``saved`` differs from ``expected``; keys absent from ``expected`` are ignored."""
    if isinstance(expected, dict) and isinstance(saved, dict):
        diffs = []
        for key, value in expected.items():
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                diffs.append(f"{where} (missing from checkpoint)")
            else:
                diffs.extend(_config_diffs(value, saved[key], where))
        return diffs
    if expected == saved:
        return []
    return [f"{prefix or '<root>'} (checkpoint {saved!r}, expected {expected!r})"]


def load_checkpoint(
    path_or_run_dir: str | Path,
    map_location: Any = "cpu",
    expected_config: dict[str, Any] | None = None,
) -> Checkpoint:
    """Load and verify a checkpoint (a run directory follows ``latest``; see :func:`resolve_checkpoint`).

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, damaged, lacks its pair
    file, or when a key of ``expected_config`` differs from the saved config (keys it omits are not
    compared, so a caller can check only e.g. ``{"model": ...}``).
    """
    ckpt = _read_checkpoint(resolve_checkpoint(path_or_run_dir), map_location)
    if expected_config is not None:
        # JSON round trip so tuples compare equal to the lists they were saved as.
        diffs = _config_diffs(json.loads(json.dumps(expected_config)), ckpt.config)
        if diffs:
            more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
            raise CheckpointError(f"{ckpt.path}: config mismatch at {'; '.join(diffs[:3])}{more}")
    return ckpt


def find_resumable(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``latest`` if it verifies, otherwise the newest one that does.

    ``latest`` comes first because it names the checkpoint this run wrote last (a higher step on disk may
    belong to an abandoned run). Every damaged candidate is reported with a warning naming its file.
    Returns the ``.safetensors`` path, or None when nothing verifies.
    """
    ckpt_dir = _as_checkpoint_dir(Path(run_dir))
    candidates = [p for _, p in reversed(list_checkpoints(ckpt_dir))]
    if (ckpt_dir / LATEST).is_file():
        try:
            target = _latest_target(ckpt_dir)
            candidates = [target] + [p for p in candidates if p != target]
        except CheckpointError as e:
            warnings.warn(str(e), stacklevel=2)
    for path in candidates:
        try:
            _read_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"cannot resume from this checkpoint, trying an older one: {e}", stacklevel=2)
        else:
            return path
    return None
