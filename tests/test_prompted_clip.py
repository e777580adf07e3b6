"""PromptedVideoCLIP (ViFi-CLIP's bridge-and-prompt stage): deep prompts against a literal
reimplementation of the reference, what trains, the context init and prompt text, caching, precision."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from evl.config import SigLIPTextConfig, VisionConfig
from evl.models.clip_text import CLIPTextTransformer, TextConfig, encode_tokens
from evl.models.clip_vit import CLIPVisionTransformer
from evl.models.prompted_clip import (
    DeepPrompts,
    PromptedVideoCLIP,
    prompt_prefix,
    prompt_template,
)
from evl.models.siglip_text import SigLIPTextTransformer
from evl.models.siglip_vit import SigLIPVisionTransformer
from evl.models.vificlip import VIFI_TEMPLATE, VideoCLIP, build_prompts
from evl.tokenizer import default_tokenizer

# Odd sizes (width 40, MLP 37, 3 blocks, 3 frames, 5 classes) expose swapped axes. The text tower has
# CLIP's vocabulary so that the project's tokenizer feeds it.
VISION = VisionConfig(
    width=40, layers=3, heads=2, patch_size=8, image_size=24, output_dim=24, mlp_ratio=37 / 40
)
TEXT = TextConfig(width=32, layers=3, heads=2, context_length=20, output_dim=24, mlp_ratio=37 / 32)
NAMES = ["ride bike", "wave", "jump", "brush hair", "sit"]
A_PHOTO_OF_A = [320, 1125, 539, 320]  # CLIP's BPE ids of "a photo of a"


def towers(seed: int = 0) -> tuple[CLIPVisionTransformer, CLIPTextTransformer]:
    torch.manual_seed(seed)
    visual, text = CLIPVisionTransformer(VISION), CLIPTextTransformer(TEXT)
    # LayerNorms away from 1/0, so that a missed or doubled norm shows.
    with torch.no_grad():
        for module in (visual, text):
            for name, p in module.named_parameters():
                if "ln" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return visual, text


def make_model(
    vision_tokens=3, vision_depth=2, text_tokens=2, text_depth=3, prompt_init="a photo of a", seed=0, **kw
) -> PromptedVideoCLIP:
    visual, text = towers(seed)
    torch.manual_seed(seed + 100)
    model = PromptedVideoCLIP(
        visual,
        text,
        math.log(50.0),
        vision_tokens=vision_tokens,
        vision_depth=vision_depth,
        text_tokens=text_tokens,
        text_depth=text_depth,
        prompt_init=prompt_init,
        **kw,
    )
    model.set_class_tokens(class_tokens(model.template))
    return model


def class_tokens(template: str) -> torch.Tensor:
    prompts = [p for per_class in build_prompts(NAMES, [template]) for p in per_class]
    return default_tokenizer()(prompts, context_length=TEXT.context_length)


def make_video(batch: int = 2, frames: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the reference, literally


def reference_image_embeddings(model: PromptedVideoCLIP, images: torch.Tensor) -> torch.Tensor:
    """The reference's prompted ViT written out: prompts appended after the position embeddings and
    BEFORE ln_pre (normalised with the other tokens), the last n replaced before blocks 1..depth-1."""
    visual, prompts = model.visual, model.vision_prompts.vectors
    depth, n = prompts.shape[:2]
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # [N, h*w, C]
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    x = torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i < depth:
            x = torch.cat([x[:, :-n], prompts[i].expand(x.shape[0], -1, -1)], dim=1)
        x, _ = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def reference_text_embeddings(model: PromptedVideoCLIP, tokens: torch.Tensor) -> torch.Tensor:
    """The reference's prompted text encoder written out: [SOS, context, suffix] embeddings + positions,
    positions 1..n replaced before blocks 1..depth-1, EOT pooling at the largest id."""
    text, prompts = model.text, model.text_prompts.vectors
    depth, n = prompts.shape[:2]
    embedded = text.token_embedding(tokens)
    context = prompts[0].expand(tokens.shape[0], -1, -1)
    x = torch.cat([embedded[:, :1], context, embedded[:, 1 + n :]], dim=1) + text.positional_embedding
    for i, block in enumerate(text.transformer.resblocks):
        if 1 <= i < depth:
            x = torch.cat([x[:, :1], prompts[i].expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
        x, _ = block(x, causal=True)
    x = text.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ text.text_projection


@pytest.mark.parametrize(("vision_depth", "text_depth"), [(1, 1), (2, 3), (3, 2)])
def test_prompted_towers_match_the_reference_written_out(vision_depth, text_depth):
    model = make_model(vision_depth=vision_depth, text_depth=text_depth).eval()
    with torch.no_grad():  # every prompt row non-trivial, the context's too
        model.vision_prompts.vectors.normal_(std=0.5)
        model.text_prompts.vectors.normal_(std=0.5)
    images = make_video().flatten(0, 1)
    tokens = model.class_tokens
    with torch.no_grad():
        torch.testing.assert_close(
            model._encode_frames(images), reference_image_embeddings(model, images), atol=2e-5, rtol=0
        )
        torch.testing.assert_close(
            model._encode_prompts(tokens), reference_text_embeddings(model, tokens), atol=2e-5, rtol=0
        )
        logits = model(make_video())
        video = F.normalize(reference_image_embeddings(model, images).unflatten(0, (2, 3)).mean(1), dim=-1)
        classes = F.normalize(reference_text_embeddings(model, tokens), dim=-1)
        torch.testing.assert_close(logits, 50.0 * video @ classes.t(), atol=1e-4, rtol=0)
    assert logits.std() > 0.1


def _entering_blocks(blocks) -> list[torch.Tensor]:
    """Records the tokens entering each block (forward pre-hooks)."""
    seen: list[torch.Tensor] = []
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def test_vision_prompts_are_replaced_up_to_their_depth_and_carried_beyond():
    model = make_model(vision_tokens=3, vision_depth=2).eval()
    outputs: list[torch.Tensor] = []
    for block in model.visual.transformer.resblocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out[0].detach().clone()))
    entering = _entering_blocks(model.visual.transformer.resblocks)
    images = make_video(batch=1, frames=2).flatten(0, 1)
    with torch.no_grad():
        model._encode_frames(images)
        tokens = 1 + VISION.num_patches
        vectors = model.vision_prompts.vectors
        assert [e.shape[1] for e in entering] == [tokens + 3] * 3
        torch.testing.assert_close(entering[0][:, -3:], model.visual.ln_pre(vectors[0]).expand(2, -1, -1))
        torch.testing.assert_close(entering[0][:, :tokens], model.visual.embed(images))
        assert torch.equal(entering[1][:, -3:], vectors[1].expand(2, -1, -1))  # replaced
        assert torch.equal(entering[1][:, :-3], outputs[0][:, :-3])  # the image tokens carry on
        assert torch.equal(entering[2], outputs[1])  # past the depth: nothing replaced


def test_text_context_is_replaced_up_to_its_depth_and_carried_beyond():
    model = make_model(text_tokens=2, text_depth=2).eval()
    outputs: list[torch.Tensor] = []
    for block in model.text.transformer.resblocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out[0].detach().clone()))
    entering = _entering_blocks(model.text.transformer.resblocks)
    tokens = model.class_tokens
    with torch.no_grad():
        model._encode_prompts(tokens)
        vectors, positions = model.text_prompts.vectors, model.text.positional_embedding
        rows = tokens.shape[0]
        torch.testing.assert_close(entering[0][:, 1:3], (vectors[0] + positions[1:3]).expand(rows, -1, -1))
        plain = model.text.token_embedding(tokens) + positions[: tokens.shape[1]]
        assert torch.equal(entering[0][:, :1], plain[:, :1]) and torch.equal(entering[0][:, 3:], plain[:, 3:])
        assert torch.equal(entering[1][:, 1:3], vectors[1].expand(rows, -1, -1))
        assert torch.equal(entering[1][:, 3:], outputs[0][:, 3:])
        assert torch.equal(entering[2], outputs[1])


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_one_row_per_layer_up_to_the_depth_and_each_one_matters(tower):
    model = make_model(vision_depth=2, text_depth=2).eval()
    vectors = getattr(model, f"{tower}_prompts").vectors
    width = VISION.width if tower == "vision" else TEXT.width
    assert tuple(vectors.shape) == (2, 3 if tower == "vision" else 2, width)
    video = make_video()
    with torch.no_grad():
        before = model(video)
        for row in range(2):
            vectors[row].add_(0.5 * torch.randn_like(vectors[row]))
            model.clear_text_cache()
            after = model(video)
            assert not torch.allclose(before, after, atol=1e-4), row
            before = after


def test_zero_tokens_is_videoclip_exactly():
    visual, text = towers()
    plain = VideoCLIP(copy.deepcopy(visual), copy.deepcopy(text), math.log(50.0), tune="none")
    prompted = PromptedVideoCLIP(visual, text, math.log(50.0), vision_tokens=0, text_tokens=0)
    assert prompted.template == VIFI_TEMPLATE  # the context words stay the ViFi-CLIP prompt
    tokens = class_tokens(prompted.template)
    plain.set_class_tokens(tokens)
    prompted.set_class_tokens(tokens)
    video = make_video()
    assert torch.equal(prompted(video), plain(video))
    assert not any(p.requires_grad for p in prompted.parameters())
    assert prompted.trainable_state_dict() == {}
    # One tower prompted: the other's embeddings are still exactly VideoCLIP's.
    vision_only = make_model(vision_tokens=2, text_tokens=0)
    text_only = make_model(vision_tokens=0, text_tokens=2)
    reference = VideoCLIP(*towers(), math.log(50.0), tune="none")
    reference.set_class_tokens(vision_only.class_tokens)
    with torch.no_grad():
        assert torch.equal(text_only.encode_video(video), reference.encode_video(video))
        assert torch.equal(vision_only.encode_text(), reference.encode_text())


def test_before_block_none_is_bit_identical_to_the_plain_loop():
    visual, text = towers()
    images = make_video().flatten(0, 1)
    tokens = class_tokens(VIFI_TEMPLATE)
    with torch.no_grad():
        x = visual.embed(images)
        for block in visual.transformer.resblocks:
            x, _ = block(x)
        assert torch.equal(visual.forward_features(images), x)
        assert torch.equal(visual.forward_features(images, before_block=lambda i, t: t), x)
        assert torch.equal(visual(images), visual.pool(x))
        y = text.token_embedding(tokens) + text.positional_embedding[: tokens.shape[1]]
        for block in text.transformer.resblocks:
            y, _ = block(y, causal=True)
        y = text.ln_final(y)
        assert torch.equal(encode_tokens(text, tokens, causal=True), y)
        assert torch.equal(encode_tokens(text, tokens, causal=True, before_block=lambda i, t: t), y)
        pooled = y[torch.arange(len(tokens)), text.eot_positions(tokens)] @ text.text_projection
        assert torch.equal(text(tokens), pooled)
    calls = []
    visual.forward_features(images[:1], before_block=lambda i, t: calls.append(i) or t)
    assert calls == [0, 1, 2]  # every block, in order


# ------------------------------------------------------------------------------------------ what trains


def test_only_prompt_vectors_get_gradients():
    model = make_model(vision_tokens=3, vision_depth=2, text_tokens=2, text_depth=3).train()
    F.cross_entropy(model(make_video()), torch.tensor([1, 3])).backward()
    prompts = {"vision_prompts.vectors", "text_prompts.vectors"}
    for name, param in model.named_parameters():
        assert param.requires_grad is (name in prompts), name
        assert model.is_tuned(name) is (name in prompts), name
        if name in prompts:
            for row in param.grad:  # every layer's vectors, every token of it
                assert (row.abs().sum(dim=-1) > 0).all(), name
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    assert sorted(model.trainable_state_dict()) == sorted(prompts)
    (group,) = model.param_groups(lr=8e-3, weight_decay=0.001)
    assert sorted(group["param_names"]) == sorted(prompts) and group["weight_decay"] == 0.001
    # Frozen towers stay in eval mode.
    assert not model.visual.training and not model.text.training and model.vision_prompts.training


def test_trainable_state_round_trip_and_errors():
    source = make_model()
    with torch.no_grad():
        source.vision_prompts.vectors.normal_(std=0.3)
        source.text_prompts.vectors.normal_(std=0.3)
    target = make_model(seed=0)  # same towers, other prompt draws
    target.vision_prompts.vectors.data.zero_()
    video = make_video()
    with torch.no_grad():
        assert not torch.allclose(source.eval()(video), target.eval()(video))
        target.load_trainable_state_dict(source.trainable_state_dict())
        assert torch.equal(target(video), source(video))  # the text cache was dropped on load
    other = make_model(vision_tokens=4)
    with pytest.raises(ValueError, match=r"vision_prompts.vectors has shape \(2, 3, 40\).*token counts"):
        other.load_trainable_state_dict(source.trainable_state_dict())


def test_fixed_classes_keeps_the_vision_prompts():
    model = make_model().eval()
    video = make_video()
    with torch.no_grad():
        fixed = model.fixed_classes()
        torch.testing.assert_close(fixed(video), model(video), atol=1e-5, rtol=0)
    assert fixed.vision_prompts is model.vision_prompts


# ----------------------------------------------------------------------------------- context and prompt


@pytest.mark.parametrize("n", [1, 2, 4])
def test_context_starts_as_the_init_words_embeddings(n):
    model = make_model(text_tokens=n)
    assert model.prefix == "a photo of a" and model.template == "a photo of a {}."
    assert model.prefix_ids.tolist() == A_PHOTO_OF_A[:n]
    embeddings = model.text.token_embedding.weight[A_PHOTO_OF_A[:n]]
    assert torch.equal(model.text_prompts.vectors[0].detach(), embeddings)
    # The deeper layers' rows are drawn N(0, 0.02^2).
    assert model.text_prompts.vectors[1:].std().item() == pytest.approx(0.02, rel=0.3)
    tokenizer = default_tokenizer()
    ids = model.class_tokens[0]
    expected = [
        tokenizer.sot_token_id,
        *A_PHOTO_OF_A,
        *tokenizer.encode("ride bike."),
        tokenizer.eot_token_id,
    ]
    assert ids[: len(expected)].tolist() == expected
    assert tokenizer.decode(ids[1 : len(expected) - 1]) == "a photo of a ride bike ."


@pytest.mark.parametrize(("n", "init"), [(5, "a photo of a"), (7, "a photo of a"), (2, None)])
def test_longer_or_uninitialised_context_is_random_with_placeholder_words(n, init):
    model = make_model(text_tokens=n, prompt_init=init)
    assert model.prefix == " ".join(["X"] * n) == prompt_prefix(n, init)
    assert model.template == prompt_template(n, init) == " ".join(["X"] * n) + " {}."
    tokenizer = default_tokenizer()
    x = tokenizer.encode("X")
    assert len(x) == 1 and model.prefix_ids.tolist() == x * n
    ids = model.class_tokens[3]  # "X ... X brush hair."
    expected = [tokenizer.sot_token_id, *(x * n), *tokenizer.encode("brush hair."), tokenizer.eot_token_id]
    assert ids[: len(expected)].tolist() == expected
    row0 = model.text_prompts.vectors[0].detach()
    assert not torch.equal(row0, model.text.token_embedding.weight[x * n])
    assert row0.std().item() == pytest.approx(0.02, rel=0.5)


def test_prompt_text_is_checked():
    model = make_model(text_tokens=2)
    with pytest.raises(ValueError, match=r"tokenized from the template 'a photo of a \{\}\.'"):
        model.set_class_tokens(class_tokens("a video of {}."))
    with pytest.raises(ValueError, match="'a video' is 2 tokens, fewer than the 3 context tokens"):
        make_model(text_tokens=3, prompt_init="a video")
    with pytest.raises(ValueError, match="no room"):
        make_model(text_tokens=19, prompt_init=None)


# ----------------------------------------------------------------------------------------- caching


def test_prompted_text_is_encoded_every_training_forward_and_cached_inside_text_cache():
    model = make_model().train()
    calls = [0]
    model.text.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    video = make_video()
    model(video)
    model(video)
    assert calls[0] == 2
    with model.text_cache(), torch.no_grad():
        model(video)
        model(video)
    assert calls[0] == 3
    model(video)  # the cache is dropped on leaving the block: the prompts may have changed
    assert calls[0] == 4
    frozen_text = make_model(text_tokens=0).train()
    calls[0] = 0
    frozen_text.text.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    frozen_text(video)
    frozen_text(video)
    assert calls[0] == 1  # nothing on the text side trains: encoded once


# ----------------------------------------------------------------------------------------- precision


def test_bfloat16_autocast_forward_and_backward_on_cpu():
    video, labels = make_video(), torch.tensor([0, 4])
    reference = make_model().train()
    low = make_model(compute_dtype="bfloat16").train()
    loss_ref = F.cross_entropy(reference(video), labels)
    logits = low(video)
    assert logits.dtype == torch.float32
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    loss_ref.backward()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(video), atol=1.0, rtol=0)
    assert not torch.equal(logits.detach(), reference(video).detach())  # the towers ran in bfloat16
    for name in ("vision_prompts", "text_prompts"):
        grad = getattr(low, name).vectors.grad
        ref = getattr(reference, name).vectors.grad
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
        assert F.cosine_similarity(grad.flatten(), ref.flatten(), dim=0) > 0.9, name


# --------------------------------------------------------------------------------------------- refusals


def test_construction_errors():
    visual, text = towers()
    with pytest.raises(ValueError, match="vision_depth must be 1 to the encoder's 3 layers, got 4"):
        PromptedVideoCLIP(visual, text, vision_depth=4)
    with pytest.raises(ValueError, match="text_tokens must be 0 or more, got -1"):
        PromptedVideoCLIP(visual, text, vision_depth=3, text_tokens=-1)
    PromptedVideoCLIP(visual, text, vision_tokens=0, vision_depth=40, text_depth=3)  # no prompts: no depth
    siglip = SigLIPVisionTransformer(
        VisionConfig(
            family="siglip", width=32, layers=2, heads=2, patch_size=8, image_size=24, output_dim=None
        )
    )
    siglip_text = SigLIPTextTransformer(SigLIPTextConfig(width=32, layers=2, heads=2, output_dim=32))
    with pytest.raises(ValueError, match="CLIP's image and text encoders; got SigLIPVisionTransformer"):
        PromptedVideoCLIP(siglip, siglip_text, vision_depth=1, text_depth=1)
    with pytest.raises(ValueError, match="at least one token"):
        DeepPrompts(0, 2, 8)
