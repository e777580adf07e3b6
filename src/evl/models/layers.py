"""Small building blocks shared by the CLIP encoders and the decoders."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm that computes in float32 and casts back, so a half-precision backbone stays stable (CLIP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation_layer(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":  # SigLIP's gelu_pytorch_tanh
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; expected 'quick_gelu', 'gelu' or 'gelu_tanh'")


def preview_keys(keys: list[str], limit: int = 5) -> str:
    """The first ``limit`` keys, for one-line error messages."""
    return str(keys[:limit]) + ("..." if len(keys) > limit else "")


def load_exact_subset(
    module: nn.Module,
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    source: str,
    model_note: str = "",
    shape_hint: str = "",
) -> None:
    """Load ``state`` into ``module`` when its keys and shapes are exactly those of ``own`` (the part of the
    module's state a checkpoint holds); otherwise a one-line ValueError naming ``source``."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model{model_note}: missing {preview_keys(missing)}, "
            f"unexpected {preview_keys(unexpected)}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{source}: {key} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(own[key].shape)}{shape_hint}"
            )
    module.load_state_dict(state, strict=False)


class TrainableStateModule(nn.Module):
    """A video model whose checkpoints hold only the part of its state that trains.

    Subclasses say which ``state_dict`` keys that is (:meth:`_checkpoint_keys`) and how a mismatch is
    explained (:meth:`_mismatch_notes`); saving and the strict, one-line-error loading are the same for all.
    """

    def _checkpoint_keys(self) -> Callable[[str], bool]:
        """Whether a ``state_dict`` key belongs in a checkpoint (asked once per save or load)."""
        raise NotImplementedError

    def _mismatch_notes(self) -> tuple[str, str]:
        """(what to say about the model, a likely cause of a shape mismatch) for load errors."""
        return "", ""

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the ``state_dict`` entries :meth:`_checkpoint_keys` keeps."""
        keep = self._checkpoint_keys()
        return {k: v for k, v in self.state_dict().items() if keep(k)}

    def load_trainable_state_dict(
        self, state: Mapping[str, torch.Tensor], source: str = "checkpoint"
    ) -> None:
        """Strict load of :meth:`trainable_state_dict`, with one-line errors for mismatched keys or shapes."""
        model_note, shape_hint = self._mismatch_notes()
        load_exact_subset(
            self, self.trainable_state_dict(), state, source, model_note=model_note, shape_hint=shape_hint
        )


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's tensors (names and float32 values): what identifies the very weights that
    produced something, e.g. a feature cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
