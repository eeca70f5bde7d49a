"""The fallback for layer types no family of dpclip's own has a rule for: Opacus's
per-sample gradient rules."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from opacus.grad_sample.grad_sample_module import GradSampleModule

from dpclip.clipping.rules.base import Rule, register

if TYPE_CHECKING:
    from dpclip.clipping.recording import LayerCall

__all__ = ["OpacusRule"]


class OpacusRule(Rule):
    """Per-sample gradients from Opacus's rule for the layer type (InstanceNorm with running
    statistics, RMSNorm, grouped or 3-d convolutions, …), for layers without a rule of
    dpclip's own."""

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


_OPACUS: Mapping[type, Callable[..., Any]] = GradSampleModule.GRAD_SAMPLERS


def _has_opacus_rule(module: nn.Module) -> bool:
    return type(module) in _OPACUS


def _opacus_rule(module: nn.Module) -> Rule:
    return OpacusRule(_OPACUS[type(module)])


register(_has_opacus_rule, _opacus_rule, fallback=True)
