"""``nn.Bilinear``: y = x1ᵀ W x2 + b, W of shape [p, d1, d2], over any number of positions
per example.

For example i with positions t (inputs u_it [d1], v_it [d2], output gradient g_it [p]):

- per-sample gradient: ∇W ℓ_i = Σ_t g_it ⊗ u_it ⊗ v_it, ∇b ℓ_i = Σ_t g_it, cost
  ~T·p·d1·d2 and memory B·p·d1·d2;
- ghost norm: ‖∇W ℓ_i‖² = Σ_{s,t} (g_is·g_it)(u_is·u_it)(v_is·v_it), cost ~T²(p+d1+d2),
  nothing of size p·d1·d2 kept (the linear layer's ghost norm with a third factor);
- clipped sum: Σ_i c_i ∇W ℓ_i = Σ_i Σ_t (c_i g_it) ⊗ u_it ⊗ v_it, the layer's ordinary
  weight gradient with each example's output gradient scaled by its factor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from dpclip.clipping.norms import GhostNorm, gram_scale, gram_unit, norm_dtype, row_sq_norms
from dpclip.clipping.rules.base import MEMORY_WEIGHT, Rule, register

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["BILINEAR", "BilinearRule"]


class BilinearRule(Rule):
    """``y = bilinear(x1, x2, W, b)``, activations [x1, x2] (batch first, the same leading
    shape), target roles "weight" and "bias"."""

    def _rows(self, call: LayerCall, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(x1, x2, g) as [B, T, features] in ``dtype``, the inputs as the layer used them."""
        g = call.backprop
        x1, x2 = (call.by_example(x.to(g.dtype)).to(dtype) for x in call.activations[:2])
        return x1, x2, call.by_example(g).to(dtype)

    def has_ghost(self, call: LayerCall) -> bool:
        return True

    def costs(self, call: LayerCall) -> tuple[float, float]:
        x1, x2 = (call.by_example(x) for x in call.activations[:2])
        t, d1, d2 = x1.shape[1], x1.shape[2], x2.shape[2]
        p = call.shape[-1]
        # both pay T·p·d1·d2 once: ghost for the clipped sum, per-sample for the gradients
        return (t * t * (p + d1 + d2) + t * p * d1 * d2, t * p * d1 * d2 + MEMORY_WEIGHT * p * d1 * d2)

    def ghost_sq_norms(self, call: LayerCall, rows: torch.Tensor | None = None) -> GhostNorm:
        x1, x2, g = self._rows(call, norm_dtype(call.backprop.dtype) if rows is None else torch.float64)
        if rows is not None:
            x1, x2, g = x1[rows], x2[rows], g[rows]
        total = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        scale, unit = None, 0.0
        if "weight" in call.targets:
            grams = [torch.bmm(t, t.transpose(1, 2)) for t in (x1, x2, g)]
            product = grams[0].mul_(grams[1]).mul_(grams[2])
            total = total + product.sum(dim=(1, 2))
            scale = gram_scale(product)
            unit = gram_unit(g.dtype, g.device, g.shape[1], x1.shape[2], x2.shape[2], g.shape[2])
        if "bias" in call.targets:
            total = total + row_sq_norms(g.sum(dim=1))
        return GhostNorm(total, scale, unit)

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        x1, x2, g = self._rows(call, norm_dtype(call.backprop.dtype))
        out = {}
        if "weight" in call.targets:
            out["weight"] = torch.einsum("btp,bti,btj->bpij", g, x1, x2)
        if "bias" in call.targets:
            out["bias"] = g.sum(dim=1)
        return out

    def clipped_sum(self, call: LayerCall, factors: torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
        if call.per_sample is not None:
            return super().clipped_sum(call, factors, out)
        dtype = next(iter(out.values())).dtype  # the accumulator's: at least float32
        x1, x2, g = self._rows(call, dtype)
        g = g * factors.to(dtype).view(-1, 1, 1)
        if "weight" in call.targets:
            out["weight"].add_(torch.einsum("btp,bti,btj->pij", g, x1, x2))
        if "bias" in call.targets:
            out["bias"].add_(g.sum(dim=(0, 1)))


#: The rule for ``nn.Bilinear``.
BILINEAR = BilinearRule()
register(nn.Bilinear, BILINEAR)
