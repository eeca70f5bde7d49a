"""Non-reentrant gradient checkpointing: whether a forward runs inside a checkpointed
region, and layer inputs taken from the region's re-run in the backward.

Inside ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (Hugging Face's
``gradient_checkpointing_enable``) torch's own saved-tensor hooks take what autograd
saves, and the backward runs the region again to give it back. Two consequences:

- What ``memory="auto"`` counts on its first forward (bytes and dtypes of the saved
  activations, ``dpclip.clipping.memory.SavedActivations``) misses the region: "auto"
  takes "fast" there, and ``memory="low"`` warns on a float64 model, whose layers may
  compute in float32 inside unseen.
- A recorded layer call that kept its input from the forward to the backward would hold
  what checkpointing exists to free (1.35-1.55x non-private training with checkpointing
  on Hugging Face's Llama and RoBERTa). ``InputFromRerun`` hands the input to autograd
  instead, saved as autograd saves any operation's input, on an identity on the layer's
  output: inside the region torch keeps nothing of it and its re-run gives the input back
  when the backward reaches the output, before the output's gradient arrives.
  Torch matches what it re-computes to what it saved, so the identity runs on every call
  that qualifies, in the forward and in the re-run alike, recorded or not.
- A module without a rule whose parameter only scales (Llama's and T5's RMSNorm
  ``w * n``, recorded by operation: the function recorder is not active in the re-run)
  gets the identity on its output with the module's input, and the scaled operand n is
  computed from that input in the backward (``scaled_operand``), where that gives the
  forward's n (``dpclip.clipping.recording.Recorder``: tried on the module's first call,
  and compared by a checksum of each call's n).

The region is told by the top saved-tensor pack hook, checkpoint's own (the forward's
holds the region's frame; the re-run's is another): torch.utils.checkpoint's internals.
Where it is not found the forward counts as not checkpointed and inputs are kept from the
forward, as without checkpointing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = [
    "InputFromRerun", "InputSlot", "autocast_state", "checkpoint_region", "in_checkpointing", "rerun_keeps_rng",
    "scaled_operand", "selective", "takes_rerun_input",
]

_FORWARD_HOOK = "_checkpoint_hook."
_RERUN_HOOK = "_recomputation_hook."


def checkpoint_region() -> Any | None:
    """The checkpointed region whose forward is running (torch's frame object), or None
    (also during the region's re-run in the backward)."""
    pack = _top_pack_hook()
    if pack is None or not getattr(pack, "__qualname__", "").startswith(_FORWARD_HOOK):
        return None
    return _cell(pack, "frame")


def in_checkpointing() -> bool:
    """Whether a checkpointed region's forward, or its re-run in the backward, is running."""
    pack = _top_pack_hook()
    return pack is not None and getattr(pack, "__qualname__", "").startswith((_FORWARD_HOOK, _RERUN_HOOK))


def takes_rerun_input(output: torch.Tensor) -> bool:
    """Whether a layer call with this output goes through ``InputFromRerun``: the output
    requires grad, inside a checkpointed region's forward or its re-run (not while
    torch.compile traces). It depends on nothing the backward changes: torch matches the
    re-run's saved tensors to the forward's by their order."""
    return (
        output.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        and in_checkpointing()
    )


def rerun_keeps_rng(region: Any) -> bool:
    """Whether the region's re-run draws the forward's random numbers again (torch's
    ``preserve_rng_state``, the default): False also where it cannot be told."""
    return _cell(getattr(region, "recompute_fn", None), "preserve_rng_state") is True


def selective(region: Any) -> bool:
    """Whether the region's re-run runs under a context of its own (selective activation
    checkpointing's ``context_fn``, ``debug=True``'s), which allows one backward through
    the region: True also where it cannot be told."""
    context = _cell(getattr(region, "recompute_fn", None), "recompute_context")
    return not isinstance(context, contextlib.nullcontext)


class InputFromRerun(torch.autograd.Function):
    """``out`` (its data, not a copy and not a view: the model may change it in place),
    with ``x`` saved for its backward: inside a checkpointed region torch's hooks keep
    nothing of ``x``, and the backward gets it from the region's re-run. Each backward
    through it hands it to ``slot.take_input`` with ``x``'s version counter at the forward
    (torch checks no version of a re-computed tensor: a change in place after the layer
    in the region would go unseen); ``slot`` None: nobody waits for it. The gradient
    passes unchanged."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, x: torch.Tensor, slot: Any) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.slot, ctx.version = slot, x._version
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.slot is not None:
            (x,) = ctx.saved_tensors
            ctx.slot.take_input(x, ctx.version)
        return grad, None, None


class InputSlot:
    """Where ``InputFromRerun`` hands an input when the call is recorded after the
    identity ran (a projection inside ``nn.MultiheadAttention``): the call, once set."""

    __slots__ = ("call",)

    def __init__(self) -> None:
        self.call: Any | None = None

    def take_input(self, x: torch.Tensor, version: int) -> None:
        if self.call is not None:
            self.call.take_input(x, version)


def _top_pack_hook() -> Any | None:
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):  # another torch
        return None
    return None if hooks is None else hooks[0]


def _cell(fn: Any, name: str) -> Any | None:
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not closure or name not in code.co_freevars:
        return None
    try:
        return closure[code.co_freevars.index(name)].cell_contents
    except ValueError:  # (an empty cell)
        return None


def autocast_state(device_type: str) -> tuple[str, torch.dtype, bool]:
    """(device type, dtype, enabled) of autocast now, for ``scaled_operand`` in the backward."""
    return device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)


def scaled_operand(
    module: torch.nn.Module, role: str, x: torch.Tensor, autocast: tuple[str, torch.dtype, bool] | None = None,
) -> torch.Tensor:
    """The operand n that ``module``'s parameter ``role`` scales in a forward on ``x`` whose
    output is that product, ``w ⊙ n`` (also ``(1 + w) ⊙ n``, or with ``w`` cast): the
    output's derivative along w in the direction of ones, which is n exactly (a product
    with ones), in the output's dtype. The module's own forward runs, without its hooks,
    under ``autocast`` (``autocast_state`` of the forward; None: as it is now)."""
    w = module._parameters[role]

    def forward(weight: torch.Tensor) -> torch.Tensor:
        module._parameters[role] = weight
        try:
            return type(module).forward(module, x)
        finally:
            module._parameters[role] = w

    cast = contextlib.nullcontext() if autocast is None else torch.autocast(
        autocast[0], dtype=autocast[1], enabled=autocast[2]
    )
    with torch.no_grad(), cast:
        _, n = torch.func.jvp(forward, (w.detach(),), (torch.ones_like(w),))
    return n
