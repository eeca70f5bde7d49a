"""Convolutions: ``nn.Conv1d`` / ``nn.Conv2d`` as linear layers over the unfolded
input patches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpclip.clipping.norms import gram_sq_norm, norm_dtype, row_sq_norms, scale_rows
from dpclip.clipping.rules.base import MEMORY_WEIGHT, Rule, register

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["ConvRule"]


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
            total = total + gram_sq_norm(*self._patches(call))
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
        # the input as the layer used it (rounded to bfloat16 under autocast), as in the norm
        x = call.activations[0].to(call.backprop.dtype)
        g = scale_rows(call.backprop, factors)  # in norm_dtype, as the ghost norm was
        if "weight" in call.targets:
            weight_grad = torch.nn.grad.conv1d_weight if isinstance(conv, nn.Conv1d) else torch.nn.grad.conv2d_weight
            out["weight"].add_(weight_grad(
                x.to(g.dtype), conv.weight.shape, g, conv.stride, conv.padding, conv.dilation, conv.groups
            ))
        if "bias" in call.targets:
            out["bias"].add_(g.flatten(2).sum(dim=(0, 2)))


def _padded_other_than_zeros(module: nn.Module) -> bool:
    # Opacus's conv rule unfolds with zero padding of the given size: no rule at all
    return isinstance(module, nn.modules.conv._ConvNd) and (
        module.padding_mode != "zeros" or isinstance(module.padding, str)
    )


def _ungrouped_1d_or_2d(module: nn.Module) -> bool:
    return type(module) in (nn.Conv1d, nn.Conv2d) and module.groups == 1


register(_padded_other_than_zeros, None)
register(_ungrouped_1d_or_2d, ConvRule())
