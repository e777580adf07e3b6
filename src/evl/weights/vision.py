"""Any supported image encoder file -> (VisionConfig, tensors): the family is read from the file, then that
family's module maps the tensors onto our names.

How a file tells its family, first match wins:

* the VisionConfig this project stored in the safetensors metadata of a backbone it saved (a random-init
  backbone written into a run directory);
* a Hugging Face folder's ``model_type`` (``config.json``);
* the tensor names of a bare state dict;
* otherwise CLIP (OpenAI, open_clip and Hugging Face CLIP files), whose reader names what is missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evl.config import VisionConfig
from evl.weights.clip_vision import clip_vision_from_state
from evl.weights.dinov2 import dinov2_vision_from_state
from evl.weights.files import Tensors, WeightFormatError, read_state_dict
from evl.weights.siglip import siglip_vision_from_state

# The safetensors metadata key under which a saved backbone carries its VisionConfig (as JSON).
VISION_CONFIG_METADATA = "evl.vision_config"

# Hugging Face ``model_type`` -> family. Whole-model types (CLIP-like pairs) hold the image tower inside.
HF_MODEL_TYPES: dict[str, str] = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "metaclip_2": "clip",
    "metaclip_2_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "siglip2": "siglip",  # NaFlex classes, fixed to one resolution at load
    "siglip2_vision_model": "siglip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
}

# A bare state dict's family, told by a tensor name only that family holds: (regex, family), first match wins.
STATE_DICT_MARKERS: list[tuple[str, str]] = [
    # Hugging Face DINOv2's LayerScale (a ViT's other names are shared with ViTModel and friends).
    (r"(?:dinov2(?:_with_registers)?\.)?encoder\.layer\.0\.layer_scale1\.lambda1", "dinov2"),
]

# A family reader: (tensors, side information, source name, overrides) -> (config, tensors under our names).
VisionReader = Callable[..., tuple[VisionConfig, Tensors]]
VISION_READERS: dict[str, VisionReader] = {
    "clip": clip_vision_from_state,
    "siglip": siglip_vision_from_state,
    "dinov2": dinov2_vision_from_state,
}


def vision_family(state: Tensors, info: dict[str, Any], source: str) -> str:
    """The encoder family of a file read by :func:`~evl.weights.files.read_state_dict`."""
    saved = info.get("metadata", {}).get(VISION_CONFIG_METADATA)
    if saved is not None:
        return json.loads(saved).get("family", "clip")
    hf = info.get("hf_config")
    if hf is not None:
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            known = ", ".join(sorted(HF_MODEL_TYPES))
            raise WeightFormatError(
                f"{source}: Hugging Face model_type {model_type!r} is not a supported image encoder ({known})"
            )
        return HF_MODEL_TYPES[model_type]
    for marker, family in STATE_DICT_MARKERS:
        if any(re.fullmatch(marker, key) for key in state):
            return family
    return "clip"


def saved_vision_config(info: dict[str, Any], source: str) -> VisionConfig | None:
    """The VisionConfig stored with a backbone this project saved (None for any other file)."""
    saved = info.get("metadata", {}).get(VISION_CONFIG_METADATA)
    if saved is None:
        return None
    try:
        fields = json.loads(saved)
        return VisionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (TypeError, ValueError) as err:
        raise WeightFormatError(f"{source}: damaged {VISION_CONFIG_METADATA} metadata ({err})") from None


def read_vision(
    path: str | Path,
    heads: int | None = None,
    activation: str | None = None,
    image_size: int | None = None,
) -> tuple[VisionConfig, Tensors]:
    """Any supported image encoder file or folder -> its :class:`VisionConfig` and float32 tensors under
    the names of its family's module (``models/encoders.py``), ready for a strict load.

    ``heads`` and ``activation`` override what a file cannot tell (OpenAI and open_clip files store neither);
    ``image_size`` resizes the position embeddings to another input size.
    """
    state, info = read_state_dict(path)
    source = str(path)
    saved = saved_vision_config(info, source)
    if saved is not None:  # already under our names, with its whole config
        if image_size is not None and image_size != saved.image_size:
            raise WeightFormatError(
                f"{source}: a backbone saved for {saved.image_size} px; it is not resized on loading"
            )
        return saved, {k: v.float() for k, v in state.items()}
    family = vision_family(state, info, source)
    try:
        reader = VISION_READERS[family]
    except KeyError:
        raise WeightFormatError(f"{source}: no reader for the {family!r} encoder family") from None
    return reader(state, info, source, heads=heads, activation=activation, image_size=image_size)
