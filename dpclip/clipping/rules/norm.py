"""Normalisation layers: ``nn.LayerNorm`` / ``nn.GroupNorm`` / ``nn.InstanceNorm1d/2d/3d``
(without running statistics), and ``F.layer_norm`` /
``F.group_norm`` with a trainable weight or bias in a module without a rule (a
LayerNorm subclass with its own ``forward``, such as ConvNeXt's channels-first one),
recorded from the operation by ``dpclip.clipping.functions``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.instancenorm import _InstanceNorm

from dpclip.clipping.rules.base import Rule, register

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["NORM", "NormRule", "functional_norm_rule"]


class NormRule(Rule):
    """``nn.LayerNorm`` / ``nn.GroupNorm`` / ``nn.InstanceNorm*``: y = x̂·γ + β with x̂
    normalised per example, so
    ∇γ ℓ_i = Σ_positions g_i·x̂_i and ∇β ℓ_i = Σ_positions g_i, as many numbers per example
    as the layer has parameters: per-sample gradients are the cheap way to the norm."""

    def _spec(self, call: LayerCall) -> tuple[tuple[int, ...] | None, int, float]:
        """(normalized_shape for a layer norm, else None; groups of a group norm; eps)."""
        layer = call.module
        if isinstance(layer, nn.LayerNorm):
            return tuple(layer.normalized_shape), 0, layer.eps
        if isinstance(layer, _InstanceNorm):  # a group norm with a group per channel
            return None, layer.num_features, layer.eps
        return None, layer.num_groups, layer.eps

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        normalized, groups, eps = self._spec(call)
        x, g = call.activations[0].to(call.backprop.dtype), call.backprop
        batch = g.shape[0]
        if normalized is not None:
            shape = normalized
            n = math.prod(shape)
            x_hat = F.layer_norm(x, shape, eps=eps).reshape(batch, -1, n)
            g = g.reshape(batch, -1, n)
        else:  # channels are dim 1: [B, C, L] seen as [B, L, C]
            shape = (x.shape[1],)
            x_hat = F.group_norm(x, groups, eps=eps)
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
        normalized, groups, eps = self._spec(call)
        x, g = call.activations[0].to(call.backprop.dtype), call.backprop.abs()
        batch = g.shape[0]
        if normalized is not None:
            shape = normalized
            x, g = x.reshape(batch, -1, math.prod(shape)), g.reshape(batch, -1, math.prod(shape))
            bound = _magnitude(x, eps)
        else:
            shape = (x.shape[1],)
            bound = _magnitude(x.reshape(batch, groups, -1), eps)
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


class FunctionalNormRule(NormRule):
    """``F.layer_norm(x, normalized_shape, w, b, eps)`` (``groups`` 0) or
    ``F.group_norm(x, groups, w, b, eps)`` called in a module's own ``forward``."""

    def __init__(self, normalized_shape: tuple[int, ...] | None, groups: int, eps: float) -> None:
        self.spec = (normalized_shape, groups, eps)

    def _spec(self, call: LayerCall) -> tuple[tuple[int, ...] | None, int, float]:
        return self.spec


_FUNCTIONAL: dict[tuple, FunctionalNormRule] = {}


def functional_norm_rule(normalized_shape: tuple[int, ...] | None, groups: int, eps: float) -> NormRule:
    """The rule for an ``F.layer_norm`` (``normalized_shape``) or ``F.group_norm``
    (``groups``; ``normalized_shape`` None) call with this ``eps``."""
    key = (normalized_shape, groups, eps)
    if key not in _FUNCTIONAL:
        _FUNCTIONAL[key] = FunctionalNormRule(normalized_shape, groups, eps)
    return _FUNCTIONAL[key]


def _is_instance_norm(module: nn.Module) -> bool:
    """``nn.InstanceNorm1d/2d/3d`` with its own forward, normalising by each example's own
    statistics in training and evaluation alike (no running statistics)."""
    return (
        isinstance(module, _InstanceNorm) and type(module).forward is _InstanceNorm.forward
        and not module.track_running_stats
    )


#: The rule of ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.InstanceNorm1d/2d/3d``.
NORM = NormRule()
register(nn.LayerNorm, NORM)
register(nn.GroupNorm, NORM)
register(_is_instance_norm, NORM)
