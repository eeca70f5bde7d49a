"""Per-layer rules: per-sample gradient norms and the clipped gradient sum of one
layer call, from the activations of its forward and the gradient of its output
(one backward pass, book-keeping: Bu et al., "Differentially private
optimization on large model at small cost", ICML 2023).

For a layer call with input a and output gradient g, per example i:

- ghost norm (Li et al. 2022): ‖∇W ℓ_i‖² = Σ_{s,t} (a_is·a_it)(g_is·g_it), cost ~T²(d+p)
  per example for T positions, d inputs, p outputs, nothing of size p·d kept;
- per-sample gradient: ∇W ℓ_i = Σ_t g_itᵀ a_it materialised, cost ~T·p·d and
  memory B·p·d;
- clipped sum: Σ_i c_i ∇W ℓ_i = Σ_i Σ_t (c_i g_it)ᵀ a_it, the layer's ordinary
  weight gradient with each example's output gradient scaled by c_i: no second
  backward pass through the model.

Mixed ghost clipping (Bu et al., NeurIPS 2022) picks, per layer, the cheaper of
the first two from the shapes. The costs counted here (``Rule.costs``) are
multiply-adds per example, with each number of a materialised per-sample
gradient counted ``MEMORY_WEIGHT`` times: it is written, read for the norm and
read again for the clipped sum, at memory speed rather than matrix-multiply
speed. For a Linear layer that is ghost when T²(d+p) < 64·p·d.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.grad_sample.grad_sample_module import GradSampleModule

__all__ = [
    "LINEAR",
    "STRATEGIES",
    "LayerCall",
    "Rule",
    "Target",
    "norm_dtype",
    "row_sq_norms",
    "rule_for",
    "scale_rows",
    "sq_norms",
]

#: Strategy names: "auto" (cheaper of the two by shape), "ghost", "per_sample".
STRATEGIES = ("auto", "ghost", "per_sample")

#: Cost of one number of a materialised per-sample gradient, in multiply-adds. It is
#: written once and read twice at memory speed (~16 multiply-adds' time on CPU), and it
#: stays in memory until the clipping factors are known, alongside every layer's
#: activations and output gradients; 64 makes "auto" keep per-sample gradients only where
#: they are small next to the ghost norm's work (convolutions, long sequences of narrow
#: layers), so that accumulating keeps its memory advantage.
MEMORY_WEIGHT = 64.0

#: A parameter, or a block of its leading rows (``nn.MultiheadAttention`` projects q, k
#: and v with row blocks of one ``in_proj_weight``).
Target = tuple[nn.Parameter, slice | None]


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-sample norms, clipping factors and clipped sums are computed in: at
    least float32. In bfloat16 (8-bit mantissa) a norm is off by up to ~0.4 %, and so
    would be c_i·‖g_i‖ against C; in float32 the bound holds to ~1e-7."""
    return torch.promote_types(dtype, torch.float32)

@dataclass(eq=False)
class LayerCall:
    """One forward call of a layer whose gradient has a rule.

    ``targets`` maps the rule's roles ("weight", "bias") to the trainable
    parameters (or row blocks) they fill; frozen ones are left out.
    """

    rule: "Rule"
    module: nn.Module
    activations: list[Any]
    output: torch.Tensor
    targets: dict[str, Target]
    strategy: str = "auto"
    #: B when rows are ordered (position, example), as inside attention; None: batch first
    batch_inner: int | None = None
    backprop: torch.Tensor | None = None
    per_sample: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.versions = self.current_versions()

    def by_example(self, t: torch.Tensor) -> torch.Tensor:
        """An activation or output gradient as [B, T, features] (T positions per example)."""
        if self.batch_inner is None:
            return t.reshape(t.shape[0], -1, t.shape[-1])
        return t.reshape(-1, self.batch_inner, t.shape[-1]).transpose(0, 1)

    def row_factors(self, factors: torch.Tensor, rows: int) -> torch.Tensor:
        """Per-example factors [B] spread over the call's ``rows`` rows in their own order."""
        repeats = rows // factors.shape[0]
        if self.batch_inner is None:
            return factors.repeat_interleave(repeats)
        return factors.repeat(repeats)

    def release(self) -> None:
        """Drop the activations and output gradient (their memory) once the call no longer
        needs them: per-sample gradients computed, or its clipped sum added."""
        self.activations = []
        self.backprop = None

    def current_versions(self) -> tuple[int, ...]:
        """Version counters of the output and the tensor inputs (in-place changes bump them)."""
        tensors = [self.output, *(a for a in self.activations if isinstance(a, torch.Tensor))]
        return tuple(t._version for t in tensors)

    def uses_ghost(self) -> bool:
        if self.strategy == "per_sample" or not self.rule.has_ghost(self):
            return False
        if self.strategy == "ghost":
            return True
        ghost, per_sample = self.rule.costs(self)
        return ghost < per_sample


class Rule:
    """How a layer type's parameter gradients follow from (activations, output gradient)."""

    def has_ghost(self, call: LayerCall) -> bool:
        return False

    def costs(self, call: LayerCall) -> tuple[float, float]:
        """(ghost, per-sample) multiply-adds per example for this call (rules with a ghost norm)."""
        raise NotImplementedError(f"{type(self).__name__} has no ghost norm")

    def ghost_sq_norms(self, call: LayerCall) -> torch.Tensor:
        """Σ over targets of ‖∇ ℓ_i‖², shape [B], without per-sample gradients."""
        raise NotImplementedError(f"{type(self).__name__} has no ghost norm")

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        """{role: ∇ ℓ_i stacked over i}, each [B, *target shape]."""
        raise NotImplementedError

    def clipped_sum(self, call: LayerCall, factors: torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
        """Add Σ_i c_i ∇ ℓ_i for per-example factors c (shape [B]) into ``out[role]``,
        in place (the accumulator: no parameter-sized temporary where avoidable)."""
        grads = call.per_sample if call.per_sample is not None else self.per_sample_grads(call)
        for role, g in grads.items():
            target = out[role]
            g, c = g.to(target.dtype), factors.to(target.dtype)
            if target.is_contiguous():
                target.view(-1).addmv_(g.reshape(g.shape[0], -1).t(), c)
            else:
                target.add_(torch.einsum("b,b...->...", c, g))


def sq_norms(call: LayerCall) -> torch.Tensor:
    """Σ over the call's targets of ‖∇ ℓ_i‖², shape [B]; keeps per-sample gradients
    on the call when it computes them (the clipped sum then reuses them)."""
    if call.uses_ghost():
        return call.rule.ghost_sq_norms(call)
    call.per_sample = call.rule.per_sample_grads(call)
    return sum(row_sq_norms(g) for g in call.per_sample.values())


def scale_rows(t: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Example i's slice of a batch-first tensor times c_i (factors: shape [B]), in
    ``norm_dtype`` (a factor rounded to bfloat16 would move c_i·‖g_i‖ off C)."""
    dtype = norm_dtype(t.dtype)
    return t.to(dtype) * factors.to(dtype).view(-1, *([1] * (t.dim() - 1)))


def row_sq_norms(g: torch.Tensor) -> torch.Tensor:
    """‖g_i‖² per leading index in ``norm_dtype``, in one pass (no squared copy of a large tensor)."""
    return torch.linalg.vector_norm(
        g.reshape(g.shape[0], -1), dim=1, dtype=norm_dtype(g.dtype)
    ).square()


def _gram_sq_norm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_tᵀ a_t‖²_F per example for a [B, T, d], g [B, T, p], in O(T²(d+p)), in ``norm_dtype``."""
    dtype = norm_dtype(g.dtype)
    a, g = a.to(dtype), g.to(dtype)
    if a.shape[1] == 1:
        return row_sq_norms(a) * row_sq_norms(g)
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))


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
        p = call.backprop.shape[-1]
        # both pay T·d·p once: ghost for the clipped sum, per-sample for the gradients
        return (t * t * (d + p) + t * d * p, t * d * p + MEMORY_WEIGHT * d * p)

    def ghost_sq_norms(self, call: LayerCall) -> torch.Tensor:
        a, g = self._rows(call)
        # in norm_dtype throughout: the clipped sum adds these same numbers in it
        a, g = a.to(norm_dtype(g.dtype)), g.to(norm_dtype(g.dtype))
        total = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        if "weight" in call.targets:
            total = total + _gram_sq_norm(a, g)
        if "bias" in call.targets:
            total = total + row_sq_norms(g.sum(dim=1))
        return total

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        a, g = self._rows(call)
        out = {}
        if "weight" in call.targets:
            out["weight"] = torch.bmm(g.transpose(1, 2), a)
        if "bias" in call.targets:
            out["bias"] = g.sum(dim=1)
        return out

    def clipped_sum(self, call: LayerCall, factors: torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
        if call.per_sample is not None:
            return super().clipped_sum(call, factors, out)
        # Σ_i c_i Σ_t g_itᵀ a_it sums over all rows: take them in the order they are stored
        # (inside attention, position-major), so that no activation is copied to reorder it
        dtype = next(iter(out.values())).dtype  # the accumulator's: at least float32
        x, g = call.activations[0], call.backprop
        a, g = x.reshape(-1, x.shape[-1]).to(dtype), g.reshape(-1, g.shape[-1]).to(dtype)
        g = g * call.row_factors(factors.to(dtype), g.shape[0]).unsqueeze(1)
        if "weight" in call.targets:
            out["weight"].addmm_(g.t(), a)
        if "bias" in call.targets:
            out["bias"].add_(g.sum(dim=0))


class ConvRule(Rule):
    """``nn.Conv1d`` / ``nn.Conv2d`` with groups = 1 and zero padding given as numbers:
    a linear layer over the unfolded input patches (T = output positions)."""

    def _patches(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
        conv: nn.Conv1d | nn.Conv2d = call.module
        x, g = call.activations[0], call.backprop
        if isinstance(conv, nn.Conv1d):
            x, g = x.unsqueeze(-2), g.unsqueeze(-2)
            kernel, dilation, padding, stride = (
                (1, conv.kernel_size[0]),
                (1, conv.dilation[0]),
                (0, conv.padding[0]),
                (1, conv.stride[0]),
            )
        else:
            kernel, dilation, padding, stride = conv.kernel_size, conv.dilation, conv.padding, conv.stride
        a = F.unfold(x.to(g.dtype), kernel, dilation=dilation, padding=padding, stride=stride)
        return a.transpose(1, 2), g.flatten(2).transpose(1, 2)  # [B, T, C·k], [B, T, p]

    def has_ghost(self, call: LayerCall) -> bool:
        return True

    def costs(self, call: LayerCall) -> tuple[float, float]:
        conv = call.module
        t = call.backprop[0, 0].numel()
        d = conv.in_channels * conv.weight[0, 0].numel()
        p = conv.out_channels
        return (t * t * (d + p) + t * d * p, t * d * p + MEMORY_WEIGHT * d * p)

    def ghost_sq_norms(self, call: LayerCall) -> torch.Tensor:
        g = call.backprop.to(norm_dtype(call.backprop.dtype))
        total = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        if "weight" in call.targets:
            total = total + _gram_sq_norm(*self._patches(call))
        if "bias" in call.targets:
            total = total + row_sq_norms(g.flatten(2).sum(dim=2))
        return total

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        g = call.backprop
        out = {}
        if "weight" in call.targets:
            out["weight"] = self._per_sample_weight(call)
        if "bias" in call.targets:
            out["bias"] = g.flatten(2).sum(dim=2)
        return out

    @staticmethod
    def _per_sample_weight(call: LayerCall) -> torch.Tensor:
        """∇W ℓ_i for every i as one convolution: the input's channels become the batch,
        each example's output gradient a kernel of its own group (as torch's expanded
        weights; faster than unfolding on CPU, where the patches are large)."""
        conv = call.module
        g = call.backprop
        x = call.activations[0].to(g.dtype)
        batch, cin, cout = g.shape[0], x.shape[1], g.shape[1]
        fn = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d
        w = fn(
            x.transpose(0, 1),
            g.reshape(batch * cout, 1, *g.shape[2:]),
            None,
            stride=conv.dilation,
            padding=conv.padding,
            dilation=conv.stride,
            groups=batch,
        )
        for dim, size in enumerate(conv.kernel_size, start=2):
            w = w.narrow(dim, 0, size)
        # contiguous once, so the norm and the clipped sum read it without copying
        return w.reshape(cin, batch, cout, *w.shape[2:]).movedim(0, 2).contiguous()

    def clipped_sum(self, call: LayerCall, factors: torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
        if call.per_sample is not None:
            return super().clipped_sum(call, factors, out)
        conv = call.module
        x = call.activations[0]
        g = scale_rows(call.backprop, factors)  # in norm_dtype, as the ghost norm was
        if "weight" in call.targets:
            weight_grad = torch.nn.grad.conv1d_weight if isinstance(conv, nn.Conv1d) else torch.nn.grad.conv2d_weight
            out["weight"].add_(weight_grad(
                x.to(g.dtype), conv.weight.shape, g, conv.stride, conv.padding, conv.dilation, conv.groups
            ))
        if "bias" in call.targets:
            out["bias"].add_(g.flatten(2).sum(dim=(0, 2)))


class EmbeddingRule(Rule):
    """``nn.Embedding`` (dense, no ``max_norm``, no ``scale_grad_by_freq``): the per-sample
    gradient adds g_it to row id_it, so ‖∇ ℓ_i‖² = Σ_{s,t} [id_is = id_it] g_is·g_it."""

    def _rows(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
        emb: nn.Embedding = call.module
        ids = call.activations[0].reshape(call.backprop.shape[0], -1)
        g = call.backprop.reshape(ids.shape[0], ids.shape[1], -1)
        if emb.padding_idx is not None:
            g = g * (ids != emb.padding_idx).unsqueeze(-1).to(g.dtype)
        return ids, g

    def has_ghost(self, call: LayerCall) -> bool:
        return True

    def costs(self, call: LayerCall) -> tuple[float, float]:
        t = call.activations[0][0].numel()
        d, v = call.module.embedding_dim, call.module.num_embeddings
        return (t * t * (d + 1) + t * d, t * d + MEMORY_WEIGHT * v * d)

    def ghost_sq_norms(self, call: LayerCall) -> torch.Tensor:
        ids, g = self._rows(call)
        g = g.to(norm_dtype(g.dtype))
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
        return (torch.bmm(g, g.transpose(1, 2)) * same).sum(dim=(1, 2))

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        ids, g = self._rows(call)
        b, v = ids.shape[0], call.module.num_embeddings
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


class NormRule(Rule):
    """``nn.LayerNorm`` / ``nn.GroupNorm``: y = x̂·γ + β with x̂ normalised per example, so
    ∇γ ℓ_i = Σ_positions g_i·x̂_i and ∇β ℓ_i = Σ_positions g_i, as many numbers per example
    as the layer has parameters: per-sample gradients are the cheap way to the norm."""

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        layer = call.module
        x, g = call.activations[0].to(call.backprop.dtype), call.backprop
        batch = g.shape[0]
        if isinstance(layer, nn.LayerNorm):
            shape = tuple(layer.normalized_shape)
            n = math.prod(shape)
            x_hat = F.layer_norm(x, shape, eps=layer.eps).reshape(batch, -1, n)
            g = g.reshape(batch, -1, n)
        else:  # channels are dim 1: [B, C, L] seen as [B, L, C]
            shape = (layer.num_channels,)
            x_hat = F.group_norm(x, layer.num_groups, eps=layer.eps)
            x_hat = x_hat.reshape(batch, shape[0], -1).transpose(1, 2)
            g = g.reshape(batch, shape[0], -1).transpose(1, 2)
        out = {}
        if "weight" in call.targets:
            out["weight"] = torch.einsum("btn,btn->bn", x_hat, g).reshape(batch, *shape)
        if "bias" in call.targets:
            out["bias"] = g.sum(dim=1).reshape(batch, *shape)
        return out


class OpacusRule(Rule):
    """Per-sample gradients from Opacus's rule for the layer type (InstanceNorm, RMSNorm,
    grouped or 3-d convolutions, …), for layers without a rule of dpclip's own."""

    def __init__(self, sampler: Callable[..., dict[nn.Parameter, torch.Tensor]]) -> None:
        self.sampler = sampler

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        grads = self.sampler(call.module, call.activations, call.backprop)
        out = {}
        for role, (p, _) in call.targets.items():
            if p not in grads:
                raise RuntimeError(
                    f"Opacus's per-sample rule for {type(call.module).__name__} gave no gradient "
                    f"for its {role}"
                )
            out[role] = grads[p]
        return out


#: The linear rule, also used for the projections inside attention layers.
LINEAR = LinearRule()
_CONV, _EMBEDDING, _NORM = ConvRule(), EmbeddingRule(), NormRule()
_OPACUS: Mapping[type, Callable[..., Any]] = GradSampleModule.GRAD_SAMPLERS


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this exact module type and configuration, or None (then the
    clipper takes per-sample gradients through the recorded graph)."""
    kind = type(module)
    if kind is nn.Linear:
        return LINEAR
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None  # Opacus's conv rule unfolds with zero padding of the given size
        if kind in (nn.Conv1d, nn.Conv2d) and module.groups == 1:
            return _CONV
    if kind in (nn.LayerNorm, nn.GroupNorm):
        return _NORM
    if kind is nn.Embedding:
        if not module.sparse and module.max_norm is None and not module.scale_grad_by_freq:
            return _EMBEDDING
        return None
    sampler = _OPACUS.get(kind)
    return OpacusRule(sampler) if sampler is not None else None
