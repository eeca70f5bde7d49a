"""The arithmetic of per-sample clipping on batch-first tensors: norms, clipping
factors, rows scaled by them, and factor-weighted sums, in at least float32."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

__all__ = [
    "GHOST_ROUNDING_TOLERANCE",
    "GhostNorm",
    "accumulator",
    "add_weighted",
    "clip_factors",
    "gram_scale",
    "gram_sq_norm",
    "gram_unit",
    "matmul_eps",
    "norm_dtype",
    "rounding_eps",
    "row_sq_norms",
    "scale_rows",
]


#: The largest rounding bound of an example's ghost norms (``GhostNorm``), as a share of
#: its ‖g_i‖², that the clipper accepts without computing them again in float64: 0.1 %,
#: so a clipped gradient's norm is within 0.05 % of C by a bound that measured at least
#: five times the actual error on natural inputs (a probabilistic bound: inputs crafted
#: against the BLAS's fixed summation order exceeded it 3×).
GHOST_ROUNDING_TOLERANCE = 1e-3


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-sample norms, clipping factors and clipped sums are computed in: at
    least float32. In bfloat16 (8-bit mantissa) a norm is off by up to ~0.4 %, and so
    would be c_i·‖g_i‖ against C; in float32 the bound holds to ~1e-7."""
    found = _NORM_DTYPES.get(dtype)
    if found is None:  # (torch.promote_types is a dispatched op: hundreds of calls a step)
        found = _NORM_DTYPES[dtype] = torch.promote_types(dtype, torch.float32)
    return found


_NORM_DTYPES: dict[torch.dtype, torch.dtype] = {}


def rounding_eps(dtypes: Iterable[torch.dtype]) -> float:
    """Machine epsilon of the least precise floating-point dtype among ``dtypes`` (float32's
    if none): the relative rounding of a computation that ran in them. Under
    ``torch.autocast`` layers compute in bfloat16 or float16 (eps 2^-7, 2^-10) while the
    parameters and their gradients stay float32."""
    return max(
        (torch.finfo(d).eps for d in dtypes if d.is_floating_point),
        default=torch.finfo(torch.float32).eps,
    )


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-sample clipping factors c_i = min(1, C / ‖g_i‖) (Abadi et al. 2016, Alg. 1).

    Args:
        norms: per-sample L2 gradient norms ‖g_i‖, shape [B], finite and >= 0.
        max_grad_norm: C > 0, the L2 bound each clipped gradient c_i·g_i meets.

    A zero gradient gets factor 1, so c_i·g_i = 0.
    """
    return max_grad_norm / norms.clamp(min=max_grad_norm)


def scale_rows(t: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Example i's slice of a batch-first tensor times c_i (factors: shape [B]), in
    ``norm_dtype`` (a factor rounded to bfloat16 would move c_i·‖g_i‖ off C)."""
    dtype = norm_dtype(t.dtype)
    return t.to(dtype) * factors.to(dtype).view(-1, *([1] * (t.dim() - 1)))


def row_sq_norms(g: torch.Tensor) -> torch.Tensor:
    """‖g_i‖² per leading index in ``norm_dtype``, in one pass (no squared copy of a large
    tensor, and no contiguous copy of a strided one: reducing over the trailing dimensions
    reads it in place, where flattening them first would copy a transposed gradient)."""
    if g.dim() == 1:
        return g.to(norm_dtype(g.dtype)).square()
    return torch.linalg.vector_norm(
        g, dim=tuple(range(1, g.dim())), dtype=norm_dtype(g.dtype)
    ).square()


class GhostNorm(NamedTuple):
    """Per-example squared gradient norms computed without per-example gradients, and
    what bounds their rounding: |sq − exact| ≤ unit·scale, example by example."""

    sq: torch.Tensor  #: [B]
    scale: torch.Tensor | None = None  #: [B]; None where nothing in sq can cancel
    unit: float = 0.0


def gram_sq_norm(a: torch.Tensor, g: torch.Tensor, bias: bool = False) -> GhostNorm:
    """‖Σ_t g_tᵀ a_t‖²_F per example for a [B, T, d], g [B, T, p], in O(T²(d+p)), in
    ``norm_dtype``; with ``bias``, plus ‖Σ_t g_t‖² (a bias's part: a_t with a 1 appended,
    so the input's Gram matrix gains 1 everywhere, and no pass over g of its own). With
    its rounding bound (``gram_scale``, ``gram_unit``); none where T = 1, a product of
    two norms, which cannot cancel."""
    dtype = norm_dtype(g.dtype)
    a, g = a.to(dtype), g.to(dtype)
    if a.shape[1] == 1:
        return GhostNorm((row_sq_norms(a) + 1 if bias else row_sq_norms(a)) * row_sq_norms(g))
    product = torch.bmm(a, a.transpose(1, 2))
    if bias:
        product += 1
    product.mul_(torch.bmm(g, g.transpose(1, 2)))
    unit = gram_unit(dtype, a.device, a.shape[1], a.shape[2] + bias, g.shape[2])
    return GhostNorm(product.sum(dim=(1, 2)), gram_scale(product), unit)


def gram_scale(product: torch.Tensor) -> torch.Tensor:
    """(Σ_t ‖x_t‖‖y_t‖…)² per example, from the diagonal of an elementwise product
    [B, T, T] of Gram matrices (x_t·x_s)(y_t·y_s)…: the rounding of the product's sum
    over (t, s) is at most ``gram_unit`` times this, since each entry's is at most
    ``gram_unit``·‖x_t‖‖x_s‖‖y_t‖‖y_s‖…. It is small against the sum unless the terms
    cancel: an example whose gradient is much smaller than the sum of its positions'
    contributions (large activations whose contributions cancel)."""
    # (Σ_t √d_t)² is the 1/2-"norm" of the diagonal: one call, not four
    return torch.linalg.vector_norm(product.diagonal(dim1=1, dim2=2), 0.5, dim=1)


@functools.lru_cache(maxsize=256)
def gram_unit(dtype: torch.dtype, device: torch.device, positions: int, *widths: int) -> float:
    """The rounding of a sum over T² position pairs of a product of Gram-matrix entries
    (inner products of the given widths), per unit of ``gram_scale``: an inner product
    over w numbers is off by about √w·u times the product of the two vectors' norms, u
    the unit roundoff of the matmul (``matmul_eps`` / 2; Higham & Mary 2019, "A new
    approach to probabilistic rounding error analysis"); the product and the pairwise
    sum over T² terms add √(2·log₂ T) + 1 more. Measured against float64 on cancelling
    inputs (activations of norm up to 10⁴ with alternating sign, common offsets, random)
    and a small transformer, the error stayed below 1/5 of the bound built from this.
    Cached: the clipper clears the cache once per micro-batch, where the matmul
    precision might have been changed."""
    u = matmul_eps(dtype, device) / 2
    return u * (sum(math.sqrt(w) for w in widths) + math.sqrt(2 * math.log2(max(positions, 2))) + 1)


def matmul_eps(dtype: torch.dtype, device: torch.device) -> float:
    """Machine epsilon of a matmul in ``dtype`` on ``device``, as torch is set to run it:
    a float32 one may run in TF32 (eps 2^-10: ``torch.backends.cuda.matmul.fp32_precision
    = "tf32"``, ``allow_tf32``, ``torch.set_float32_matmul_precision("high")``) or in
    bfloat16 (2^-7: precision "medium", or oneDNN's ``"bf16"`` on CPU)."""
    if dtype != torch.float32:
        return torch.finfo(dtype).eps
    try:
        backend = {"cuda": torch.backends.cuda.matmul, "cpu": torch.backends.mkldnn.matmul}[device.type]
        precision = backend.fp32_precision
        if precision == "none":  # (inherits the global setting)
            precision = torch.backends.fp32_precision
    except (KeyError, AttributeError, RuntimeError):  # another device, or an older torch
        try:
            precision = {"high": "tf32", "medium": "bf16"}.get(torch.get_float32_matmul_precision(), "ieee")
        except RuntimeError:  # (torch refuses to say after a mix of its old and new settings)
            precision = "bf16"
    if precision == "tf32" and device.type == "cpu":  # (no CPU has TF32: oneDNN runs float32)
        precision = "ieee"
    return _EPS.get(precision, torch.finfo(dtype).eps)  # ("ieee", or "none" at the top: the default)


_EPS = {"tf32": 2.0**-10, "bf16": 2.0**-7}


def add_weighted(target: torch.Tensor, per_sample: torch.Tensor, factors: torch.Tensor) -> None:
    """Add Σ_i c_i g_i into ``target`` in place, in ``target``'s dtype, for per-sample
    gradients g [B, *target shape] and factors c [B] (no parameter-sized temporary when
    ``target`` is contiguous)."""
    g = per_sample if per_sample.dtype == target.dtype else per_sample.to(target.dtype)
    c = factors if factors.dtype == target.dtype else factors.to(target.dtype)
    if target.is_contiguous():
        target.view(-1).addmv_(g.reshape(g.shape[0], -1).t(), c)
    else:
        target.add_(torch.einsum("b,b...->...", c, g))


def accumulator(out: dict, p: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """p's entry of the accumulator ``out`` (rows ``rows`` of it), zeros in ``norm_dtype``
    first if it has none: a half-precision accumulator would round each example's c_i·g_i."""
    if p not in out:
        out[p] = torch.zeros_like(p, dtype=norm_dtype(p.dtype), memory_format=torch.contiguous_format)
    return out[p] if rows is None else out[p][rows]
