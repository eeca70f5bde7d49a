"""A parameter broadcast over the batch: ``cls_token.expand(B, -1, -1)`` concatenated with
the patch embeddings, ``x + position_embeddings`` with position embeddings of shape
[1, T, D], ``x * scale`` with a scale of shape [T, 1], the key and value biases of
``nn.MultiheadAttention(add_bias_kv=True)``; recorded from the operation by
``dpclip.clipping.functions`` and ``dpclip.clipping.attention``.

The operation is given a view P_b of the parameter p expanded over the batch in place of
p (or the expansion the model itself wrote is kept): example i uses only row i of P_b,
so the gradient of P_b in the one backward is, row by row, each example's own, and
∇p ℓ_i is row i summed over the positions p is broadcast across. That is as many numbers
per example as p has: per-sample gradients are the cheap way to the norm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dpclip.clipping.norms import norm_dtype
from dpclip.clipping.rules.base import Rule

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["BROADCAST", "BroadcastRule", "per_example_shape"]


def per_example_shape(param_shape: torch.Size | tuple[int, ...], ndim: int) -> tuple[int, ...] | None:
    """The shape of one example's rows of a parameter of ``param_shape`` broadcast to a
    batch-first tensor of ``ndim`` dimensions: the parameter's shape left-padded with ones
    to ``ndim``, without the batch dimension; None when the parameter does not broadcast
    over the batch (fewer dimensions than it has, or a leading dimension other than 1)."""
    if ndim < max(len(param_shape), 1):
        return None
    padded = (1,) * (ndim - len(param_shape)) + tuple(param_shape)
    return padded[1:] if padded[0] == 1 else None


class BroadcastRule(Rule):
    """Target role "parameter" p; the call's output is P_b, of shape [B, *s] where p,
    left-padded with ones to P_b's dimensions, has a leading 1 and broadcasts to
    [1, *s]; no activations, or the view of p (size-1 dimensions added or dropped)
    that was broadcast instead of p."""

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        p = call.targets["parameter"][0]
        g = call.backprop
        # activations: [the view of p the operation used], a view that only adds or drops
        # dimensions of size 1 (``w[:, None, None]``): broadcast as its shape says
        shape = call.activations[0].shape if call.activations else p.shape
        rows = per_example_shape(shape, g.dim())
        # the positions p is broadcast across within an example's rows
        g = g.to(norm_dtype(g.dtype)).sum_to_size(g.shape[0], *rows)
        return {"parameter": g.reshape(g.shape[0], *p.shape)}


#: The rule for a parameter broadcast over the batch.
BROADCAST = BroadcastRule()
