"""Linear-like layers: ``y = a Wᵀ + b`` over any number of positions per example."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from dpclip.clipping.norms import GhostNorm, gram_sq_norm, norm_dtype, row_sq_norms
from dpclip.clipping.rules.base import MEMORY_WEIGHT, Rule, register

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["INPUT_MAJOR_LINEAR", "LINEAR", "InputMajorLinearRule", "LinearRule"]


class LinearRule(Rule):
    """``y = a Wᵀ + b`` over any number of positions per example."""

    def _rows(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
        a = call.by_example(call.activations[0])
        return a.to(call.backprop.dtype), call.by_example(call.backprop)

    def has_ghost(self, call: LayerCall) -> bool:
        return True

    def costs(self, call: LayerCall) -> tuple[float, float]:
        a = call.by_example(call.activations[0])
        t, d = a.shape[1], a.shape[2]
        p = call.shape[-1]
        # both pay T·d·p once: ghost for the clipped sum, per-sample for the gradients
        return (t * t * (d + p) + t * d * p, t * d * p + MEMORY_WEIGHT * d * p)

    def ghost_sq_norms(self, call: LayerCall, rows: torch.Tensor | None = None) -> GhostNorm:
        a, g = self._rows(call)
        # in norm_dtype throughout: the clipped sum adds these same numbers in it
        dtype = norm_dtype(g.dtype) if rows is None else torch.float64
        if rows is not None:
            a, g = a[rows], g[rows]
        a, g = a.to(dtype), g.to(dtype)
        if "weight" in call.targets:
            return gram_sq_norm(a, g, bias="bias" in call.targets)
        return GhostNorm(row_sq_norms(g.sum(dim=1)))

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        a, g = self._rows(call)
        out = {}
        if "weight" in call.targets:
            out["weight"] = self._per_sample_weight(a, g)
        if "bias" in call.targets:
            out["bias"] = g.sum(dim=1)
        return out

    @staticmethod
    def _per_sample_weight(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Σ_t g_itᵀ a_it per example, [B, out, in] as W is stored."""
        return torch.bmm(g.transpose(1, 2), a)

    def clipped_sum(self, call: LayerCall, factors: torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
        if call.per_sample is not None:
            return super().clipped_sum(call, factors, out)
        # Σ_i c_i Σ_t g_itᵀ a_it sums over all rows: take them in the order they are stored
        # (inside attention, position-major), so that no activation is copied to reorder it
        dtype = next(iter(out.values())).dtype  # the accumulator's: at least float32
        x, g = call.activations[0], call.backprop
        if x.dtype != g.dtype:  # the input as the layer used it (rounded to bfloat16 under
            x = x.to(g.dtype)  # autocast), as in the norm
        a = x.reshape(-1, x.shape[-1])
        a = a if a.dtype == dtype else a.to(dtype)
        g = g if g.dtype == dtype else g.to(dtype)
        factors = factors.to(dtype)
        if "weight" in call.targets and a.shape[-1] < g.shape[-1]:
            # Σ_i c_i g_iᵀ a_i with the factors on the narrower of the two (one copy of it)
            out["weight"].addmm_(g.reshape(-1, g.shape[-1]).t(), call.scale_by_example(a, factors))
            if "bias" in call.targets:  # Σ_i c_i Σ_t g_it without a scaled copy of g
                out["bias"].addmv_(call.example_sums(g).t(), factors)
            return
        g = call.scale_by_example(g, factors)
        if "weight" in call.targets:
            out["weight"].addmm_(g.t(), a)
        if "bias" in call.targets:
            out["bias"].add_(g.sum(dim=0))


class InputMajorLinearRule(LinearRule):
    """``y = a W + b`` with W stored [in, out]: Hugging Face's ``Conv1D`` (GPT-2), and
    ``torch.addmm(b, a, W)`` and ``a @ W`` recorded from the operation by
    ``dpclip.clipping.functions``. The same norms as ``LinearRule``; W's gradient is
    the transpose."""

    @staticmethod
    def _per_sample_weight(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        # [B, in, out] as W is stored: a transposed [B, out, in] would be copied by the
        # clipped sum (and cost as much to compute)
        return torch.bmm(a.transpose(1, 2), g)

    def clipped_sum(self, call: LayerCall, factors: torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
        if call.per_sample is None and "weight" in out:
            # the parent adds Σ gᵀa into an [out, in] accumulator: give it the transposed view
            out = {**out, "weight": out["weight"].t()}
        super().clipped_sum(call, factors, out)


#: The linear rule, also used for the projections inside attention layers.
LINEAR = LinearRule()
#: The rule for ``a W + b`` with W stored [in, out] (``torch.addmm``, ``matmul``).
INPUT_MAJOR_LINEAR = InputMajorLinearRule()
register(nn.Linear, LINEAR)


def _is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` subclass that computes what ``nn.Linear`` does (Opacus's
    ``RNNLinear`` inside DPLSTM/DPGRU/DPRNN, run once per time step) and owns no other
    parameter."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and set(module._parameters) <= {"weight", "bias"}
    )


register(_is_plain_linear, LINEAR)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` itself (GPT-2, GPT, ...), whose forward is
    ``addmm(b, x.view(-1, nx), W).view(..., nf)`` with W [nx, nf]: a module hook records it
    as a layer, which under gradient checkpointing takes its input from the region's re-run
    (recorded by its operation, it kept the input from the forward). A subclass, or one
    whose forward was replaced, is recorded by its operations."""
    cls = type(module)
    forward = getattr(cls, "forward", None)
    if (
        cls.__name__ != "Conv1D" or cls.__module__ != "transformers.pytorch_utils" or "forward" in vars(module)
        or getattr(forward, "__module__", None) != cls.__module__ or getattr(forward, "__qualname__", None) != "Conv1D.forward"
    ):
        return False  # (also a forward replaced on the class)
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    return (
        set(module._parameters) == {"weight", "bias"} and weight is not None and weight.dim() == 2
        and bias is not None and bias.shape == weight.shape[1:]
    )


register(_is_hf_conv1d, INPUT_MAJOR_LINEAR)
