"""Ghost norms of calls that share one weight: tied input and output embeddings (GPT-2,
T5, BART: the lookup and the LM head), or a linear layer run more than once per example.

Each call adds Σ_t u_t v_tᵀ to the shared weight's per-example gradient (an ``nn.Linear``
``W [out, in]``: u the output gradient, v the input; a lookup into ``E [rows, d]``: u the
one-hot row of the id, v the output gradient), so the group's gradient is one sum over
the positions of all its calls, and its squared norm one Gram product over them:
Σ_{t,s} (u_t·u_s)(v_t·v_s). That is exact and holds [B, N, N] for N positions in all,
where summing the calls' per-example gradients holds two [B, rows, d] (GPT-2 small's tied
embedding: 147 MiB an example, against 4 MiB for 512 + 512 positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from dpclip.clipping.norms import GhostNorm, gram_scale, gram_unit, norm_dtype
from dpclip.clipping.rules.embedding import EmbeddingRule
from dpclip.clipping.rules.linear import LinearRule

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["SharedWeightGhost", "shared_weight_ghost"]


class SharedWeightGhost:
    """The ghost norm of a group of calls sharing one weight (and perhaps biases), as a
    call whose rule is itself: a ``GhostPart``'s second look calls
    ``call.rule.ghost_sq_norms(call, rows)``."""

    def __init__(self, calls: Sequence[LayerCall]) -> None:
        self.calls = tuple(calls)

    @property
    def rule(self) -> "SharedWeightGhost":
        return self

    def ghost_sq_norms(self, call: "SharedWeightGhost | None" = None, rows: torch.Tensor | None = None) -> GhostNorm:
        """‖Σ over the calls of their per-example gradients‖² per example (of ``rows``
        only, in float64, for a second look)."""
        parts = [_factors(c) for c in self.calls]
        if rows is not None:
            parts = [(u[rows], v[rows], bias) for u, v, bias in parts]
        dtype = torch.float64 if rows is not None else norm_dtype(parts[0][1].dtype)
        # the positions of linear calls first, then the lookups': any one order serves both
        # Gram matrices, and this one makes each kind's products one call over all its calls
        # (a DPLSTM's cell runs once per time step: hundreds of calls)
        parts = sorted(parts, key=lambda part: not part[0].is_floating_point())
        dense = [u.to(dtype) for u, _, _ in parts if u.is_floating_point()]
        ids = [u for u, _, _ in parts if not u.is_floating_point()]
        v = torch.cat([v.to(dtype) for _, v, _ in parts], dim=1)
        product = torch.bmm(v, v.transpose(1, 2))
        biases = [bias for _, _, bias in parts]
        if any(b is not None for b in biases):  # (v, 1)·(v', 1) where the two share a bias
            index = {id(b): i for i, b in enumerate(biases) if b is not None}
            label = torch.cat([
                torch.full((v.shape[1],), -1 if b is None else index[id(b)], device=product.device)
                for (_, v, _), b in zip(parts, biases)
            ])
            product += ((label.unsqueeze(1) == label.unsqueeze(0)) & (label >= 0).unsqueeze(1)).to(dtype)
        n = sum(u.shape[1] for u in dense)
        ud = torch.cat(dense, dim=1) if dense else None
        ui = torch.cat(ids, dim=1) if ids else None
        if ud is not None:
            product[:, :n, :n].mul_(torch.bmm(ud, ud.transpose(1, 2)))
        if ui is not None:
            product[:, n:, n:].mul_((ui.unsqueeze(2) == ui.unsqueeze(1)).to(dtype))
        if ud is not None and ui is not None:  # a one-hot row's product with u_s: u_s at the id
            across = ud.gather(2, ui.unsqueeze(1).expand(-1, n, -1))
            product[:, :n, n:].mul_(across)
            product[:, n:, :n].mul_(across.transpose(1, 2))
        widths = [v.shape[2] + any(b is not None for b in biases)]
        if ud is not None:
            widths.append(ud.shape[2])
        unit = gram_unit(dtype, v.device, v.shape[1], *widths)
        return GhostNorm(product.sum(dim=(1, 2)), gram_scale(product), unit)


def shared_weight_ghost(calls: Sequence[LayerCall]) -> SharedWeightGhost | None:
    """The group's ghost norm where every call is a plain linear layer or a dense lookup
    on the same whole weight (besides, a linear call's bias, shared or not), none is set
    to per-sample gradients, and the Gram matrix over all positions is at most as large
    as a [rows, d] per-example gradient; else None (the group's per-example gradients are
    summed)."""
    weight = None
    positions = 0
    for call in calls:
        if type(call.rule) not in (LinearRule, EmbeddingRule) or call.strategy == "per_sample":
            return None
        if call.per_sample is not None or any(rows is not None for _, rows in call.targets.values()):
            return None
        if set(call.targets) - {"weight", "bias"} or "weight" not in call.targets:
            return None
        if isinstance(call.rule, EmbeddingRule) and "bias" in call.targets:
            return None
        p = call.targets["weight"][0]
        if weight is not None and p is not weight:
            return None
        weight = p
        positions += _positions(call)
    if weight is None or weight.dim() != 2:
        return None
    forced = any(c.strategy == "ghost" for c in calls)
    # it holds about two [B, N, N] (the Gram product, one block of it), the summed path two
    # [B, rows, d] (the sum, one call's per-example gradients)
    if not forced and positions * positions > weight.numel():
        return None
    return SharedWeightGhost(calls)


def _positions(call: LayerCall) -> int:
    """The positions per example of the call: its rows of u and v."""
    if isinstance(call.rule, EmbeddingRule):
        return call.activations[0].numel() // call.backprop.shape[0]
    return call.by_example(call.backprop).shape[1]


def _factors(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor, nn.Parameter | None]:
    """(u, v, bias): u [B, T, rows] (or ids [B, T], the one-hot rows), v [B, T, d]."""
    if isinstance(call.rule, EmbeddingRule):
        ids, g = call.rule._rows(call)  # (padding positions' g is zero)
        return ids, g, None
    a, g = call.rule._rows(call)
    bias = call.targets.get("bias")
    return g, a, None if bias is None else bias[0]
