"""Mapping foreign parameter names onto ours: ordered rename tables, and the tools they share.

A rename table is data: a list of ``(regex, replacement)`` rows, tried in order, the first full match
winning. A key no row matches is an error, so a table documents every tensor its source may hold. The
Hugging Face CLIP rows and the q/k/v merge serve every model built from CLIP's blocks (both CLIP towers
here, X-CLIP in :mod:`evl.models.xclip_weights`).
"""

from __future__ import annotations

import re

import torch

from evl.weights.files import Tensors, WeightFormatError


def apply_renames(state: Tensors, table: list[tuple[str, str]], source: str) -> Tensors:
    """Rename every key through the first matching (regex, replacement) row; an unmatched key is an error."""
    out: Tensors = {}
    for key, value in state.items():
        for pattern, replacement in table:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise WeightFormatError(f"{source}: unexpected key {key!r}")
    return out


def hf_block_renames(hf: str, ours: str = "transformer") -> list[tuple[str, str]]:
    """Rows for one Hugging Face CLIP encoder's blocks: ``{hf}.encoder.layers.N`` -> ``{ours}.resblocks.N``.

    ``hf`` is ``vision_model`` or ``text_model`` (or another encoder built from CLIP's blocks). Attention
    keeps its separate ``attn.{q,k,v}_proj``: :func:`merge_qkv` fuses them once every key is renamed.
    """
    layer, block = rf"{re.escape(hf)}\.encoder\.layers\.(\d+)", rf"{ours}.resblocks.\1"
    return [
        (rf"{layer}\.layer_norm1\.(weight|bias)", rf"{block}.ln_1.\2"),
        (rf"{layer}\.layer_norm2\.(weight|bias)", rf"{block}.ln_2.\2"),
        (rf"{layer}\.mlp\.fc1\.(weight|bias)", rf"{block}.mlp.c_fc.\2"),
        (rf"{layer}\.mlp\.fc2\.(weight|bias)", rf"{block}.mlp.c_proj.\2"),
        (rf"{layer}\.self_attn\.out_proj\.(weight|bias)", rf"{block}.attn.out_proj.\2"),
        (rf"{layer}\.self_attn\.([qkv])_proj\.(weight|bias)", rf"{block}.attn.\2_proj.\3"),
    ]


def merge_qkv(state: Tensors, source: str, attention: tuple[str, ...] = ("attn",)) -> Tensors:
    """Separate ``{q,k,v}_proj`` -> OpenAI's fused ``in_proj_{weight,bias}`` (q, k, v stacked).

    Fuses every module whose last name is in ``attention`` (``nn.MultiheadAttention`` in our models); others
    keep their separate projections. A module that lacks one of the three is an error naming it.
    """
    names = "|".join(re.escape(name) for name in attention)
    fused = re.compile(rf"(.+\.(?:{names}))\.([qkv])_proj\.(weight|bias)")
    out: Tensors = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if m := fused.fullmatch(key):
            parts.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out[key] = value
    for (prefix, kind), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            lacking = sorted({"q", "k", "v"} - set(qkv))
            raise WeightFormatError(
                f"{source}: {prefix} lacks {', '.join(f'{n}_proj.{kind}' for n in lacking)}"
            )
        out[f"{prefix}.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out
