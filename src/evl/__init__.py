"""evl: video recognition on top of CLIP image encoders (EVL, ViFi-CLIP, X-CLIP)."""

from evl.config import DecoderConfig, ModelConfig, VisionConfig, model_preset, vision_preset
from evl.flops import FlopReport, count_flops
from evl.models.clip_vit import CLIPVisionTransformer
from evl.models.evl import EVL
from evl.models.registry import create_backbone, create_clip, create_model, load_official_checkpoint
from evl.runtime import tune_cpu_allocator

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``evl.load`` and ``evl.zeroshot`` pull in the data and plotting stack: import them on first use only.
    if name in ("load", "zeroshot"):
        from evl.engine import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'evl' has no attribute {name!r}")


__all__ = [
    "EVL",
    "CLIPVisionTransformer",
    "DecoderConfig",
    "FlopReport",
    "ModelConfig",
    "VisionConfig",
    "count_flops",
    "create_backbone",
    "create_clip",
    "create_model",
    "load",
    "load_official_checkpoint",
    "model_preset",
    "tune_cpu_allocator",
    "vision_preset",
    "zeroshot",
]
