"""Reading a checkpoint file or folder into one flat ``{name: tensor}`` dict, whatever wrote it.

The format is detected from the file itself (never from its name alone): safetensors, tensor-only pickles
(``torch.save``), OpenAI's TorchScript archives, and the folders Hugging Face ``save_pretrained`` and the
open_clip hub write. Pickles are opened with ``torch.load(weights_only=True)``: a file that would need to
run code is refused. Nothing here knows which model the tensors belong to.
"""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors

Tensors = dict[str, torch.Tensor]


class WeightFormatError(ValueError):
    """A checkpoint that cannot be read, or does not hold what the caller asked for."""


_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    # A TorchScript archive carries its compiled code; a torch.save zip only data.pkl and tensors.
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightFormatError(
            f"{path}: refused to load: the pickle needs to run code or build objects that are not plain "
            f"tensors ({first}). Only safetensors and tensor-only pickles are accepted."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise WeightFormatError(f"{path}: not a readable PyTorch checkpoint ({err})") from None


def _read_torchscript(path: Path) -> Tensors:
    try:
        with warnings.catch_warnings():
            # torch.jit is deprecated, yet it is the only reader of OpenAI's published archives.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise WeightFormatError(f"{path}: damaged TorchScript archive ({str(err).splitlines()[0]})") from None
    # The three 0-dim integer entries of OpenAI's archives are not parameters.
    return {
        k: v
        for k, v in module.state_dict().items()
        if k not in ("input_resolution", "context_length", "vocab_size")
    }


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def read_state_dict(path: str | Path) -> tuple[Tensors, dict[str, Any]]:
    """Read any supported file or folder into (flat tensor dict, side information).

    Side information holds ``format``, for folders the parsed JSON config (``hf_config`` or
    ``open_clip_config``, and a Hugging Face folder's ``preprocessor_config.json`` as ``hf_preprocessor``),
    and for safetensors files their string ``metadata``. Wrappers (``state_dict``, ``model``) and a DDP
    ``module.`` prefix are removed.
    """
    path = Path(path)
    if not path.exists():
        raise WeightFormatError(f"{path}: no such file or directory")
    info: dict[str, Any] = {}
    if path.is_dir():
        if (path / "config.json").is_file() and (weights := _first_existing(path, _HF_WEIGHT_FILES)):
            info.update(format="huggingface", hf_config=json.loads((path / "config.json").read_text()))
            if (pre := path / "preprocessor_config.json").is_file():
                info["hf_preprocessor"] = json.loads(pre.read_text())
        elif weights := _first_existing(path, _OPEN_CLIP_WEIGHT_FILES):
            info["format"] = "open_clip"
            if (cfg := path / "open_clip_config.json").is_file():
                info["open_clip_config"] = json.loads(cfg.read_text())
        else:
            raise WeightFormatError(
                f"{path}: a folder without CLIP weights (expected config.json + model.safetensors or "
                "pytorch_model.bin, or open_clip_model.safetensors)"
            )
        path = weights
    if path.stat().st_size == 0:
        raise WeightFormatError(f"{path}: empty file")
    with path.open("rb") as f:
        magic = f.read(8)
    if path.suffix == ".safetensors":
        try:
            obj: Any = load_safetensors(str(path))
            with safe_open(str(path), framework="pt") as f:
                info["metadata"] = f.metadata() or {}
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise WeightFormatError(f"{path}: damaged safetensors file ({err})") from None
        info.setdefault("format", "safetensors")
    elif _is_torchscript(path):
        obj = _read_torchscript(path)
        info.setdefault("format", "openai-torchscript")
    elif magic[:2] == b"PK" or magic[:1] == b"\x80":
        obj = _torch_load(path)
        info.setdefault("format", "pickle")
    else:
        raise WeightFormatError(
            f"{path}: unrecognised file (not safetensors, a PyTorch checkpoint or a TorchScript archive)"
        )
    return _unwrap(obj, path), info


def _unwrap(obj: Any, path: Path) -> Tensors:
    """Peel training-checkpoint wrappers down to one flat {name: tensor} dict."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise WeightFormatError(f"{path}: holds no state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightFormatError(f"{path}: holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors
