"""Embedding lookups: ``nn.Embedding``, and any ``F.embedding`` call on a trainable
weight (recorded by ``dpclip.clipping.functions``: subclasses such as Hugging Face's
scaled or positional embeddings, lookups on ids without a batch dimension)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from dpclip.clipping.norms import GhostNorm, gram_unit, norm_dtype, scale_rows
from dpclip.clipping.rules.base import MEMORY_WEIGHT, Rule, register

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["EmbeddingRule", "embedding_rule"]


class EmbeddingRule(Rule):
    """A dense lookup ``F.embedding(ids, weight, padding_idx)`` (no ``max_norm``, no
    ``scale_grad_by_freq``): the per-sample gradient adds g_it to row id_it, so
    ‖∇ ℓ_i‖² = Σ_{s,t} [id_is = id_it] g_is·g_it. The rows of ``padding_idx`` get none.

    Args:
        padding_idx: the id whose row gets no gradient (non-negative), or None.
    """

    def __init__(self, padding_idx: int | None = None) -> None:
        self.padding_idx = padding_idx

    def _rows(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
        ids = call.activations[0].reshape(call.backprop.shape[0], -1)
        g = call.backprop.reshape(ids.shape[0], ids.shape[1], -1)
        if self.padding_idx is not None:
            g = g * (ids != self.padding_idx).unsqueeze(-1).to(g.dtype)
        return ids, g

    def has_ghost(self, call: LayerCall) -> bool:
        return True

    def costs(self, call: LayerCall) -> tuple[float, float]:
        t = call.activations[0][0].numel()
        v, d = call.targets["weight"][0].shape
        return (t * t * (d + 1) + t * d, t * d + MEMORY_WEIGHT * v * d)

    def ghost_sq_norms(self, call: LayerCall, rows: torch.Tensor | None = None) -> GhostNorm:
        ids, g = self._rows(call)
        if rows is not None:
            ids, g = ids[rows], g[rows].double()
        g = g.to(norm_dtype(g.dtype))
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
        product = torch.bmm(g, g.transpose(1, 2)).mul_(same)
        # the rounding scale counts the pairs of equal ids only: Σ_{s,t same} ‖g_s‖‖g_t‖
        lengths = product.diagonal(dim1=1, dim2=2).sqrt()
        scale = torch.bmm(same, lengths.unsqueeze(2)).squeeze(2).mul_(lengths).sum(dim=1)
        return GhostNorm(product.sum(dim=(1, 2)), scale, gram_unit(g.dtype, g.device, g.shape[1], g.shape[2]))

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        ids, g = self._rows(call)
        b, v = ids.shape[0], call.targets["weight"][0].shape[0]
        offsets = (torch.arange(b, device=ids.device) * v).unsqueeze(1)
        flat = torch.zeros(b * v, g.shape[-1], dtype=g.dtype, device=g.device)
        flat.index_add_(0, (ids + offsets).flatten(), g.reshape(-1, g.shape[-1]))
        return {"weight": flat.view(b, v, -1)}

    def clipped_sum(self, call: LayerCall, factors: torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
        if call.per_sample is not None:
            return super().clipped_sum(call, factors, out)
        ids, g = self._rows(call)
        g = scale_rows(g, factors).to(out["weight"].dtype)
        out["weight"].index_add_(0, ids.flatten(), g.reshape(-1, g.shape[-1]))


_BY_PADDING: dict[int | None, EmbeddingRule] = {}


def embedding_rule(padding_idx: int | None) -> EmbeddingRule:
    """The rule for dense lookups with this (normalised, non-negative) ``padding_idx``."""
    if padding_idx not in _BY_PADDING:
        _BY_PADDING[padding_idx] = EmbeddingRule(padding_idx)
    return _BY_PADDING[padding_idx]


def _embedding_rule(module: nn.Embedding) -> Rule | None:
    if not module.sparse and module.max_norm is None and not module.scale_grad_by_freq:
        return embedding_rule(module.padding_idx)
    return None


register(nn.Embedding, _embedding_rule)
