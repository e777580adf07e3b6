"""Random weights in real checkpoint layouts, for loading and parity tests."""

from __future__ import annotations

import torch

from evl.config import DecoderConfig, ModelConfig, RunConfig, VisionConfig
from evl.models.evl import EVL
from evl.recipes import build_run_config
from evl.synth import make_dataset

# A transformers CLIP vision config with odd sizes, which expose swapped axes: width 48, 3 heads of 16,
# MLP 37, a 5x5 grid.
HF_TINY = dict(
    hidden_size=48,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=3,
    image_size=40,
    patch_size=8,
    projection_dim=24,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def random_resblocks(randn, width: int, layers: int, mlp: int) -> dict[str, torch.Tensor]:
    """``transformer.resblocks.N.*`` of a CLIP tower (either side), drawn with ``randn(*shape, std=...)``."""
    state = {}
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        state.update(
            {
                f"{p}.attn.in_proj_weight": randn(3 * width, width, std=width**-0.5),
                f"{p}.attn.in_proj_bias": randn(3 * width, std=0.05),
                f"{p}.attn.out_proj.weight": randn(width, width, std=width**-0.5),
                f"{p}.attn.out_proj.bias": randn(width, std=0.05),
                f"{p}.ln_1.weight": 1 + randn(width, std=0.1),
                f"{p}.ln_1.bias": randn(width, std=0.05),
                f"{p}.ln_2.weight": 1 + randn(width, std=0.1),
                f"{p}.ln_2.bias": randn(width, std=0.05),
                f"{p}.mlp.c_fc.weight": randn(mlp, width, std=width**-0.5),
                f"{p}.mlp.c_fc.bias": randn(mlp, std=0.05),
                f"{p}.mlp.c_proj.weight": randn(width, mlp, std=mlp**-0.5),
                f"{p}.mlp.c_proj.bias": randn(width, std=0.05),
            }
        )
    return state


def random_openai_visual(
    width=48, layers=3, patch=8, image_size=40, mlp=37, output_dim=24, seed=0
) -> dict[str, torch.Tensor]:
    """A CLIP image encoder's state dict under OpenAI ``model.visual`` names, random but well scaled."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    grid = image_size // patch
    state = {
        "class_embedding": randn(width, std=width**-0.5),
        "positional_embedding": randn(grid * grid + 1, width, std=width**-0.5),
        "conv1.weight": randn(width, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
        "ln_pre.weight": 1 + randn(width, std=0.1),
        "ln_pre.bias": randn(width, std=0.05),
        "ln_post.weight": 1 + randn(width, std=0.1),
        "ln_post.bias": randn(width, std=0.05),
        "proj": randn(width, output_dim, std=width**-0.5),
    }
    state.update(random_resblocks(randn, width, layers, mlp))
    return state


def random_official_decoder(
    width=48,
    layers=2,
    frames=4,
    classes=7,
    grid=(5, 5),
    mlp=96,
    conv=True,
    pos=True,
    cross=True,
    seed=1,
) -> dict[str, torch.Tensor]:
    """An official EVL decoder + head state dict (keys as in the official checkpoint, without ``module.``).

    Every tensor is random noise, including those the official code initialises to zero, so that each
    module changes the logits.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    offsets = (2 * grid[0] - 1) * (2 * grid[1] - 1)
    state = {"decoder.cls_token": randn(width, std=1.0)}
    for i in range(layers):
        p = f"decoder.decoder_layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{p}.attn.{name}.weight"] = randn(width, width, std=width**-0.5)
            state[f"{p}.attn.{name}.bias"] = randn(width, std=0.05)
        state[f"{p}.mlp.fc1.weight"] = randn(mlp, width, std=width**-0.5)
        state[f"{p}.mlp.fc1.bias"] = randn(mlp, std=0.05)
        state[f"{p}.mlp.fc2.weight"] = randn(width, mlp, std=mlp**-0.5)
        state[f"{p}.mlp.fc2.bias"] = randn(width, std=0.05)
        for n in (1, 2, 3):
            state[f"{p}.norm{n}.weight"] = 1 + randn(width, std=0.1)
            state[f"{p}.norm{n}.bias"] = randn(width, std=0.05)
        if conv:
            state[f"decoder.temporal_conv.{i}.weight"] = randn(width, 1, 3, std=0.3)
            state[f"decoder.temporal_conv.{i}.bias"] = randn(width, std=0.05)
        if pos:
            state[f"decoder.temporal_pos_embed.{i}"] = randn(frames, width, std=0.5)
        if cross:
            state[f"decoder.cross_attention.{i}.w1"] = randn(offsets, width, std=1.0)
            state[f"decoder.cross_attention.{i}.w2"] = randn(offsets, width, std=1.0)
    state["proj.0.weight"] = 1 + randn(width, std=0.1)
    state["proj.0.bias"] = randn(width, std=0.05)
    state["proj.2.weight"] = randn(classes, width, std=width**-0.5)
    state["proj.2.bias"] = randn(classes, std=0.05)
    return state


def moving_video(batch=2, frames=4, size=40, seed=2) -> torch.Tensor:
    """[B, 3, T, H, W] (official layout): a random image rolled a little each frame, plus noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 3, size, size, generator=g)
    noise = torch.randn(batch, 3, frames, size, size, generator=g)
    shifts = [(0, 3), (3, -3), (2, 1), (-1, 2)]
    frames_ = [
        torch.stack([base[b].roll(tuple(s * t for s in shifts[b % 4]), dims=(1, 2)) for b in range(batch)])
        for t in range(frames)
    ]
    return 0.9 * torch.stack(frames_, dim=2) + 0.3 * noise


# ======================================================================================== CLIP text side
# A transformers CLIP text config with odd sizes: width 48, 3 heads of 16, MLP 37, 3 layers, 16 positions,
# a 1000-token vocabulary whose last two ids play start- and end-of-text (as 49406/49407 do in CLIP's).
HF_TINY_TEXT = dict(
    vocab_size=1000,
    hidden_size=48,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=3,
    max_position_embeddings=16,
    projection_dim=24,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=998,
    eos_token_id=999,
    pad_token_id=0,
)


def random_openai_text(
    width=48, layers=3, context=16, vocab=1000, mlp=37, output_dim=24, seed=0
) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's state dict under OpenAI's top-level names, random but well scaled."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    state = {
        "token_embedding.weight": randn(vocab, width, std=0.5),
        "positional_embedding": randn(context, width, std=0.1),
        "ln_final.weight": 1 + randn(width, std=0.1),
        "ln_final.bias": randn(width, std=0.05),
        "text_projection": randn(width, output_dim, std=width**-0.5),
    }
    state.update(random_resblocks(randn, width, layers, mlp))
    return state


def random_text_ids(lengths, context=16, vocab=1000, sot=998, eot=999, seed=3) -> torch.Tensor:
    """[len(lengths), context] ids shaped like CLIP's: sot, random words, eot at ``lengths[i] - 1``, zeros.

    Words are drawn from 1..sot-1, so eot is each row's largest id, as in CLIP's vocabulary.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, 0] = sot
        ids[row, 1 : length - 1] = torch.randint(1, sot, (length - 2,), generator=g)
        ids[row, length - 1] = eot
    return ids


# ------------------------------------------------------------------------- tiny EVL models and checks


def tiny_config(**decoder) -> ModelConfig:
    vision = VisionConfig(
        width=32, layers=3, heads=2, patch_size=8, image_size=24, mlp_ratio=37 / 32, output_dim=16
    )
    fields = dict(num_frames=4, num_layers=2, num_classes=5, mlp_dropout=0.0, head_dropout=0.0)
    return ModelConfig(backbone=vision, decoder=DecoderConfig(**{**fields, **decoder}), backbone_name="tiny")


def randomize_(model: EVL, seed: int = 0) -> EVL:
    """Overwrite zero-initialised tables so that every module contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def assert_same_outputs_and_grads(fast, slow, inputs, names, seed=1, tol=1e-5):
    """fast == slow (fp32, within ``tol`` of each tensor's scale) and so are the gradients w.r.t. inputs."""
    scale = slow.abs().max().item()
    torch.testing.assert_close(fast, slow, atol=tol * max(scale, 1.0), rtol=0)
    upstream = torch.randn(fast.shape, generator=torch.Generator().manual_seed(seed))
    grads_fast = torch.autograd.grad(fast, inputs, upstream, allow_unused=True)
    grads_slow = torch.autograd.grad(slow, inputs, upstream, allow_unused=True)
    for name, a, b in zip(names, grads_fast, grads_slow, strict=True):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, atol=tol * max(b.abs().max().item(), 1.0), rtol=0, msg=name)


def random_maps(*lead, patches, generator):
    return torch.randn(*lead, patches, patches, generator=generator).mul(3).softmax(-1)


# ------------------------------------------------------------------ tiny synthetic datasets and commands

TINY_BACKBONE = "random:ViT-T/16@112"


def tiny_dataset(root, train_per_class: int = 2, val_per_class: int = 1, frames: int = 10, size: int = 48):
    """Generated mp4 files of the motion task (4 classes), small enough for a test module to train on."""
    return make_dataset(
        root,
        num_train_per_class=train_per_class,
        num_val_per_class=val_per_class,
        num_frames=frames,
        size=size,
        progress=False,
    )


def train_flags(
    dataset, run_dir, *extra: str, steps: int = 2, batch_size: int = 4, val: bool = True
) -> list[str]:
    """``evl train`` arguments for a tiny synthetic ``dataset``: random ViT-T/16 at 112 px, 4 frames,
    no loader workers, quiet. ``extra`` flags come last (a repeated flag takes the last value)."""
    return [
        "train",
        "--data-root", str(dataset.root),
        "--train-list", str(dataset.train_list),
        *(["--val-list", str(dataset.val_list)] if val else []),
        "--classes", str(dataset.classes_file),
        "--backbone", TINY_BACKBONE,
        "--num-frames", "4",
        "--frame-stride", "2",
        "--steps", str(steps),
        "--batch-size", str(batch_size),
        "--num-workers", "0",
        "--output-dir", str(run_dir),
        "--quiet",
        *extra,
    ]  # fmt: skip


def tiny_run(dataset, *overrides: str, steps: int = 2, batch_size: int = 4, val: bool = True) -> RunConfig:
    """The run :func:`train_flags` describes, as the engine takes it (``evl.engine.train.train(run, dir)``).
    ``overrides`` are ``section.key=value`` texts, as ``--set`` takes them."""
    flags = {
        "data.data_root": str(dataset.root),
        "data.train_list": str(dataset.train_list),
        "data.val_list": str(dataset.val_list) if val else None,
        "data.classes": str(dataset.classes_file),
        "backbone.name": TINY_BACKBONE,
        "data.num_frames": 4,
        "data.frame_stride": 2,
        "train.steps": steps,
        "train.batch_size": batch_size,
        "data.num_workers": 0,
    }
    return build_run_config(None, overrides, **flags)
