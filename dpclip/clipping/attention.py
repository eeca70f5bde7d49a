"""``nn.MultiheadAttention`` as built, seen as the linear projections it computes.

The module computes its q/k/v and output projections inside
``F.multi_head_attention_forward`` from parameters it passes in, so no module
hook sees them. While a hooked attention module runs forward, a torch-function
mode reroutes that call to torch's own function, rebound so that its
``linear`` records each projection: input, output and the parameter rows used.
The attention itself (masks, dropout, kernels) is torch's unchanged code.
Inside that function tensors are [T, B, E], or [T·B, E] with the batch index
inner: the recorded calls say so (``LayerCall.batch_inner``).

With ``add_bias_kv=True`` the function appends ``bias_k.repeat(1, B, 1)`` to the keys
(and likewise for the values): that repeat is given the bias's view expanded over the
batch instead, recorded for the broadcast rule (``dpclip.clipping.rules.broadcast``).
``add_zero_attn`` appends constant zeros, which no parameter takes part in.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dpclip.clipping.checkpointing import InputFromRerun, InputSlot, takes_rerun_input
from dpclip.clipping.rules.base import Target

__all__ = ["AttentionRecorder", "ExpandedBias", "Projection"]

#: (input, output, {"weight": target, "bias": target}, batch size, where the input comes
#: from a checkpointed region's re-run or None) of one projection; rows of input and output
#: are ordered (position, example)
Projection = tuple[torch.Tensor, torch.Tensor, dict[str, Target], int, InputSlot | None]
#: (the view of bias_k or bias_v expanded over the batch, [B, 1, E], and its target)
ExpandedBias = tuple[torch.Tensor, Target]

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _rebind(fn: Callable[..., Any], namespace: dict[str, Any]) -> Callable[..., Any]:
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


class AttentionRecorder(TorchFunctionMode):
    """Active during each forward call of an attention module; ``projections`` and
    ``biases`` hold what the last call recorded, or ``unsupported`` says why nothing was.

    Args:
        params: the module's trainable parameters; frozen ones (also those frozen
            later) are not recorded.
    """

    def __init__(self, params: tuple[nn.Parameter, ...]) -> None:
        super().__init__()
        self._params = {id(p): p for p in params}
        self.projections: list[Projection] = []
        self.biases: list[ExpandedBias] = []
        self.unsupported: str | None = None
        self._batch = 0
        namespace = dict(vars(F))
        # already dispatched here: the rebound copy must not dispatch to modes again
        namespace["has_torch_function"] = lambda *_: False
        namespace["linear"] = self._linear
        namespace["_in_projection_packed"] = _rebind(F._in_projection_packed, namespace)
        namespace["_in_projection"] = _rebind(F._in_projection, namespace)
        self._forward = _rebind(F.multi_head_attention_forward, namespace)

    def reset(self) -> None:
        """Forget the last call's projections (before the next forward)."""
        self.projections = []
        self.biases = []
        self.unsupported = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: A002 - torch's signature
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        bound = _SIGNATURE.bind(*args, **kwargs).arguments
        why = self._why_unsupported(bound)
        if why is not None:
            self.unsupported = why
            return func(*args, **kwargs)
        self._batch = bound["query"].shape[1]
        biases = {}
        for name in ("bias_k", "bias_v"):
            bias = bound.get(name)
            target = self._target(bias)
            if target is not None:
                biases[id(bias)] = (bias, target)
        if not biases:
            return self._forward(*args, **kwargs)
        with _ExpandBiases(biases, self._batch, self.biases):
            return self._forward(*args, **kwargs)

    @staticmethod
    def _why_unsupported(arguments: dict[str, Any]) -> str | None:
        if arguments["query"].dim() != 3:
            return "unbatched input"
        for name in ("static_k", "static_v"):
            if arguments.get(name) is not None:
                return f"{name} is set"
        for name in ("bias_k", "bias_v"):
            bias = arguments.get(name)
            if bias is not None and (bias.dim() != 3 or bias.shape[:2] != (1, 1)):
                return f"{name} has shape {tuple(bias.shape)}, not [1, 1, E]"
        return None

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() > 2 and not x.is_contiguous():
            # F.linear would save a contiguous copy of this [T, B, E] view for the weight's
            # gradient; made here, the record shares that copy instead of keeping the
            # layer's input alive beside it (rows stay (position, example))
            shape = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1])
            y = F.linear(x, weight, bias).view(*shape, -1)
        else:
            y = F.linear(x, weight, bias)
        targets = {}
        for role, t in (("weight", weight), ("bias", bias)):
            target = self._target(t)
            if target is not None:
                targets[role] = target
        slot = None
        out = y
        if takes_rerun_input(y):
            # (in the forward and in the re-run alike, recorded or not: ``InputFromRerun``)
            slot = InputSlot()
            out = InputFromRerun.apply(y, x.detach(), slot)
        if targets and y.requires_grad:
            self.projections.append((x.detach(), y, targets, self._batch, slot))
        return out

    def _target(self, t: torch.Tensor | None) -> Target | None:
        if t is None:
            return None
        if id(t) in self._params:
            p = self._params[id(t)]
            return (p, None) if p.requires_grad else None  # frozen since make_private
        base = t._base
        if base is not None and id(base) in self._params and t.stride() == base.stride():
            if not base.requires_grad:
                return None
            offset = t.storage_offset() - base.storage_offset()
            start, rest = divmod(offset, base.stride(0))
            if rest == 0 and t.shape[1:] == base.shape[1:]:
                return self._params[id(base)], slice(start, start + t.shape[0])
        if t.requires_grad and not isinstance(t, nn.Parameter) and (base is None or base.requires_grad):
            raise RuntimeError(
                "nn.MultiheadAttention projected with a tensor that is not one of its parameters "
                f"(shape {tuple(t.shape)}): dpclip cannot attribute its gradient"
            )
        return None  # a frozen parameter


class _ExpandBiases(TorchFunctionMode):
    """Active inside the rebound attention function when a trainable ``bias_k`` /
    ``bias_v`` is set: its ``bias.repeat(1, B, 1)`` (shape [1, B, E], column b example
    b's) becomes the same values as a view of the bias expanded over the batch, P_b of
    shape [B, 1, E], transposed; P_b is appended to ``out`` with the bias's target. Its
    gradient in the backward is then each example's own."""

    def __init__(self, biases: dict[int, tuple[torch.Tensor, Target]], batch: int, out: list) -> None:
        super().__init__()
        self._biases, self._batch, self._out = biases, batch, out

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: A002 - torch's signature
        kwargs = kwargs or {}
        if func is torch.Tensor.repeat and args and id(args[0]) in self._biases:
            bias, target = self._biases[id(args[0])]
            if bias is args[0] and tuple(args[1:]) in ((1, self._batch, 1), ((1, self._batch, 1),)):
                expanded = bias.expand(self._batch, *bias.shape[1:])
                self._out.append((expanded, target))
                return expanded.transpose(0, 1)
        return func(*args, **kwargs)
