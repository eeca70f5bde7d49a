"""Elementwise scale and shift by a parameter: ``y = x ⊙ w`` and ``y = x + b`` with the
parameter broadcast over the leading dimensions of a batch-first x (the weight of an
RMS normalisation, T5's ``T5LayerNorm`` and Llama's ``LlamaRMSNorm``; a hand-written
scale and shift), recorded from the operation by ``dpclip.clipping.functions``.

Per example i, summing over the positions t the parameter is broadcast across:
∇w ℓ_i = Σ_t x_it ⊙ g_it and ∇b ℓ_i = Σ_t g_it, as many numbers per example as the
parameter has: per-sample gradients are the cheap way to the norm, and the clipped
sum is their factor-weighted sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dpclip.clipping.norms import norm_dtype
from dpclip.clipping.rules.base import Rule

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["SCALE", "SHIFT", "ScaleRule", "ShiftRule"]


def _by_position(t: torch.Tensor, size: int) -> torch.Tensor:
    """[B, *positions, *parameter shape] as [B, positions, parameter size] in ``norm_dtype``."""
    return t.to(norm_dtype(t.dtype)).reshape(t.shape[0], -1, size)


class ScaleRule(Rule):
    """``y = x ⊙ w`` (either operand order), activations [x], target role "weight"."""

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        w = call.targets["weight"][0]
        g = call.backprop
        x = _by_position(call.activations[0].to(g.dtype), w.numel())
        g = _by_position(g, w.numel())
        # a product and a sum: einsum runs this as a batched matmul of strided copies (8x slower)
        return {"weight": (x * g).sum(dim=1).reshape(g.shape[0], *w.shape)}


class ShiftRule(Rule):
    """``y = x + b`` (either operand order), no activations, target role "bias"."""

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        b = call.targets["bias"][0]
        g = _by_position(call.backprop, b.numel())
        return {"bias": g.sum(dim=1).reshape(g.shape[0], *b.shape)}


#: ``x ⊙ w`` with a trainable w broadcast over x's leading dimensions.
SCALE = ScaleRule()
#: ``x + b`` with a trainable b broadcast over x's leading dimensions.
SHIFT = ShiftRule()
