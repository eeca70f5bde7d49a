"""Convolutions: ``nn.Conv1d/2d/3d`` (every padding mode, string padding, groups) and
``nn.ConvTranspose1d/2d/3d``, as grouped linear layers over unfolded patches.

Both reduce to one weight gradient, that of a convolution z = conv(u, W) with zero
padding given as numbers, per example i

    ∇W ℓ_i [o, c, κ] = Σ_t v_i[o, t] · u_i[c, t·s + κ·d − p]   (c in o's group),

with u the convolution's input and v its output gradient:

- a convolution: u = its input, padded first as the module pads it (``F.pad`` in its
  ``padding_mode``, or ``padding="same"``'s possibly asymmetric zeros), v = the output
  gradient;
- a transposed convolution y = conv_transpose(x, W) is the adjoint of conv(·, W) on
  inputs shaped like y: ⟨y, g⟩ = ⟨x, conv(g, W)⟩, so ∇W ℓ_i is the gradient above with
  u = g_i (its output gradient) and v = x_i (its input), and W's layout
  [C_in, C_out/G, *k] is the convolution's [out, in/G, *k]. With ``output_padding`` ≥
  stride the convolution of g has more positions than x: the extra ones meet zeros.

Per group the gradient is a linear layer's over the T output positions of the
convolution, ``Σ_t v_tᵀ a_t`` with a_t the patch of u there; the weight is
block-diagonal over the G groups, so ‖∇W ℓ_i‖² is the sum of the groups' ghost norms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpclip.clipping.norms import GhostNorm, gram_sq_norm, norm_dtype, row_sq_norms, scale_rows
from dpclip.clipping.rules.base import MEMORY_WEIGHT, Rule, register

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = [
    "ConvRule",
    "ConvSpec",
    "ConvTransposeRule",
    "FunctionalConvRule",
    "conv_patches",
    "functional_conv_rule",
    "grouped_gram_sq_norm",
    "per_sample_conv_weight",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_patches(
    u: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    positions: Sequence[int],
) -> torch.Tensor:
    """The patches a convolution with zero ``padding`` reads from u [B, C, *S], at its
    first ``positions`` output positions per spatial dimension: [B, T, C·K] with
    T = Π positions, K = Π kernel, columns ordered (channel, kernel offset) as in a
    convolution weight [out, C, *kernel]. Any number of spatial dimensions
    (``F.unfold`` has two only)."""
    u = F.pad(u, [q for p in reversed(padding) for q in (p, p)])
    n = len(kernel)
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        # a window per output position, appended as the last dimension, every d-th entry
        u = u.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    for i, t in enumerate(positions):
        u = u.narrow(2 + i, 0, t)
    # [B, C, *T, *K] -> [B, *T, C, *K] -> [B, T, C·K]
    u = u.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
    return u.flatten(1, n).flatten(2)


def grouped_gram_sq_norm(a: torch.Tensor, v: torch.Tensor, groups: int) -> GhostNorm:
    """‖∇W‖² per example of a weight block-diagonal over ``groups`` groups: Σ over groups
    of ``gram_sq_norm`` of the group's columns of a [B, T, G·d] and v [B, T, G·p], shape
    [B], in ``norm_dtype``, and the bound on its rounding (``gram_sq_norm``'s, summed)."""
    if groups == 1:
        return gram_sq_norm(a, v)
    batch, t = a.shape[0], a.shape[1]

    def by_group(m: torch.Tensor) -> torch.Tensor:  # [B·G, T, columns of a group]
        return m.reshape(batch, t, groups, -1).transpose(1, 2).reshape(batch * groups, t, -1)

    norm = gram_sq_norm(by_group(a), by_group(v))
    scale = None if norm.scale is None else norm.scale.view(batch, groups).sum(dim=1)
    return GhostNorm(norm.sq.view(batch, groups).sum(dim=1), scale, norm.unit)


def per_sample_conv_weight(
    u: torch.Tensor,
    v: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """∇W ℓ_i for every i of z = conv(u, W) (zero ``padding``, ``groups``) with output
    gradient v: u [B, C_in, *S], v [B, C_out, *T] -> [B, C_out, C_in/G, *kernel].

    One convolution, as torch's expanded weights: u's channels within a group become the
    batch, each (example, group) a group of its own whose kernels are the example's
    output gradients, stride and dilation swapped (faster than unfolding on CPU, where
    the patches are large). The result runs past the kernel when the output gradient
    does not reach the end of u; those entries are cut off."""
    batch, c_in, c_out = u.shape[0], u.shape[1], v.shape[1]
    if len(kernel) == 2 and groups == 1 and tuple(stride) == tuple(kernel) and tuple(dilation) == (1, 1):
        # non-overlapping patches (a ViT's patch embedding): the unfolded input is no
        # larger than the input, and one batched matmul is ~10x faster than the grouped
        # convolution
        patches = F.unfold(u, tuple(kernel), padding=tuple(padding), stride=tuple(stride))
        w = torch.bmm(v.flatten(2), patches.transpose(1, 2))
        return w.view(batch, c_out, c_in, *kernel)
    per_group = c_in // groups
    inputs = u.reshape(batch * groups, per_group, *u.shape[2:]).transpose(0, 1)
    w = _CONV[len(kernel)](
        inputs,
        v.reshape(batch * c_out, 1, *v.shape[2:]),
        None,
        stride=tuple(dilation),
        padding=tuple(padding),
        dilation=tuple(stride),
        groups=batch * groups,
    )
    for dim, size in enumerate(kernel, start=2):
        w = w.narrow(dim, 0, size)
    # contiguous once, so the norm and the clipped sum read it without copying
    return w.reshape(per_group, batch, c_out, *kernel).movedim(0, 2).contiguous()


class ConvRule(Rule):
    """``nn.Conv1d/2d/3d``: any ``padding_mode``, numbers or "same"/"valid" padding,
    stride, dilation, groups (depthwise included)."""

    def _conv(self, call: LayerCall) -> Any:
        """The convolution's configuration: kernel_size, stride, padding, dilation, groups,
        padding_mode, weight (its shape). The module's own, here."""
        return call.module

    def _operands(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(u, v, zero padding) of the convolution whose weight gradient this is (module
        docstring), in the output gradient's dtype: the input as the layer used it
        (rounded to bfloat16 under autocast)."""
        conv = self._conv(call)
        g = call.backprop
        x = call.activations[0].to(g.dtype)
        if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            return x, g, conv.padding
        # as the module's forward: pad, then convolve without padding
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        return x, g, (0,) * len(conv.kernel_size)

    def has_ghost(self, call: LayerCall) -> bool:
        return True

    def _positions(self, call: LayerCall) -> int:
        """T: v's positions per example (the convolution's output positions)."""
        return math.prod(call.shape[2:])

    def costs(self, call: LayerCall) -> tuple[float, float]:
        # per group a linear layer over T positions: d = a patch's size, p = its outputs
        # (both rules' weight is [v's channels, u's channels / G, *kernel])
        conv = self._conv(call)
        groups, weight = conv.groups, conv.weight
        t, d, p = self._positions(call), weight[0].numel(), weight.shape[0] // groups
        # both pay T·d·p once: ghost for the clipped sum, per-sample for the gradients
        return (
            groups * (t * t * (d + p) + t * d * p),
            groups * (t * d * p + MEMORY_WEIGHT * d * p),
        )

    def ghost_sq_norms(self, call: LayerCall, rows: torch.Tensor | None = None) -> GhostNorm:
        g = call.backprop if rows is None else call.backprop[rows].double()
        norm = None
        if "weight" in call.targets:
            conv = self._conv(call)
            u, v, padding = self._operands(call)
            if rows is not None:
                u, v = u[rows].double(), v[rows].double()
            a = conv_patches(u, conv.kernel_size, conv.stride, padding, conv.dilation, v.shape[2:])
            norm = grouped_gram_sq_norm(a, v.flatten(2).transpose(1, 2), conv.groups)
        if "bias" in call.targets:
            bias = row_sq_norms(g.flatten(2).sum(dim=2, dtype=norm_dtype(g.dtype)))
            norm = GhostNorm(bias) if norm is None else norm._replace(sq=norm.sq + bias)
        return norm

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        g = call.backprop
        out = {}
        if "weight" in call.targets:
            conv = self._conv(call)
            u, v, padding = self._operands(call)
            out["weight"] = per_sample_conv_weight(
                u, v, conv.kernel_size, conv.stride, padding, conv.dilation, conv.groups
            )
        if "bias" in call.targets:
            out["bias"] = g.flatten(2).sum(dim=2)
        return out

    def clipped_sum(self, call: LayerCall, factors: torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
        if call.per_sample is not None:
            return super().clipped_sum(call, factors, out)
        # the layer's own weight gradient with example i's output gradient times c_i, in
        # norm_dtype as the ghost norm was: no per-sample gradient
        g = scale_rows(call.backprop, factors)
        if "weight" in call.targets:
            out["weight"].add_(self._weight_grad(call, g))
        if "bias" in call.targets:
            out["bias"].add_(g.flatten(2).sum(dim=(0, 2)))

    def _weight_grad(self, call: LayerCall, g: torch.Tensor) -> torch.Tensor:
        """∇W of Σ_i ⟨output_i, g_i⟩, in g's dtype."""
        conv = self._conv(call)
        u, _, padding = self._operands(call)
        no_output_padding = [0] * len(padding)
        return _convolution_weight_grad(conv, u.to(g.dtype), g, padding, False, no_output_padding)


class ConvTransposeRule(ConvRule):
    """``nn.ConvTranspose1d/2d/3d``: stride, dilation, groups, ``output_padding`` or
    ``output_size`` (read from the shapes)."""

    def _operands(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        g = call.backprop
        return g, call.activations[0].to(g.dtype), self._conv(call).padding

    def _positions(self, call: LayerCall) -> int:
        return call.activations[0][0, 0].numel()

    def _weight_grad(self, call: LayerCall, g: torch.Tensor) -> torch.Tensor:
        conv = self._conv(call)
        x = call.activations[0].to(call.backprop.dtype).to(g.dtype)
        # the positions the forward added at the end, from the shapes: the module's
        # output_padding, or what an output_size argument asked for
        output_padding = [
            y - ((n - 1) * s - 2 * p + d * (k - 1) + 1)
            for y, n, s, p, d, k in zip(
                g.shape[2:], x.shape[2:], conv.stride, conv.padding, conv.dilation, conv.kernel_size
            )
        ]
        return _convolution_weight_grad(conv, x, g, conv.padding, True, output_padding)


def _convolution_weight_grad(
    conv: nn.modules.conv._ConvNd,
    inputs: torch.Tensor,
    grad_output: torch.Tensor,
    padding: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
) -> torch.Tensor:
    """torch's own weight gradient of ``conv`` applied to ``inputs`` with output gradient
    ``grad_output`` (``torch.nn.grad.conv2d_weight``'s, for any dimension, transposed or
    not)."""
    weight = grad_output.new_empty(1).expand(conv.weight.shape)
    return torch.ops.aten.convolution_backward(
        grad_output,
        inputs,
        weight,
        None,
        list(conv.stride),
        list(padding),
        list(conv.dilation),
        transposed,
        list(output_padding),
        conv.groups,
        (False, True, False),
    )[1]


@dataclass(frozen=True)
class ConvSpec:
    """The configuration of an ``F.conv1d/2d/3d`` call (zero padding given as numbers):
    what ``ConvRule`` reads from a module."""

    weight: torch.Tensor  # on the meta device: the weight's shape only
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])


class FunctionalConvRule(ConvRule):
    """``F.conv1d/2d/3d(x, w, b, stride, padding, dilation, groups)`` called in a module's
    own ``forward`` (a convolution subclass that computes its weight first, a bare call),
    recorded from the operation by ``dpclip.clipping.functions``."""

    def __init__(self, spec: ConvSpec) -> None:
        self.spec = spec

    def _conv(self, call: LayerCall) -> ConvSpec:
        return self.spec


_FUNCTIONAL: dict[tuple, FunctionalConvRule] = {}


def functional_conv_rule(
    weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int,
) -> FunctionalConvRule:
    """The rule for an ``F.conv*d`` call with this weight shape and configuration."""
    key = (tuple(weight_shape), tuple(stride), tuple(padding), tuple(dilation), groups)
    if key not in _FUNCTIONAL:
        meta = torch.empty(key[0], device="meta")
        _FUNCTIONAL[key] = FunctionalConvRule(ConvSpec(meta, key[1], key[2], key[3], groups))
    return _FUNCTIONAL[key]


# exact types: a subclass may compute something else in its own forward
for _kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register(_kind, ConvRule())
for _kind in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register(_kind, ConvTransposeRule())
