"""The decoder's GPU formulation ("batched": an op count that does not grow with the batch) against its CPU
formulation and the straightforward modules, and the op counts themselves. Device-sensitive tests run on
the ``device`` fixture (EVL_TEST_DEVICE)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evl.config import model_preset
from evl.devices import resolve_formulation, resolve_precision
from evl.models.evl import (
    EVL,
    FrameFeatures,
    TemporalConv,
    TemporalCrossAttention,
    TemporalPosEmbed,
    temporal_residual,
)
from evl.models.layers import weights_fingerprint
from evl.opcount import count_decoder_step
from factories import assert_same_outputs_and_grads, random_maps, randomize_, tiny_config


def decoder_features(model: EVL, batch: int, device: torch.device, seed: int = 1) -> list[FrameFeatures]:
    vision, t = model.config.backbone, model.config.decoder.num_frames
    p = vision.grid_size**2
    g = torch.Generator().manual_seed(seed)
    return [
        FrameFeatures(
            torch.randn(batch, t, p + 1, vision.width, generator=g).to(device),
            random_maps(batch, 2, t - 1, patches=p, generator=g).to(device),
        )
        for _ in model.blocks
    ]


def loss_and_grads(model: EVL, features, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model.forward_head(features)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recompute", [False, True])
def test_batched_decoder_equals_the_cpu_formulation_logits_and_every_gradient(device, recompute):
    torch.manual_seed(0)
    model = randomize_(EVL(tiny_config(num_frames=5, num_layers=2))).to(device).train()
    features = decoder_features(model, batch=3, device=device)
    labels = torch.tensor([0, 4, 2], device=device)
    results = {}
    for formulation in ("cpu", "batched"):
        model.decoder.formulation, model.decoder.checkpoint_memory = formulation, recompute
        results[formulation] = loss_and_grads(model, features, labels)
    (fast_logits, fast_grads), (slow_logits, slow_grads) = results["batched"], results["cpu"]
    torch.testing.assert_close(fast_logits, slow_logits, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == slow_grads.keys()
    assert len(fast_grads) == len([p for p in model.parameters() if p.requires_grad])
    for name, grad in slow_grads.items():
        scale = max(grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5 * scale, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kernel", [3, 5])
def test_batched_temporal_residual_equals_conv_plus_embedding_with_gradients(device, kernel):
    g = torch.Generator().manual_seed(0)
    conv, pos = TemporalConv(6, kernel).to(device), TemporalPosEmbed(5, 6).to(device)
    params = [*conv.parameters(), *pos.parameters()]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(3, 5, 7, 6, generator=g).to(device).requires_grad_()
    fast = temporal_residual(x, conv, pos, batched=True)
    slow = x + conv(x) + pos()
    assert_same_outputs_and_grads(fast, slow, (x, *params), ["x", "weight", "bias", "embed"])


# Tokens before the patches: SigLIP none, CLIP its class token, DINOv2 with 2 registers three.
@pytest.mark.parametrize("prefix", [0, 1, 3])
@pytest.mark.parametrize("batched", [True, False])
def test_cross_frame_kernels_equal_the_gathered_formulation_with_gradients(device, prefix, batched):
    g = torch.Generator().manual_seed(0)
    module = TemporalCrossAttention(6, 3, 5, prefix_tokens=prefix).to(device)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    y = torch.randn(3, 4, prefix + 15, 6, generator=g).to(device).requires_grad_()
    attn = random_maps(3, 2, 3, patches=15, generator=g).to(device)
    fast = module.add_to(y * 1, attn, batched=batched)
    module.materialize = True  # the paper's gathered [P, P, C] table
    slow = module.add_to(y, attn)
    assert torch.equal(slow[:, :, :prefix], y[:, :, :prefix])  # class and register tokens receive nothing
    inputs = (y, module.w_prev, module.w_next)
    assert_same_outputs_and_grads(fast, slow, inputs, ["y", "w_prev", "w_next"])


def test_formulation_follows_the_device_unless_set():
    assert resolve_formulation("auto", torch.device("cpu")) == "cpu"
    assert resolve_formulation("auto", torch.device("cuda")) == "batched"
    assert resolve_formulation("cpu", torch.device("cuda")) == "cpu"
    with pytest.raises(ValueError, match="formulation must be one of"):
        resolve_formulation("loops", torch.device("cpu"))
    decoder = EVL(tiny_config()).decoder
    assert decoder.execution(torch.device("cpu")) == (False, True)  # CPU: loops, memory recomputed
    assert decoder.execution(torch.device("cuda")) == (True, False)  # GPU: batched, memory stored
    decoder.checkpoint_memory = True
    assert decoder.execution(torch.device("cuda")) == (True, True)


def test_batched_op_count_does_not_grow_with_the_batch():
    config = tiny_config(num_frames=4, num_layers=2)
    batched = [count_decoder_step(config, b, "batched")["non_view_ops"] for b in (1, 9, 40)]
    loops = [count_decoder_step(config, b, "cpu", recompute=True)["non_view_ops"] for b in (1, 9, 40)]
    assert max(batched) <= 1.2 * batched[0]
    assert loops[2] > 2 * loops[0]  # the CPU formulation loops over clips: the contrast that matters
    recomputed = [count_decoder_step(config, b, "batched", recompute=True) for b in (1, 40)]
    assert all(r["recompute_memory"] for r in recomputed)
    assert recomputed[1]["non_view_ops"] <= 1.2 * recomputed[0]["non_view_ops"]


def test_b16_decoder_step_at_batch_32_dispatches_at_most_1500_ops():
    config = model_preset("evl-b16", num_frames=8)
    at_32 = count_decoder_step(config, 32, "batched")
    at_1 = count_decoder_step(config, 1, "batched")
    assert at_32["formulation"] == "batched" and not at_32["recompute_memory"]
    assert at_32["non_view_ops"] <= 1500
    assert at_32["non_view_ops"] <= 1.2 * at_1["non_view_ops"]


def test_frozen_backbone_is_stored_in_its_compute_dtype_and_keeps_its_fingerprint(device):
    model = EVL(tiny_config())
    before = weights_fingerprint(model.backbone)
    model.to(device)
    dtype = resolve_precision("auto", device) if device.type == "cuda" else torch.float32
    assert {p.dtype for p in model.backbone.parameters()} == {dtype}
    assert {p.dtype for p in model.decoder.parameters()} == {torch.float32}  # trained in float32
    assert model.backbone_fingerprint() == before
    video = torch.randn(2, 4, 3, 24, 24, device=device)
    with torch.no_grad():
        assert model(video).dtype == torch.float32
