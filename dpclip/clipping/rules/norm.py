"""Normalisation layers: ``nn.LayerNorm`` / ``nn.GroupNorm``."""

from __future__ import annotations

import math
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
            out["weight"] = torch.einsum("btn,btn->bn", x_hat, g).reshape(batch, *shape)
        if "bias" in call.targets:
            out["bias"] = g.sum(dim=1).reshape(batch, *shape)
        return out


_NORM = NormRule()
register(nn.LayerNorm, _NORM)
register(nn.GroupNorm, _NORM)
