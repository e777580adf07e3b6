"""Mixed precision: the decoder under bf16 and fp16 autocast against float32 (forward and every gradient),
the dtype each custom kernel computes in, precision choices per device, training in half precision through
the engine (the scaler resumes) and through the CLI, and the CLI's one-line refusal of an unknown
precision."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from evl.cli import main as cli_main
from evl.config import TrainConfig
from evl.devices import autocast, native_half_dtype, needs_grad_scaler, resolve_precision
from evl.engine.checkpoint import load_checkpoint
from evl.engine.train import train
from evl.models.evl import (
    EVL,
    FrameFeatures,
    TemporalConv,
    TemporalCrossAttention,
    TemporalPosEmbed,
    temporal_residual,
)
from evl.models.layers import LayerNorm
from evl.models.ops.attention import attend_memory
from factories import random_maps, randomize_, tiny_config, tiny_dataset, tiny_run, train_flags

# Relative L2 errors against float32, about 3x what this test measures (bf16 keeps 8 significant bits,
# fp16 11): logits; each parameter's gradient, relative to its own norm or, for gradients that are
# mathematically zero (the key bias cancels in the softmax), to 1e-3 of the whole gradient's norm.
TOLERANCES = {
    torch.bfloat16: {"logits": 2e-2, "grad": 6e-2},
    torch.float16: {"logits": 4e-3, "grad": 1e-2},
}


def relative_error(value: torch.Tensor, reference: torch.Tensor, floor: float = 0.0) -> float:
    return ((value.float() - reference).norm() / max(reference.norm().item(), floor, 1e-30)).item()


def decoder_step(model: EVL, dtype: torch.dtype, device: torch.device):
    vision, t = model.config.backbone, model.config.decoder.num_frames
    p = vision.grid_size**2
    g = torch.Generator().manual_seed(1)
    features = [
        FrameFeatures(
            torch.randn(3, t, p + 1, vision.width, generator=g).to(device),
            random_maps(3, 2, t - 1, patches=p, generator=g).to(device),
        )
        for _ in model.blocks
    ]
    model.zero_grad(set_to_none=True)
    with autocast(dtype, device):
        logits = model.forward_head(features)
    F.cross_entropy(logits.float(), torch.tensor([0, 3, 4], device=device)).backward()  # outside autocast
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("formulation", ["cpu", "batched"])
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoder_under_autocast_matches_float32_logits_and_every_gradient(
    device, formulation, recompute, dtype
):
    torch.manual_seed(0)
    model = randomize_(EVL(tiny_config(num_layers=2))).to(device).train()
    model.decoder.formulation, model.decoder.checkpoint_memory = formulation, recompute
    ref_logits, ref_grads = decoder_step(model, torch.float32, device)
    logits, grads = decoder_step(model, dtype, device)
    assert logits.dtype == dtype  # the head's matmul did run in half precision
    assert relative_error(logits, ref_logits) <= TOLERANCES[dtype]["logits"]
    assert grads.keys() == ref_grads.keys()
    assert len(grads) == len([p for p in model.parameters() if p.requires_grad])
    whole = torch.cat([g.flatten() for g in ref_grads.values()]).norm().item()
    for name, reference in ref_grads.items():
        assert grads[name].dtype == torch.float32, name  # parameters and their gradients stay float32
        error = relative_error(grads[name], reference, floor=1e-3 * whole)
        assert error <= TOLERANCES[dtype]["grad"], (name, error)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_custom_kernels_compute_in_float32_under_autocast_and_run_backward(device, dtype):
    """Each CPU-tuned kernel declares float32: under autocast its output is float32 and its backward runs
    on the half-precision gradient that flows in from the layers around it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 10, 8, generator=g).to(device).requires_grad_()
    conv, pos = TemporalConv(8).to(device), TemporalPosEmbed(4, 8).to(device)
    cross = TemporalCrossAttention(8, 3, 3).to(device)
    with torch.no_grad():
        cross.w_prev.normal_()
        cross.w_next.normal_()
    attn = random_maps(2, 2, 3, patches=9, generator=g).to(device)
    norm = LayerNorm(8).to(device)
    keys = torch.randn(2, 3, 8, generator=g).to(device).requires_grad_()
    bias = torch.zeros(2, 3, 1, device=device)
    with autocast(dtype, device):
        memory = cross.add_to(temporal_residual(x, conv, pos), attn)
        assert memory.dtype == torch.float32
        lean = attend_memory(keys, bias, memory.flatten(1, 2), norm)
        plain = attend_memory(keys, bias, norm(memory.flatten(1, 2)))
        assert lean.dtype == plain.dtype == torch.float32
        out = torch.nn.functional.linear(lean + plain, torch.eye(8, device=device))  # a half-precision op
    assert out.dtype == dtype
    out.float().sum().backward()
    for tensor in (x, keys, conv.weight, pos.embed, cross.w_prev, cross.w_next, norm.weight):
        assert tensor.grad is not None and tensor.grad.dtype == torch.float32
        assert torch.isfinite(tensor.grad).all()


def test_precision_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == torch.float32  # CPUs emulate half precision
    assert resolve_precision("bfloat16", cpu) == torch.bfloat16
    for capability, expected in [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert native_half_dtype(cuda) == expected
        assert resolve_precision("auto", cuda) == expected
    assert needs_grad_scaler(torch.float16) and not needs_grad_scaler(torch.bfloat16)


def test_unknown_precision_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"train.precision must be one of auto, float32, bfloat16, float16"):
        TrainConfig(precision="bf16")


# ------------------------------------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"), frames=8)


def train_args(dataset, run_dir, precision, steps=2):
    return train_flags(
        dataset, run_dir, "--batch-split", "2", "--warmup-steps", "0", "--eval-every", str(steps),
        "--save-every", "1", "--decoder-layers", "2", "--precision", precision, steps=steps,
    )  # fmt: skip


def half_run(dataset, precision, steps=2):
    return tiny_run(
        dataset, "train.batch_split=2", "train.warmup_steps=0", f"train.eval_every={steps}",
        "train.save_every=1", "decoder.num_layers=2", f"train.precision={precision}", steps=steps,
    )  # fmt: skip


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_trains_in_half_precision(dataset, tmp_path, precision):
    run_dir = tmp_path / precision
    result = train(half_run(dataset, precision), run_dir, progress=False)
    assert result.step == 2 and math.isfinite(result.final_loss)
    checkpoint = load_checkpoint(run_dir)
    assert all(t.dtype == torch.float32 for t in checkpoint.model_state.values())
    # float16 trains with a gradient scaler, whose state a resumed run needs; bfloat16 needs none.
    assert ("scaler" in checkpoint.train_state) == (precision == "float16")
    if precision == "float16":
        assert checkpoint.train_state["scaler"]["scale"] > 0
        # Resuming restores the scaler and continues.
        assert train(half_run(dataset, precision, steps=3), run_dir, progress=False).step == 3
        assert load_checkpoint(run_dir).step == 3


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_cli_trains_in_half_precision(dataset, tmp_path, capsys, precision):
    assert cli_main(train_args(dataset, tmp_path / precision, precision, steps=1)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 1 and math.isfinite(summary["final_loss"])


def test_cli_rejects_an_unknown_precision_in_one_line(dataset, tmp_path, capsys):
    assert cli_main(train_args(dataset, tmp_path / "run", "half")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.precision must be one of" in err
