"""Checkpoint files -> (config, tensors) under this project's parameter names; no module is built here.

Formats, detected from the file itself (never from its name alone):

* OpenAI CLIP TorchScript archive (``ViT-B-16.pt`` as OpenAI ships it) and OpenAI plain state dicts;
* open_clip checkpoints (``.bin``/``.pt``/``.safetensors``, with or without a ``state_dict`` wrapper or a
  ``module.`` prefix) and open_clip hub folders (``open_clip_model.safetensors`` + ``open_clip_config.json``);
* Hugging Face ``transformers`` CLIP folders (``CLIPModel``, ``CLIPVisionModel``, ``CLIPTextModel`` or
  ``CLIPTextModelWithProjection``: ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``);
* Hugging Face SigLIP and SigLIP 2 folders (image tower; SigLIP 2's NaFlex classes are fixed to one
  resolution on loading), and their text towers with the logit scale and bias
  (:mod:`~evl.weights.siglip_text`);
* Hugging Face MetaCLIP 2 folders (CLIP's towers on an XLM-R vocabulary);
* official EVL training checkpoints (``{'model': {'module.decoder...', 'module.proj...'}}``).

One module per job: :mod:`~evl.weights.files` reads any file or folder into a flat tensor dict,
:mod:`~evl.weights.renames` holds the rename machinery every source shares, and one module per encoder
family or checkpoint source (:mod:`~evl.weights.clip_vision`, :mod:`~evl.weights.clip_text`,
:mod:`~evl.weights.siglip`, :mod:`~evl.weights.official_evl`) maps its tensors onto our names and reads its
config from their shapes. A new encoder family is a new sibling module. The models layer builds the modules
and loads them strict (:mod:`evl.models.registry`).
"""

from evl.weights.clip_text import (
    DEFAULT_LOGIT_SCALE,
    clip_text_state_dict,
    infer_text_config,
    read_clip_text,
)
from evl.weights.clip_vision import (
    clip_visual_state_dict,
    infer_vision_config,
    load_clip_vision,
    resize_positional_embedding,
)
from evl.weights.files import Tensors, WeightFormatError, read_state_dict
from evl.weights.official_evl import infer_decoder_fields, is_official_evl, load_official_evl
from evl.weights.renames import apply_renames, hf_block_renames, merge_qkv
from evl.weights.siglip_text import SIGLIP_TEXT_MODEL_TYPES, read_siglip_text, siglip_text_state_dict
from evl.weights.vision import VISION_CONFIG_METADATA, read_vision, vision_family

__all__ = [
    "DEFAULT_LOGIT_SCALE",
    "SIGLIP_TEXT_MODEL_TYPES",
    "VISION_CONFIG_METADATA",
    "Tensors",
    "WeightFormatError",
    "apply_renames",
    "clip_text_state_dict",
    "clip_visual_state_dict",
    "hf_block_renames",
    "infer_decoder_fields",
    "infer_text_config",
    "infer_vision_config",
    "is_official_evl",
    "load_clip_vision",
    "load_official_evl",
    "merge_qkv",
    "read_clip_text",
    "read_siglip_text",
    "read_state_dict",
    "read_vision",
    "resize_positional_embedding",
    "siglip_text_state_dict",
    "vision_family",
]
