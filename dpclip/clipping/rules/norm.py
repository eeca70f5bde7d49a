"""Normalisation layers: ``nn.LayerNorm`` / ``nn.GroupNorm``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpclip.clipping.rules.base import Rule, register

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["NormRule"]


class NormRule(Rule):
    """``nn.LayerNorm`` / ``nn.GroupNorm``: y = x̂·γ + β with x̂ normalised per example, so
    ∇γ ℓ_i = Σ_positions g_i·x̂_i and ∇β ℓ_i = Σ_positions g_i, as many numbers per example
    as the layer has parameters: per-sample gradients are the cheap way to the norm."""

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        layer = call.module
        x, g = call.activations[0].to(call.backprop.dtype), call.backprop
        batch = g.shape[0]
        if isinstance(layer, nn.LayerNorm):
            shape = tuple(layer.normalized_shape)
            n = math.prod(shape)
            x_hat = F.layer_norm(x, shape, eps=layer.eps).reshape(batch, -1, n)
            g = g.reshape(batch, -1, n)
        else:  # channels are dim 1: [B, C, L] seen as [B, L, C]
            shape = (layer.num_channels,)
            x_hat = F.group_norm(x, layer.num_groups, eps=layer.eps)
            x_hat = x_hat.reshape(batch, shape[0], -1).transpose(1, 2)
            g = g.reshape(batch, shape[0], -1).transpose(1, 2)
        out = {}
        if "weight" in call.targets:
            # a product and a sum: einsum runs this as a batched matmul of strided copies (8x slower)
            out["weight"] = (x_hat * g).sum(dim=1).reshape(batch, *shape)
        if "bias" in call.targets:
            out["bias"] = g.sum(dim=1).reshape(batch, *shape)
        return out

    def abs_sum(self, call: LayerCall, out: Mapping[str, torch.Tensor]) -> None:
        # x̂ = (x − μ)·rstd cancels in x − μ, with rounding up to eps·(|x| + |μ|)·rstd: that,
        # not |x̂|, scales the rounding of ∇γ (a LayerNorm over one feature has x̂ = 0)
        layer = call.module
        x, g = call.activations[0].to(call.backprop.dtype), call.backprop.abs()
        batch = g.shape[0]
        if isinstance(layer, nn.LayerNorm):
            shape = tuple(layer.normalized_shape)
            x, g = x.reshape(batch, -1, math.prod(shape)), g.reshape(batch, -1, math.prod(shape))
            bound = _magnitude(x, layer.eps)
        else:
            shape = (layer.num_channels,)
            bound = _magnitude(x.reshape(batch, layer.num_groups, -1), layer.eps)
            bound = bound.reshape(batch, shape[0], -1).transpose(1, 2)
            g = g.reshape(batch, shape[0], -1).transpose(1, 2)
        if "weight" in call.targets:
            out["weight"].add_((g * bound).sum(dim=(0, 1)).reshape(shape))
        if "bias" in call.targets:
            out["bias"].add_(g.sum(dim=(0, 1)).reshape(shape))


def _magnitude(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(|x| + |μ|)·rstd over the last dimension: a bound on |x̂| and on its rounding's scale."""
    mean = x.mean(dim=-1, keepdim=True)
    rstd = (x.var(dim=-1, unbiased=False, keepdim=True) + eps).rsqrt()
    return (x.abs() + mean.abs()) * rstd


_NORM = NormRule()
register(nn.LayerNorm, _NORM)
register(nn.GroupNorm, _NORM)
