"""The clipped update one example at a time, with plain autograd: the reference the
framework tests compare a σ = 0 step with."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def clipped_update(model: nn.Module, batches, max_grad_norm: float, logical_batch: float) -> list[torch.Tensor]:
    """Σ_i min(1, C/‖g_i‖) g_i / L over the examples of ``batches`` ((x, y) pairs), g_i the
    gradient of the cross-entropy of example i alone, per parameter of ``model``."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        for i in range(y.shape[0]):
            grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            for t, g in zip(total, grads):
                t.add_(torch.clamp(max_grad_norm / norm, max=1.0) * g)
    return [t / logical_batch for t in total]
