"""``nn.PReLU`` (and ``F.prelu`` inside a module without a rule, recorded from the
operation by ``dpclip.clipping.functions``): y = max(0, x) + w · min(0, x), with one
slope w shared by all channels or one per channel (dimension 1 of a batch-first x).

Per example i, summing over the positions a slope is used at:
∇w ℓ_i = Σ_positions min(0, x_i) · g_i (per channel), as many numbers per example as the
layer has slopes: per-sample gradients are the cheap way to the norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from dpclip.clipping.norms import norm_dtype
from dpclip.clipping.rules.base import Rule, register

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["PRELU", "PreluRule"]


class PreluRule(Rule):
    """``y = prelu(x, w)``, activations [x] (batch first), target role "weight" (w of
    shape [1] or [C], C the size of x's dimension 1)."""

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        w, (x, g) = call.targets["weight"][0], _operands(call)
        return {"weight": _per_slope(x.clamp(max=0) * g, w)}

    def abs_sum(self, call: LayerCall, out: Mapping[str, torch.Tensor]) -> None:
        # |min(0, x)·g|, not min(0, |x|)·|g| (zero) as the default's |activations| would give
        w, (x, g) = call.targets["weight"][0], _operands(call)
        out["weight"].add_(_per_slope((x.clamp(max=0) * g).abs(), w).sum(dim=0))


def _operands(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as the layer used it, g), both in ``norm_dtype``."""
    g = call.backprop
    dtype = norm_dtype(g.dtype)
    return call.activations[0].to(g.dtype).to(dtype), g.to(dtype)


def _per_slope(contributions: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-position contributions [B, C, ...] (or [B, ...] for one slope) summed per
    example and slope, [B, *w.shape]."""
    batch = contributions.shape[0]
    if w.numel() == 1:
        return contributions.reshape(batch, -1).sum(dim=1).reshape(batch, *w.shape)
    if contributions.dim() < 2 or contributions.shape[1] != w.numel():
        raise ValueError(
            f"PReLU with {w.numel()} slopes needs a batch-first input [B, {w.numel()}, ...] "
            f"(channels in dimension 1), got shape {tuple(contributions.shape)}"
        )
    return contributions.reshape(batch, w.numel(), -1).sum(dim=2).reshape(batch, *w.shape)


#: The rule for ``nn.PReLU`` and ``F.prelu``.
PRELU = PreluRule()
register(nn.PReLU, PRELU)
