"""``nn.EmbeddingBag``: each example is one bag, whose output is the sum, mean or max
over its entries' embedding rows (Opacus's per-sample rule loses an id repeated in a
bag, so dpclip has its own)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from dpclip.clipping.norms import GhostNorm, norm_dtype
from dpclip.clipping.rules.base import MEMORY_WEIGHT, Rule, register

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["EmbeddingBagRule"]

_MODES = {"sum": 0, "mean": 1, "max": 2}


class EmbeddingBagRule(Rule):
    """``nn.EmbeddingBag`` (modes sum, mean, max; ``per_sample_weights``, ``padding_idx``,
    2-D input or 1-D input with offsets, ``include_last_offset``), one bag per example.

    For sum and mean, entry j of bag i adds w_j·G_i to row id_j (w_j: its per-sample
    weight, 1, or 1/(bag size) for mean; 0 for padding), so
    ‖∇ ℓ_i‖² = ‖G_i‖² · Σ_rows (Σ_{j in bag i, id_j = row} w_j)². For max, each feature d
    of G_i goes to the row that gave the bag's maximum in d, so ‖∇ ℓ_i‖² = ‖G_i‖² for a
    bag that is not empty."""

    def _entries(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [N], bag of each entry [N], w [N]) for sum/mean; for max, (row [B, D] that
        gave each maximum, bag [B], 1 for bags that are not empty [B])."""
        bag_layer: nn.EmbeddingBag = call.module
        ids, offsets, weights = _inputs(call.activations)
        g = call.backprop
        if ids.dim() == 2:
            bags = ids.shape[0]
            offsets = torch.arange(0, ids.numel(), max(ids.shape[1], 1), device=ids.device)[:bags]
            ids = ids.reshape(-1)
            weights = None if weights is None else weights.reshape(-1)
            include_last = False
        else:
            bags, include_last = g.shape[0], bag_layer.include_last_offset
        n = ids.shape[0]
        position = torch.arange(n, device=ids.device)
        bag = torch.bucketize(position, offsets[:bags], right=True) - 1
        keep = bag >= 0
        if include_last:
            keep &= position < offsets[bags]
        if bag_layer.padding_idx is not None:
            keep &= ids != bag_layer.padding_idx
        bag = bag.clamp(min=0)
        w = keep.to(g.dtype) if weights is None else weights.to(g.dtype) * keep
        counts = torch.zeros(bags, dtype=g.dtype, device=g.device).index_add_(0, bag, keep.to(g.dtype))
        if bag_layer.mode == "mean":
            w = w / counts.clamp(min=1)[bag]
        if bag_layer.mode != "max":
            return ids, bag, w
        with torch.no_grad():  # the rows PyTorch's own forward took the maxima from
            max_rows = torch.embedding_bag(
                bag_layer.weight, ids, offsets[: bags + include_last], False, _MODES["max"],
                False, None, include_last, bag_layer.padding_idx,
            )[3]
        return max_rows.reshape(bags, -1), torch.arange(bags, device=g.device), (counts > 0).to(g.dtype)

    def has_ghost(self, call: LayerCall) -> bool:
        return True

    def costs(self, call: LayerCall) -> tuple[float, float]:
        layer: nn.EmbeddingBag = call.module
        d, v = layer.embedding_dim, layer.num_embeddings
        n = call.activations[0].numel() / call.shape[0]  # entries per bag
        return (n * 8 + d, n * d + MEMORY_WEIGHT * v * d)

    def ghost_sq_norms(self, call: LayerCall, rows: torch.Tensor | None = None) -> GhostNorm:
        # (no Gram matrix: nothing cancels but the weights of one id, summed once)
        sq = self._sq_norms(call)
        return GhostNorm(sq if rows is None else sq[rows].double())

    def _sq_norms(self, call: LayerCall) -> torch.Tensor:
        g = call.backprop.to(norm_dtype(call.backprop.dtype))
        sq = g.square().sum(dim=1)
        rows, bag, w = self._entries(call)
        if call.module.mode == "max":
            return sq * w.to(sq.dtype)
        # Σ over (bag, row) of (Σ w_j)²: entries with the same id in one bag add up first
        key = bag * call.module.num_embeddings + rows
        unique, inverse = torch.unique(key, return_inverse=True)
        per_key = torch.zeros(unique.shape[0], dtype=sq.dtype, device=sq.device)
        per_key.index_add_(0, inverse, w.to(sq.dtype))
        weight_sq = torch.zeros_like(sq).index_add_(
            0, unique // call.module.num_embeddings, per_key.square()
        )
        return sq * weight_sq

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        b, (v, d) = call.backprop.shape[0], call.module.weight.shape
        eye = torch.eye(b, dtype=call.backprop.dtype, device=call.backprop.device)
        flat = torch.zeros(b, v * d, dtype=call.backprop.dtype, device=call.backprop.device)
        for i in range(b):  # example i's gradient: the clipped sum with factors e_i
            self._add(call, eye[i], flat[i].view(v, d))
        return {"weight": flat.view(b, v, d)}

    def clipped_sum(self, call: LayerCall, factors: torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
        if call.per_sample is not None:
            return super().clipped_sum(call, factors, out)
        self._add(call, factors, out["weight"])

    def _add(self, call: LayerCall, factors: torch.Tensor, out: torch.Tensor) -> None:
        """Add Σ_i c_i ∇ ℓ_i into ``out`` [V, D]."""
        g = call.backprop.to(out.dtype) * factors.to(out.dtype).unsqueeze(1)
        rows, bag, w = self._entries(call)
        if call.module.mode == "max":
            d = g.shape[1]
            flat = (rows * d + torch.arange(d, device=g.device)).reshape(-1)
            values = (g * w.to(g.dtype).unsqueeze(1)).reshape(-1)
            keep = rows.reshape(-1) >= 0
            out.view(-1).index_add_(0, flat[keep], values[keep])
            return
        out.index_add_(0, rows, g[bag] * w.to(g.dtype).unsqueeze(1))


def _inputs(activations: list) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(input, offsets, per_sample_weights) of a call ``bag(input, offsets, per_sample_weights)``."""
    padded = [*activations, None, None][:3]
    return padded[0], padded[1], padded[2]


_EMBEDDING_BAG = EmbeddingBagRule()


def _embedding_bag_rule(module: nn.EmbeddingBag) -> Rule:
    unsupported = [
        name for name, value in (
            ("max_norm", module.max_norm is not None),
            ("scale_grad_by_freq=True", module.scale_grad_by_freq),
            ("sparse=True", module.sparse),
        ) if value
    ]
    if unsupported:
        raise ValueError(
            f"nn.EmbeddingBag with {', '.join(unsupported)} is not supported: max_norm "
            "renormalises rows in place during the forward, scale_grad_by_freq scales each "
            "gradient by counts over the whole batch (examples would depend on each other), "
            "and sparse gradients cannot be clipped per example; build the layer without them"
        )
    return _EMBEDDING_BAG


register(nn.EmbeddingBag, _embedding_bag_rule)
