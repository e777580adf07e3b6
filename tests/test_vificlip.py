"""VideoCLIP (ViFi-CLIP / zero-shot CLIP): logits, tune modes, class-embedding cache, templates, state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evl.config import VisionConfig
from evl.models.clip_text import CLIPTextTransformer, TextConfig
from evl.models.clip_vit import CLIPVisionTransformer
from evl.models.vificlip import (
    TUNE_MODES,
    VIFI_TEMPLATE,
    ZEROSHOT_TEMPLATE,
    VideoCLIP,
    build_prompts,
)

# Odd sizes (MLP 37, 3 frames, 5 classes, 7 tokens) expose swapped axes.
VISION = VisionConfig(
    width=32, layers=2, heads=2, patch_size=8, image_size=24, output_dim=16, mlp_ratio=37 / 32
)
TEXT = TextConfig(
    width=32,
    layers=2,
    heads=2,
    vocab_size=60,
    context_length=10,
    output_dim=16,
    eot_token_id=59,
    mlp_ratio=37 / 32,
)
NUM_CLASSES = 5


def make_tokens(rows: int, length: int = 7, seed: int = 0) -> torch.Tensor:
    """[rows, length] ids: SOT-like 1, random words, EOT (59) at a varying position, zero padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(rows, length, dtype=torch.long)
    for row in range(rows):
        eot = 2 + row % (length - 2)
        tokens[row, 0] = 1
        tokens[row, 1:eot] = torch.randint(2, 59, (eot - 1,), generator=g)
        tokens[row, eot] = TEXT.eot_token_id
    return tokens


def make_model(tune: str = "both", seed: int = 0, **kwargs) -> VideoCLIP:
    torch.manual_seed(seed)
    model = VideoCLIP(
        CLIPVisionTransformer(VISION), CLIPTextTransformer(TEXT), math.log(50.0), tune, **kwargs
    )
    model.set_class_tokens(make_tokens(NUM_CLASSES))
    return model


def make_video(batch: int = 2, frames: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


def count_text_calls(model: VideoCLIP) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    model.text.register_forward_hook(hook)
    return calls


def expected_tuned(tune: str, name: str) -> bool:
    if name == "logit_scale":
        return tune == "both"
    if name.startswith("visual."):
        return tune in ("both", "image")
    return tune in ("both", "text") and name != "text.token_embedding.weight"


# ----------------------------------------------------------------------------------------------- logits


def test_logits_match_straightforward_recomputation():
    model = make_model().eval()
    video = make_video()
    with torch.no_grad():
        logits = model(video)
        rows = []
        for b in range(video.shape[0]):
            frames = [model.visual(video[b, t : t + 1])[0] for t in range(video.shape[1])]
            rows.append(torch.stack(frames).mean(dim=0))
        video_emb = torch.stack(rows)
        video_emb = video_emb / video_emb.norm(dim=-1, keepdim=True)
        text_emb = model.text(make_tokens(NUM_CLASSES))
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        expected = 50.0 * video_emb @ text_emb.t()
    assert logits.shape == (2, NUM_CLASSES)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert logits.std() > 0.1  # not a degenerate constant


def test_compute_dtype_bfloat16_autocast_on_cpu():
    video = make_video()
    with torch.no_grad():
        reference = make_model().eval()(video)
        low = make_model(compute_dtype="bfloat16").eval()(video)
    assert low.dtype == torch.float32
    assert not torch.equal(low, reference)  # the towers really ran in bfloat16
    torch.testing.assert_close(low, reference, atol=1.0, rtol=0)
    with pytest.raises(ValueError, match=r"backbone\.dtype must be one of"):
        make_model(compute_dtype="fp8")


# ---------------------------------------------------------------------------------------------- tune modes


@pytest.mark.parametrize("tune", ["both", "image", "text"])
def test_exactly_the_tuned_parameters_get_gradients(tune):
    model = make_model(tune).train()
    logits = model(make_video())
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    names = [name for name, _ in model.named_parameters()]
    assert any(expected_tuned(tune, n) for n in names) and not all(expected_tuned(tune, n) for n in names)
    for name, param in model.named_parameters():
        assert param.requires_grad == expected_tuned(tune, name), name
        assert model.is_tuned(name) == expected_tuned(tune, name), name
        if expected_tuned(tune, name):
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"


def test_zero_shot_mode_is_fully_frozen():
    model = make_model("none").train()
    assert not any(p.requires_grad for p in model.parameters())
    logits = model(make_video())
    assert not logits.requires_grad
    assert model.trainable_state_dict() == {}
    assert model.param_groups(lr=1e-5, weight_decay=0.1) == []


@pytest.mark.parametrize("tune", TUNE_MODES)
def test_frozen_parts_stay_in_eval_mode(tune):
    model = make_model(tune)
    for mode in (True, False, True):
        model.train(mode)
        model(make_video(batch=1, frames=2))  # a forward never switches modes either
        assert model.training is mode
        assert model.text.token_embedding.training is False
        assert model.visual.training is (mode and tune in ("both", "image"))
        assert all(m.training is (mode and tune in ("both", "image")) for m in model.visual.modules())
        assert model.text.transformer.training is (mode and tune in ("both", "text"))
        assert model.text.ln_final.training is (mode and tune in ("both", "text"))


# ------------------------------------------------------------------------------------------ text cache


def test_frozen_text_is_encoded_once_and_invalidated_on_new_classes():
    model = make_model("image").train()
    calls = count_text_calls(model)
    video = make_video()
    first = model(video)
    model(video)
    model.encode_text()
    assert calls[0] == 1
    model.set_class_tokens(make_tokens(NUM_CLASSES))  # same ids: the cache stays
    model(video)
    assert calls[0] == 1
    new_tokens = make_tokens(NUM_CLASSES, seed=5)
    model.set_class_tokens(new_tokens)
    second = model(video)
    assert calls[0] == 2
    assert not torch.allclose(first, second)
    with torch.no_grad():
        expected = F.normalize(model.text(new_tokens), dim=-1)
    torch.testing.assert_close(model.encode_text(), expected, atol=1e-6, rtol=0)
    model.set_class_tokens(new_tokens[:3])  # fewer classes
    assert model(video).shape == (2, 3)
    assert model.training and model.visual.training and not model.text.training


def test_load_state_dict_invalidates_frozen_text_cache():
    model = make_model("image").eval()
    calls = count_text_calls(model)
    before = model.encode_text()
    state = model.state_dict()
    state["text.ln_final.bias"] = state["text.ln_final.bias"] + 0.5
    model.load_state_dict(state)
    after = model.encode_text()
    assert calls[0] == 2
    assert not torch.allclose(before, after)


def test_trained_text_is_encoded_every_forward_unless_cached_explicitly():
    model = make_model("both").train()
    calls = count_text_calls(model)
    video = make_video()
    model(video)
    model(video)
    assert calls[0] == 2
    model.eval()
    with torch.no_grad():
        model(video)
    assert calls[0] == 3
    with model.text_cache(), torch.no_grad():
        outputs = [model(video) for _ in range(3)]
    assert calls[0] == 4
    torch.testing.assert_close(outputs[0], outputs[2])
    with torch.no_grad():
        model(video)  # the cache is dropped on leaving the block
    assert calls[0] == 5
    assert model.training is False and model.text.training is False  # no mode side effects


def test_forward_needs_class_tokens_and_checks_them():
    model = VideoCLIP(CLIPVisionTransformer(VISION), CLIPTextTransformer(TEXT))
    assert model.num_classes == 0
    with pytest.raises(RuntimeError, match="set_class_tokens"):
        model(make_video())
    with pytest.raises(ValueError, match="do not split into classes of 2 templates"):
        model.set_class_tokens(make_tokens(5), num_templates=2)
    with pytest.raises(ValueError, match="exceed the text context of 10"):
        model.set_class_tokens(torch.zeros(2, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary of 60"):
        model.set_class_tokens(torch.full((2, 4), 60))
    with pytest.raises(ValueError, match="integer ids"):
        model.set_class_tokens(torch.zeros(2, 4))
    model.set_class_tokens(make_tokens(4))
    with pytest.raises(ValueError, match=r"videos \[B, T, 3, H, W\]"):
        model(torch.zeros(2, 3, 24, 24))


def test_construction_errors():
    with pytest.raises(ValueError, match="unknown tune mode 'all'"):
        VideoCLIP(CLIPVisionTransformer(VISION), CLIPTextTransformer(TEXT), tune="all")
    other = VisionConfig(width=32, layers=1, heads=2, patch_size=8, image_size=24, output_dim=8)
    with pytest.raises(ValueError, match="8 dims but text embeddings 16"):
        VideoCLIP(CLIPVisionTransformer(other), CLIPTextTransformer(TEXT))
    unprojected = VisionConfig(width=32, layers=1, heads=2, patch_size=8, image_size=24, output_dim=None)
    with pytest.raises(ValueError, match="projection"):
        VideoCLIP(CLIPVisionTransformer(unprojected), CLIPTextTransformer(TEXT))


# ------------------------------------------------------------------------------------------- templates


def test_build_prompts():
    prompts = build_prompts(["ride bike", "wave"], [VIFI_TEMPLATE, ZEROSHOT_TEMPLATE, "a video of {}"])
    assert prompts == [
        ["a photo of a ride bike.", "ride bike", "a video of ride bike"],
        ["a photo of a wave.", "wave", "a video of wave"],
    ]
    assert build_prompts(["wave"]) == [["a photo of a wave."]]
    with pytest.raises(ValueError, match="placeholder"):
        build_prompts(["wave"], ["a photo"])
    with pytest.raises(TypeError):
        build_prompts(["wave"], VIFI_TEMPLATE)


def test_template_ensembling_is_exact():
    model = make_model("image").eval()
    num_templates = 3
    tokens = make_tokens(NUM_CLASSES * num_templates, seed=2)  # class-major: row k * 3 + j
    model.set_class_tokens(tokens, num_templates=num_templates)
    assert model.num_classes == NUM_CLASSES
    with torch.no_grad():
        per_prompt = F.normalize(model.text(tokens), dim=-1)
        expected = torch.stack(
            [F.normalize(per_prompt[k * 3 : k * 3 + 3].mean(dim=0), dim=0) for k in range(NUM_CLASSES)]
        )
        embeddings = model.encode_text()
    torch.testing.assert_close(embeddings, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(embeddings, per_prompt[::3], atol=1e-3)  # really an average
    # The same ids split as 15 one-template classes is a different class set: re-encoded.
    model.set_class_tokens(tokens, num_templates=1)
    assert model.encode_text().shape == (NUM_CLASSES * num_templates, 16)


# ----------------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("tune", ["both", "image", "text"])
def test_trainable_state_dict_round_trip(tune):
    source = make_model(tune, seed=0)
    state = source.trainable_state_dict()
    assert sorted(state) == sorted(n for n, _ in source.named_parameters() if expected_tuned(tune, n))
    target = make_model(tune, seed=1)
    target.logit_scale.data.fill_(0.0)
    video = make_video()
    with torch.no_grad():
        assert not torch.allclose(source.eval()(video), target.eval()(video))
        target.load_trainable_state_dict(state)
        # The frozen parts (token embeddings at least) are not in the state: the pretrained CLIP gives them.
        frozen = {k: v for k, v in source.state_dict().items() if k not in state}
        assert "text.token_embedding.weight" in frozen
        target.load_state_dict(frozen, strict=False)
        torch.testing.assert_close(target(video), source(video), atol=0, rtol=0)
    assert ("logit_scale" in state) is (tune == "both")


def test_load_trainable_state_dict_errors():
    model = make_model("image")
    state = model.trainable_state_dict()
    with pytest.raises(ValueError, match=r"missing \['visual.class_embedding'\]"):
        model.load_trainable_state_dict({k: v for k, v in state.items() if k != "visual.class_embedding"})
    with pytest.raises(ValueError, match=r"tune='image'.*unexpected \['logit_scale'\]"):
        model.load_trainable_state_dict(
            {**state, "logit_scale": torch.tensor(1.0)}, source="ckpt.safetensors"
        )
    with pytest.raises(ValueError, match=r"visual.proj has shape \(32, 8\) but the model expects \(32, 16\)"):
        model.load_trainable_state_dict({**state, "visual.proj": torch.zeros(32, 8)})


def test_param_groups():
    model = make_model("both")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    (group,) = model.param_groups(lr=2e-6, weight_decay=0.001)
    assert group["param_names"] == trainable
    assert group["weight_decay"] == 0.001 and group["lr"] == 2e-6
    decay, no_decay = model.param_groups(lr=2e-6, weight_decay=0.001, decay_all=False)
    assert decay["weight_decay"] == 0.001 and no_decay["weight_decay"] == 0.0
    assert sorted(decay["param_names"] + no_decay["param_names"]) == sorted(trainable)
    assert {"logit_scale", "visual.class_embedding", "text.ln_final.bias"} <= set(no_decay["param_names"])
    assert {"visual.proj", "visual.conv1.weight", "text.positional_embedding"} <= set(decay["param_names"])
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    names = model.param_groups(lr=1.0, weight_decay=0.0)[0]["param_names"]
    assert "text.token_embedding.weight" not in names
    image_only = make_model("image").param_groups(lr=1.0, weight_decay=0.0)[0]["param_names"]
    assert all(n.startswith("visual.") for n in image_only)
    torch.optim.AdamW(model.param_groups(lr=1e-3, weight_decay=0.1), betas=(0.9, 0.98))  # accepted by torch
