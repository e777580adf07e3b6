"""evl: video recognition on top of CLIP image encoders (EVL, ViFi-CLIP, X-CLIP)."""

from evl.config import DecoderConfig, ModelConfig, VisionConfig, model_preset, vision_preset
from evl.flops import FlopReport, count_flops
from evl.models.clip_vit import CLIPVisionTransformer
from evl.models.evl import EVL
from evl.models.registry import create_backbone, create_model, load_official_checkpoint

__version__ = "0.1.0"

__all__ = [
    "EVL",
    "CLIPVisionTransformer",
    "DecoderConfig",
    "FlopReport",
    "ModelConfig",
    "VisionConfig",
    "count_flops",
    "create_backbone",
    "create_model",
    "load_official_checkpoint",
    "model_preset",
    "vision_preset",
]
