"""The arithmetic of per-sample clipping on batch-first tensors: norms, clipping
factors, rows scaled by them, and factor-weighted sums, in at least float32."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = [
    "accumulator",
    "add_weighted",
    "clip_factors",
    "gram_sq_norm",
    "norm_dtype",
    "rounding_eps",
    "row_sq_norms",
    "scale_rows",
]


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


def gram_sq_norm(a: torch.Tensor, g: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """‖Σ_t g_tᵀ a_t‖²_F per example for a [B, T, d], g [B, T, p], in O(T²(d+p)), in
    ``norm_dtype``; with ``bias``, plus ‖Σ_t g_t‖² (a bias's part: a_t with a 1 appended,
    so the input's Gram matrix gains 1 everywhere, and no pass over g of its own)."""
    dtype = norm_dtype(g.dtype)
    a, g = a.to(dtype), g.to(dtype)
    if a.shape[1] == 1:
        return (row_sq_norms(a) + 1 if bias else row_sq_norms(a)) * row_sq_norms(g)
    gram = torch.bmm(a, a.transpose(1, 2))
    if bias:
        gram += 1
    return gram.mul_(torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))


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
