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
        parts = [(u if not u.is_floating_point() else u.to(dtype), v.to(dtype), bias) for u, v, bias in parts]
        v = torch.cat([p[1] for p in parts], dim=1)
        product = torch.bmm(v, v.transpose(1, 2))
        sizes = [p[1].shape[1] for p in parts]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for (_, _, bias_c), s, n in zip(parts, starts, sizes):
            for (_, _, bias_d), s2, n2 in zip(parts, starts, sizes):
                if bias_c is not None and bias_c is bias_d:  # (v, 1)·(v', 1): the bias's share
                    product[:, s:s + n, s2:s2 + n2] += 1
        product.mul_(torch.cat([
            torch.cat([_u_block(uc, ud, dtype) for ud, _, _ in parts], dim=2) for uc, _, _ in parts
        ], dim=1))
        widths = [v.shape[2] + any(p[2] is not None for p in parts)]
        dense = [u for u, _, _ in parts if u.is_floating_point()]
        if dense:
            widths.append(dense[0].shape[2])
        unit = gram_unit(dtype, v.device, v.shape[1], *widths)
        return GhostNorm(product.sum(dim=(1, 2)), gram_scale(product), unit)


def shared_weight_ghost(calls: Sequence[LayerCall]) -> SharedWeightGhost | None:
    """The group's ghost norm where every call is a plain linear layer or a dense lookup
    on the same whole weight (besides, a linear call's bias, shared or not), none is set
    to per-sample gradients, and the Gram matrix over all positions is at most as large
    as the two [rows, d] per-example gradients the summed path holds; else None (the
    group's per-example gradients are summed)."""
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
        positions += call.backprop.reshape(call.backprop.shape[0], -1, call.backprop.shape[-1]).shape[1]
    if weight is None or weight.dim() != 2:
        return None
    forced = any(c.strategy == "ghost" for c in calls)
    if not forced and positions * positions > 2 * weight.numel():
        return None
    return SharedWeightGhost(calls)


def _factors(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor, nn.Parameter | None]:
    """(u, v, bias): u [B, T, rows] (or ids [B, T], the one-hot rows), v [B, T, d]."""
    if isinstance(call.rule, EmbeddingRule):
        ids, g = call.rule._rows(call)  # (padding positions' g is zero)
        return ids, g, None
    a, g = call.rule._rows(call)
    bias = call.targets.get("bias")
    return g, a, None if bias is None else bias[0]


def _u_block(uc: torch.Tensor, ud: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Tc, Td]: u_t·u_s for t of one call and s of the other; a one-hot row's product
    with u_s is u_s's entry at the id, with another one-hot row 1 where the ids agree."""
    if not uc.is_floating_point() and not ud.is_floating_point():
        return (uc.unsqueeze(2) == ud.unsqueeze(1)).to(dtype)
    if not uc.is_floating_point():
        return _u_block(ud, uc, dtype).transpose(1, 2)
    if not ud.is_floating_point():
        return uc.gather(2, ud.unsqueeze(1).expand(-1, uc.shape[1], -1))
    return torch.bmm(uc, ud.transpose(1, 2))
