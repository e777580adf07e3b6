"""Official EVL training checkpoints: the decoder and head, under our names, with the fields they imply.

The official files hold ``{'model': {'module.decoder...', 'module.proj...'}}``: DDP-wrapped, and no backbone
tensors (the frozen backbone comes from a CLIP checkpoint). :func:`load_official_evl` maps them through
:data:`_OFFICIAL_EVL_RENAMES` and reads the :class:`DecoderConfig` fields the shapes tell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evl.config import DecoderConfig
from evl.weights.files import Tensors, WeightFormatError, read_state_dict
from evl.weights.renames import apply_renames

# Official EVL names -> ours (after the DDP ``module.`` prefix is gone).
_OFFICIAL_EVL_RENAMES: list[tuple[str, str]] = [
    (r"decoder\.cls_token", "decoder.query"),
    (r"decoder\.decoder_layers\.(\d+)\.(.+)", r"decoder.layers.\1.\2"),
    (r"decoder\.temporal_conv\.(\d+)\.(weight|bias)", r"decoder.temporal_conv.\1.\2"),
    (r"decoder\.temporal_pos_embed\.(\d+)", r"decoder.temporal_pos_embed.\1.embed"),
    (r"decoder\.cross_attention\.(\d+)\.w1", r"decoder.cross_attention.\1.w_prev"),
    (r"decoder\.cross_attention\.(\d+)\.w2", r"decoder.cross_attention.\1.w_next"),
    (r"proj\.0\.(weight|bias)", r"head.norm.\1"),
    (r"proj\.2\.(weight|bias)", r"head.fc.\1"),
]


def is_official_evl(state: Tensors) -> bool:
    return "decoder.cls_token" in state and any(k.startswith("proj.") for k in state)


def load_official_evl(path: str | Path) -> tuple[Tensors, dict[str, Any]]:
    """An official EVL checkpoint -> (our decoder/head state dict, inferred :class:`DecoderConfig` fields)."""
    state, _ = read_state_dict(path)
    source = str(path)
    if not is_official_evl(state):
        raise WeightFormatError(
            f"{source}: not an official EVL checkpoint (expected module.decoder.cls_token and module.proj.*)"
        )
    ours = {k: v.float() for k, v in apply_renames(state, _OFFICIAL_EVL_RENAMES, source).items()}
    return ours, infer_decoder_fields(ours, source)


def infer_decoder_fields(state: Tensors, source: str = "checkpoint") -> dict[str, Any]:
    """DecoderConfig fields readable from a decoder/head state dict (ours)."""
    layers = {int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise WeightFormatError(f"{source}: decoder layers are missing or not numbered 0..M-1")
    width = state["decoder.query"].shape[0]
    fields: dict[str, Any] = dict(
        num_layers=len(layers),
        num_classes=state["head.fc.weight"].shape[0],
        mlp_ratio=state["decoder.layers.0.mlp.fc1.weight"].shape[0] / width,
        temporal_conv="decoder.temporal_conv.0.weight" in state,
        temporal_pos_embed="decoder.temporal_pos_embed.0.embed" in state,
        temporal_cross_attention="decoder.cross_attention.0.w_prev" in state,
    )
    if fields["temporal_pos_embed"]:
        fields["num_frames"] = state["decoder.temporal_pos_embed.0.embed"].shape[0]
    DecoderConfig(**fields)  # validates
    return fields
