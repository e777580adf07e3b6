"""Image encoders by family: a :class:`VisionConfig`'s ``family`` -> the module that computes its tokens.

Every encoder takes images [N, 3, S, S] and provides what EVL and the text methods read (see
:class:`evl.models.protocol.VisionEncoder`): per-block outputs with the block's own attention q and k, shallow
to deep, and a pooled image embedding. A new family is one module and one row here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from evl.config import VisionConfig
from evl.models.clip_vit import CLIPVisionTransformer
from evl.models.dinov2_vit import DINOv2VisionTransformer
from evl.models.siglip_vit import SigLIPVisionTransformer

ENCODERS: dict[str, Callable[[VisionConfig], nn.Module]] = {
    "clip": CLIPVisionTransformer,
    "siglip": SigLIPVisionTransformer,
    "dinov2": DINOv2VisionTransformer,
}


def create_encoder(config: VisionConfig) -> nn.Module:
    """A randomly initialised image encoder of ``config``'s family and shape."""
    try:
        build = ENCODERS[config.family]
    except KeyError:
        raise ValueError(
            f"no image encoder for the {config.family!r} family; known: {', '.join(ENCODERS)}"
        ) from None
    return build(config)
