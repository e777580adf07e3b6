"""CLIP text encoder: parity with transformers, and loading from every real checkpoint format."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from evl.config import TextConfig
from evl.models.clip_text import CLIPTextTransformer
from evl.models.registry import load_clip_text
from evl.weights import (
    WeightFormatError,
    clip_text_state_dict,
    infer_text_config,
    read_clip_text,
    read_state_dict,
)
from factories import HF_TINY, HF_TINY_TEXT, random_openai_text, random_openai_visual, random_text_ids

WIDTH, HEADS = 48, 3
# Rows of different lengths, zero padding after the end-of-text; 16 fills the context, 2 is an empty text.
LENGTHS = [16, 9, 2, 5]
IDS = random_text_ids(LENGTHS)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Replace HF's near-identity initialisation (LayerNorm 1/0, zero biases) with noise of sensible scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            elif p.ndim == 2:
                p.copy_(noise * p.shape[1] ** -0.5)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _save_hf_text(folder, eos_token_id: int) -> CLIPTextModelWithProjection:
    hf = CLIPTextModelWithProjection(CLIPTextConfig(**{**HF_TINY_TEXT, "eos_token_id": eos_token_id})).eval()
    _randomize(hf)
    hf.save_pretrained(folder)
    return hf


def openai_encode_text(state: dict[str, torch.Tensor], heads: int, ids: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's ``encode_text``, written independently with ``nn.MultiheadAttention`` as in its model.py:
    additive -inf causal mask, QuickGELU, ``ln_final``, pooled at argmax(ids), ``@ text_projection``."""
    width = state["token_embedding.weight"].shape[1]
    length = ids.shape[1]
    x = F.embedding(ids, state["token_embedding.weight"]) + state["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu_(1)
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({k[len(p) + 5 :]: v for k, v in state.items() if k.startswith(p + "attn.")})
        h = F.layer_norm(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        x = x + F.linear(
            h * torch.sigmoid(1.702 * h), state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"]
        )
    x = F.layer_norm(x, (width,), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ state["text_projection"]


def our_embedding(model: CLIPTextTransformer, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


# ------------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("eos_token_id", [999, 2, 500], ids=["eos-last", "legacy-eos-2", "eos-inside"])
def test_parity_with_transformers_text_model_with_projection(tmp_path, eos_token_id):
    hf = _save_hf_text(tmp_path, eos_token_id)
    ids = IDS.clone()
    if eos_token_id == 500:  # an end-of-text that is not the largest id: pooled by position, not argmax
        ids[ids == 500] = 501
        ids[ids == 999] = 500
    model, logit_scale = load_clip_text(tmp_path)
    # HF's legacy eos_token_id == 2 pools at argmax(ids): our vocabulary's last id.
    assert model.config.eot_token_id == (500 if eos_token_id == 500 else 999)
    assert (model.config.heads, model.config.output_dim, model.config.context_length) == (HEADS, 24, 16)
    assert logit_scale == pytest.approx(math.log(1 / 0.07))  # the format stores none
    with torch.no_grad():
        out = hf(input_ids=ids)
        masked = hf(input_ids=ids, attention_mask=(torch.arange(16) < torch.tensor(LENGTHS)[:, None]).long())
        tokens = model.eval().forward_tokens(ids)
    diff = _max_diff(our_embedding(model, ids), out.text_embeds)
    assert diff <= 1e-5, diff
    assert _max_diff(our_embedding(model, ids), masked.text_embeds) <= 1e-5
    # Every position, padding included, matches: the causal mask hides what follows each token.
    assert _max_diff(tokens, out.last_hidden_state) <= 1e-5


def test_parity_with_shorter_sequences_than_the_context(tmp_path):
    hf = _save_hf_text(tmp_path, 999)
    ids = IDS[1:, :9]  # rows of length <= 9 cut to 9 columns: positions 0..8 only
    model, _ = load_clip_text(tmp_path)
    with torch.no_grad():
        expected = hf(input_ids=ids).text_embeds
    assert _max_diff(our_embedding(model, ids), expected) <= 1e-5
    assert _max_diff(our_embedding(model, ids), our_embedding(model, IDS[1:])) <= 1e-5


def test_what_follows_end_of_text_does_not_change_the_embedding():
    model = CLIPTextTransformer(infer_text_config(random_openai_text(), heads=HEADS))
    model.load_state_dict(random_openai_text())
    garbage = IDS.clone()
    after_eot = torch.arange(16) >= torch.tensor(LENGTHS)[:, None]
    garbage[after_eot] = torch.randint(1, 998, (int(after_eot.sum()),))
    torch.testing.assert_close(our_embedding(model, garbage), our_embedding(model, IDS), atol=0, rtol=0)


def test_transformers_text_model_without_projection(tmp_path):
    config = {k: v for k, v in HF_TINY_TEXT.items() if k != "projection_dim"}
    hf = CLIPTextModel(CLIPTextConfig(**config)).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    model, _ = load_clip_text(tmp_path)
    assert model.config.output_dim is None and model.text_projection is None
    with torch.no_grad():
        expected = hf(input_ids=IDS).pooler_output
    assert _max_diff(our_embedding(model), expected) <= 1e-5


def test_transformers_clip_model_folder_both_towers_and_logit_scale(tmp_path):
    vision = {k: v for k, v in HF_TINY.items() if k != "projection_dim"}
    text = {k: v for k, v in HF_TINY_TEXT.items() if k != "projection_dim"}
    hf = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()
    _randomize(hf)
    with torch.no_grad():
        hf.logit_scale.fill_(3.3)
    hf.save_pretrained(tmp_path)
    model, logit_scale = load_clip_text(tmp_path)
    assert logit_scale == pytest.approx(3.3) and read_clip_text(tmp_path)[2] == logit_scale
    with torch.no_grad():
        expected = hf.get_text_features(input_ids=IDS)
    expected = getattr(expected, "pooler_output", expected)
    assert _max_diff(our_embedding(model), expected) <= 1e-5


# ------------------------------------------------------------------------------------ OpenAI / open_clip


def _reference(state: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return openai_encode_text({k: v.float() for k, v in state.items()}, HEADS, IDS)


def test_openai_plain_state_dict_matches_openai_forward(tmp_path):
    text = random_openai_text()
    visual = {f"visual.{k}": v for k, v in random_openai_visual().items()}
    path = tmp_path / "clip.pt"
    torch.save({**visual, **text, "logit_scale": torch.tensor(4.6052)}, path)
    model, logit_scale = load_clip_text(path, heads=HEADS)
    config = model.config
    assert (config.width, config.layers, config.mlp_width, config.vocab_size) == (WIDTH, 3, 37, 1000)
    assert (config.eot_token_id, config.activation) == (999, "quick_gelu")
    assert logit_scale == pytest.approx(4.6052)
    diff = _max_diff(our_embedding(model), _reference(text))
    assert diff <= 1e-5, diff


def test_reading_gives_config_float32_tensors_and_logit_scale(tmp_path):
    text = random_openai_text()
    path = tmp_path / "clip_half.pt"
    torch.save({**{k: v.half() for k, v in text.items()}, "logit_scale": torch.tensor(4.6052)}, path)
    config, tensors, logit_scale = read_clip_text(path, heads=HEADS)
    assert config == infer_text_config(text, heads=HEADS)
    assert tensors.keys() == text.keys() and {v.dtype for v in tensors.values()} == {torch.float32}
    assert logit_scale == pytest.approx(4.6052)


class _OpenAIArchive(CLIPTextTransformer):
    """OpenAI's layout: the text tower at the top level, ``visual``, ``logit_scale`` and three 0-dim ints."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__(config)
        self.visual = torch.nn.Linear(4, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6052))
        self.register_buffer("input_resolution", torch.tensor(40))
        self.register_buffer("context_length", torch.tensor(16))
        self.register_buffer("vocab_size", torch.tensor(1000))


def test_openai_torchscript_archive_mixed_precision(tmp_path):
    text = random_openai_text()
    archive = _OpenAIArchive(infer_text_config(text, heads=HEADS)).eval()
    archive.load_state_dict(text, strict=False)
    # Traced without autograd: a module may take a different (equivalent) path when gradients are off.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(archive, IDS)
        # As OpenAI's convert_weights leaves them: matmul weights and biases in fp16, LayerNorms and
        # embeddings in fp32.
        for name, p in traced.named_parameters():
            if (
                name.endswith(("in_proj_weight", "in_proj_bias", "text_projection"))
                or ".c_" in name
                or "out_proj" in name
            ):
                p.data = p.data.half()
        path = tmp_path / "ViT-Tiny.pt"
        torch.jit.save(traced, str(path))
    state, info = read_state_dict(path)
    assert info["format"] == "openai-torchscript" and state["text_projection"].dtype == torch.float16
    model, logit_scale = load_clip_text(path, heads=HEADS)
    assert logit_scale == pytest.approx(4.6052)
    half_rounded = {k: (v.half().float() if state[k].dtype == torch.float16 else v) for k, v in text.items()}
    assert _max_diff(our_embedding(model), _reference(half_rounded)) <= 1e-5
    exact = CLIPTextTransformer(model.config)
    exact.load_state_dict(half_rounded)
    torch.testing.assert_close(our_embedding(model), our_embedding(exact), atol=0, rtol=0)


def test_open_clip_training_checkpoint_with_ddp_prefix(tmp_path):
    text = random_openai_text()
    visual = {f"visual.{k}": v for k, v in random_openai_visual().items()}
    state = {f"module.{k}": v for k, v in {**visual, **text, "logit_scale": torch.tensor(2.5)}.items()}
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": state, "optimizer": {"state": {}}}, path)
    model, logit_scale = load_clip_text(path, heads=HEADS)
    assert logit_scale == pytest.approx(2.5)
    assert _max_diff(our_embedding(model), _reference(text)) <= 1e-5


def test_safetensors_file(tmp_path):
    text = random_openai_text()
    path = tmp_path / "open_clip_model.safetensors"
    save_file(text, str(path))
    model, logit_scale = load_clip_text(path, heads=HEADS)
    assert logit_scale == pytest.approx(math.log(1 / 0.07))
    assert _max_diff(our_embedding(model), _reference(text)) <= 1e-5


def test_open_clip_hub_folder_reads_heads_and_activation(tmp_path):
    text = random_openai_text()
    save_file({**text, "logit_scale": torch.tensor(4.0)}, str(tmp_path / "open_clip_model.safetensors"))
    config = {"model_cfg": {"embed_dim": 24, "text_cfg": {"width": WIDTH, "heads": HEADS, "layers": 3}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    model, logit_scale = load_clip_text(tmp_path)
    assert (model.config.heads, model.config.activation, logit_scale) == (HEADS, "gelu", 4.0)
    quick = CLIPTextTransformer(TextConfig(**{**model.config.__dict__, "activation": "quick_gelu"}))
    quick.load_state_dict(text)
    assert _max_diff(our_embedding(quick), _reference(text)) <= 1e-5
    assert _max_diff(our_embedding(model), our_embedding(quick)) > 1e-3  # GELU really is used


def test_open_clip_custom_text_prefix(tmp_path):
    text = random_openai_text()
    path = tmp_path / "custom.safetensors"
    save_file({f"text.{k}": v for k, v in text.items()} | {"text.attn_mask": torch.zeros(16, 16)}, str(path))
    model, _ = load_clip_text(path, heads=HEADS)
    assert _max_diff(our_embedding(model), _reference(text)) <= 1e-5


def test_heads_default_to_width_over_64_and_overrides_win():
    text = random_openai_text(width=128, mlp=256)
    assert infer_text_config(text).heads == 2
    assert infer_text_config(text, heads=4, eot_token_id=7, activation="gelu").heads == 4
    assert clip_text_state_dict({**text, "logit_scale": torch.tensor(1.0)}).keys() == text.keys()


# ------------------------------------------------------------------------------------------------ errors


def _one_line_error(path, match: str, **kwargs) -> None:
    with pytest.raises(WeightFormatError, match=match) as err:
        load_clip_text(path, **kwargs)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_vision_only_checkpoints_are_refused(tmp_path):
    path = tmp_path / "visual_only.pt"
    torch.save({f"visual.{k}": v for k, v in random_openai_visual().items()}, path)
    _one_line_error(path, "no CLIP text encoder found")
    folder = tmp_path / "hf_vision"
    vision = {k: v for k, v in HF_TINY.items() if k != "projection_dim"}
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(folder)
    _one_line_error(folder, "no CLIP text encoder found")


def test_extra_or_missing_text_tensors_are_refused(tmp_path):
    text = random_openai_text()
    path = tmp_path / "layer_scale.safetensors"
    save_file({**text, "transformer.resblocks.0.ls_1.gamma": torch.ones(WIDTH)}, str(path))
    _one_line_error(path, r"does not fit.*ls_1\.gamma", heads=HEADS)
    del text["ln_final.bias"]
    save_file(text, str(path))
    _one_line_error(path, r"missing \['ln_final.bias'\]", heads=HEADS)
    _one_line_error(path, "not divisible by heads", heads=5)


def test_unsupported_configs_are_refused(tmp_path):
    hf = CLIPTextModelWithProjection(CLIPTextConfig(**{**HF_TINY_TEXT, "hidden_act": "gelu_new"}))
    hf.save_pretrained(tmp_path / "hf")
    _one_line_error(tmp_path / "hf", "text activation 'gelu_new' is not supported")
    save_file(random_openai_text(), str(tmp_path / "open_clip_model.safetensors"))
    config = {"model_cfg": {"text_cfg": {"width": WIDTH, "heads": HEADS, "pool_type": "last"}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    _one_line_error(tmp_path, "pool_type 'last' is not supported")


def test_end_of_text_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="eot_token_id 49407 is outside the vocabulary of 1000"):
        TextConfig(vocab_size=1000)
