"""X-CLIP: parity with transformers' XCLIPModel, official checkpoints, text cache, gradients, groups."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, XCLIPModel
from transformers import XCLIPConfig as HFXCLIPConfig

from evl.models.xclip import XCLIP, XCLIPConfig, xclip_param_groups
from evl.models.xclip_weights import load_xclip
from evl.weights import WeightFormatError

VOCAB, EOT = 99, 98  # the end-of-text token is the vocabulary's last id, as in CLIP's BPE
FRAMES = 3

# Odd sizes expose swapped axes: image width 48 (3 heads of 16), MLP 37, a 5x5 grid, 3 frames; text width
# 32 (2 heads); joint space 24 with MIT MLP 41 (2 heads) and prompt heads 3.
HF_TINY_XCLIP = dict(
    text_config=dict(
        hidden_size=32,
        intermediate_size=45,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=16,
    ),
    vision_config=dict(
        hidden_size=48,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=3,
        image_size=40,
        patch_size=8,
        num_frames=FRAMES,
        mit_hidden_size=24,
        mit_intermediate_size=41,
        mit_num_hidden_layers=1,
        mit_num_attention_heads=2,
    ),
    projection_dim=24,
    prompt_layers=2,
    prompt_num_attention_heads=3,
)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (HF zero-initialises biases and sets alpha to a constant): nothing matches by
    accident, and every module changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 0:
                p.copy_(2.0 + 0.3 * noise)
            elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm scales
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("alpha"):
                p.copy_(0.3 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)


def _token_ids(lengths=(3, 5, 9, 1), context=10, seed=3) -> torch.Tensor:
    """[K, context]: random words, the end-of-text token, then padding (id 0) after it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, EOT, (n,), generator=g)
        ids[row, n] = EOT
    return ids


def _video(batch=2, seed=4) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, 40, 40, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    hf = XCLIPModel._from_config(HFXCLIPConfig(**HF_TINY_XCLIP), attn_implementation="eager").eval()
    _randomize(hf)
    folder = tmp_path_factory.mktemp("xclip_hf")
    hf.save_pretrained(folder)
    return hf, folder


def _tiny_config(**changes) -> XCLIPConfig:
    config = XCLIPConfig()
    vision = dataclasses.replace(
        config.vision,
        width=48,
        layers=2,
        heads=3,
        patch_size=8,
        image_size=40,
        mlp_ratio=37 / 48,
        output_dim=24,
    )
    text = dataclasses.replace(
        config.text,
        width=32,
        layers=1,
        heads=2,
        context_length=16,
        vocab_size=VOCAB,
        output_dim=24,
        eot_token_id=EOT,
    )
    fields = dict(embed_dim=24, num_frames=FRAMES, mit_heads=2, prompt_heads=3, mit_mlp_ratio=41 / 24)
    return dataclasses.replace(config, vision=vision, text=text, **{**fields, **changes})


# ------------------------------------------------------------------------------------------------ parity


def test_parity_with_transformers_xclip(hf_folder):
    hf, folder = hf_folder
    ours = load_xclip(folder)
    video, ids = _video(), _token_ids()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=video)
        out = ours.forward_outputs(video, ids)
    diffs = {
        "video_embeds": (out.video_embeds - ref.video_embeds).abs().max().item(),
        "text_embeds": (out.text_embeds - ref.text_embeds).abs().max().item(),
        "logits_per_video": (out.logits_per_video - ref.logits_per_video).abs().max().item(),
    }
    assert max(diffs.values()) <= 1e-5, diffs
    assert out.text_embeds.shape == (2, 4, 24) and out.logits_per_video.shape == (2, 4)
    # The comparison is not vacuous: the prompts depend on the video, and the videos differ.
    assert (out.text_embeds[0] - out.text_embeds[1]).abs().max() > 1e-2
    assert (out.video_embeds[0] - out.video_embeds[1]).abs().max() > 1e-2
    assert torch.equal(ours(video, ids), out.logits_per_video)


def test_config_read_from_hf_config_json(hf_folder):
    config = load_xclip(hf_folder[1]).config
    assert (config.vision.width, config.vision.layers, config.vision.heads) == (48, 3, 3)
    assert config.vision.mlp_width == 37 and config.vision.grid_size == 5
    assert (config.text.width, config.text.heads, config.text.mlp_width) == (32, 2, 45)
    assert (config.text.context_length, config.text.eot_token_id) == (16, EOT)
    assert (config.embed_dim, config.num_frames, config.mit_layers, config.mit_heads) == (24, FRAMES, 1, 2)
    assert (config.mit_mlp_width, config.prompt_layers, config.prompt_heads) == (41, 2, 3)
    assert config.vision.mean == (0.485, 0.456, 0.406)  # X-CLIP normalises with ImageNet statistics


def test_official_checkpoint_layout_loads(tmp_path):
    model = XCLIP(_tiny_config()).eval()
    _randomize(model, seed=5)
    # The official layout: the text tower at the top level, a DDP prefix, and training extras.
    official = {f"module.{k.removeprefix('text.')}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": official, "epoch": 3, "max_accuracy": 81.5}, tmp_path / "best.pth")
    loaded = load_xclip(tmp_path / "best.pth", vision_heads=3, text_heads=2, mit_heads=2, prompt_heads=3)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    video, ids = _video(), _token_ids()
    with torch.no_grad():
        assert torch.equal(loaded(video, ids), model(video, ids))


def test_a_non_square_position_table_is_refused_in_one_line(tmp_path):
    model = XCLIP(_tiny_config())
    official = {f"module.{k.removeprefix('text.')}": v.clone() for k, v in model.state_dict().items()}
    official["module.visual.positional_embedding"] = official["module.visual.positional_embedding"][:-1]
    torch.save({"model": official}, tmp_path / "best.pth")
    with pytest.raises(
        WeightFormatError, match=r"best\.pth: \d+ image position embeddings do not form a square"
    ):
        load_xclip(tmp_path / "best.pth")


# ------------------------------------------------------------------------------------------------ text cache


def _count_text_calls(model: XCLIP) -> list[int]:
    calls = [0]
    model.text.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_text_cache_is_keyed_by_the_class_token_ids(hf_folder):
    model = load_xclip(hf_folder[1])
    calls = _count_text_calls(model)
    video, ids = _video(), _token_ids()
    first = model(video, ids)
    second = model(video, ids.clone())  # equal ids, another tensor
    assert calls[0] == 1 and torch.equal(first, second)
    other = _token_ids(lengths=(2, 4, 6), seed=7)
    changed = model(video, other)
    assert calls[0] == 2 and changed.shape == (2, 3)
    assert not torch.equal(model.class_text_features(other)[:3], model.encode_text(ids)[:3])
    assert torch.equal(model(video, ids), first) and calls[0] == 4  # one slot: recomputed (+ encode_text)
    # New text weights invalidate the cache too.
    state = {k: v + 0.01 if k == "text.ln_final.bias" else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert not torch.allclose(model(video, ids), first) and calls[0] == 5


def test_unfrozen_text_tower_is_not_cached_while_training(hf_folder):
    model = load_xclip(hf_folder[1], freeze_text=False).train()
    calls = _count_text_calls(model)
    ids = _token_ids()
    model(_video(), ids)
    model(_video(), ids)
    assert calls[0] == 2
    assert model.logit_scale.requires_grad and all(p.requires_grad for p in model.text.parameters())


def test_text_encoding_never_changes_train_or_eval_mode(hf_folder):
    model = load_xclip(hf_folder[1])
    ids = _token_ids()
    for mode in (True, False, True):
        model.train(mode)
        model.class_text_features(ids)
        model.encode_text(ids)
        model(_video(), ids)
        assert all(m.training is mode for m in model.modules())


# ------------------------------------------------------------------------------------------------- training


def test_every_trainable_parameter_gets_a_gradient_and_the_text_tower_none(hf_folder):
    model = load_xclip(hf_folder[1]).train()
    logits = model(_video(), _token_ids())
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    trainable = dict(model.trainable_named_parameters())
    frozen = {n for n, _ in model.named_parameters()} - set(trainable)
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("text.")} | {"logit_scale"}
    assert len(list(model.trainable_parameters())) == len(trainable)
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_param_groups_reproduce_the_reference_optimizer(hf_folder):
    model = load_xclip(hf_folder[1])
    groups = xclip_param_groups(model, lr=8e-6, weight_decay=0.001)
    where = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    names = [n for g in groups for n in g["param_names"]]
    assert len(names) == len(set(names)) and set(names) == set(dict(model.trainable_named_parameters()))
    for g in groups:
        assert [id(p) for p in g["params"]] == [
            id(dict(model.named_parameters())[n]) for n in g["param_names"]
        ]
    slow, fast = (8e-6, 0.001), (8e-6, 0.0)
    expected = {
        "visual.conv1.weight": slow,
        "visual.proj": slow,
        "visual.transformer.resblocks.1.attn.in_proj_weight": slow,
        "visual.transformer.resblocks.1.mlp.c_fc.bias": fast,
        "visual.class_embedding": fast,  # 1-D
        "visual.positional_embedding": fast,  # 2-D, exempt by name
        "visual.ln_post.weight": fast,
        "visual.transformer.resblocks.0.message_fc.weight": (8e-5, 0.001),
        "visual.transformer.resblocks.0.message_attn.in_proj_weight": (8e-5, 0.001),
        "visual.transformer.resblocks.2.message_ln.weight": (8e-5, 0.0),
        "visual.transformer.resblocks.2.message_attn.out_proj.bias": (8e-5, 0.0),
        "mit.resblocks.0.attn.in_proj_weight": (8e-5, 0.001),
        "mit.positional_embedding": (8e-5, 0.0),  # 3-D, exempt by name
        "mit.resblocks.0.ln_2.bias": (8e-5, 0.0),
        "prompts_visual_proj": (8e-5, 0.001),
        "prompts_visual_ln.weight": (8e-5, 0.0),
        "prompts_generator.decoder.1.cross_attn.v_proj.weight": (8e-5, 0.001),
        "prompts_generator.decoder.0.mlp.3.bias": (8e-5, 0.0),
        "prompts_generator.alpha": (8e-5, 0.0),
    }
    for name, lr_wd in expected.items():
        assert where[name] == pytest.approx(lr_wd), name
    assert "logit_scale" not in where and not any(n.startswith("text.") for n in where)
    # CLIP, mit, prompts, message; decayed before not decayed, as the reference builds them.
    assert [(g["lr_scale"], g["weight_decay"] > 0) for g in groups] == [
        (scale, decayed) for scale in (1.0, 10.0, 10.0, 10.0) for decayed in (True, False)
    ]
    torch.optim.AdamW(groups, betas=(0.9, 0.98))  # accepted as is


# ----------------------------------------------------------------------------------------------- bad inputs


def _single_line_error(path, match: str) -> str:
    with pytest.raises(WeightFormatError, match=match) as info:
        load_xclip(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_wrong_files_fail_with_one_line_naming_the_file(hf_folder, tmp_path):
    folder = hf_folder[1]
    clip = tmp_path / "clip"
    CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=37, vocab_size=VOCAB),
                         vision_config=dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                                            intermediate_size=37, image_size=40, patch_size=8),
                         projection_dim=24)).save_pretrained(clip)  # fmt: skip
    assert str(clip / "model.safetensors") in _single_line_error(clip, "not an XCLIPModel")

    state = load_file(folder / "model.safetensors")
    config_json = (folder / "config.json").read_text()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "mit.position_embedding"}, "missing mit"),
        "extra": ({**state, "vision_model.extra.weight": torch.zeros(2)}, "unexpected key 'vision_model"),
        "shape": ({**state, "prompts_generator.alpha": torch.zeros(5)}, r"alpha has shape \(5,\)"),
        "half_qkv": ({k: v for k, v in state.items() if ".1.message_attn.k_proj" not in k}, "lacks k_proj"),
    }
    for name, (broken, match) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config_json)
        save_file(broken, tmp_path / name / "model.safetensors")
        assert str(tmp_path / name / "model.safetensors") in _single_line_error(tmp_path / name, match)

    torch.save({"model": {"visual.conv1.weight": torch.zeros(4, 3, 2, 2)}}, tmp_path / "plain.pth")
    _single_line_error(tmp_path / "plain.pth", "not an X-CLIP checkpoint")
    _single_line_error(tmp_path / "nothing.pth", "no such file")


def test_inputs_and_configs_are_validated():
    model = XCLIP(_tiny_config())
    with pytest.raises(ValueError, match="built for 3 frames"):
        model(torch.zeros(1, 4, 3, 40, 40), _token_ids())
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        model(torch.zeros(3, 3, 40, 40), _token_ids())
    with pytest.raises(ValueError, match="must both equal embed_dim"):
        _tiny_config(embed_dim=32)
    with pytest.raises(ValueError, match="not divisible by prompt_heads"):
        _tiny_config(prompt_heads=5)
