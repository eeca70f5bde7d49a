"""The exact fallback: per-sample gradients of a unit without a rule, by a batched
vector-Jacobian product through the autograd graph its forward call recorded (so
dropout masks and keyword inputs are those of the real forward). The clipped sum
is taken from these same per-sample gradients."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from dpclip.clipping.recording import GraphCall, LayerCall, Unit

__all__ = ["check_graph_units", "foreign_parameters", "graph_per_sample"]


def graph_per_sample(calls: list[GraphCall]) -> dict[nn.Parameter, torch.Tensor]:
    """{param: ∇ ℓ_i stacked over i} for the graph-path calls; the clipped sum is taken
    from these same tensors, so that the norm and what is added agree to the last bit
    (a second vector-Jacobian product in half precision would round differently)."""
    out: dict[nn.Parameter, torch.Tensor] = {}
    for call in calls:
        outs = [e for e, b in zip(call.edges, call.backprops) if b is not None]
        cots = [_one_hot_cotangent(b) for b in call.backprops if b is not None]
        with warnings.catch_warnings():
            # vmap over some backward kernels (CPU attention) falls back to a loop and says so
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads = torch.autograd.grad(
                outs, call.params, grad_outputs=cots, retain_graph=True,
                allow_unused=True, is_grads_batched=True,
            )
        for p, g in zip(call.params, grads):
            if g is not None:
                out[p] = g
    return out


def _one_hot_cotangent(backprops: torch.Tensor) -> torch.Tensor:
    """[B, *shape] -> [B, B, *shape] whose slice i keeps only sample i's row."""
    b = backprops.shape[0]
    eye = torch.eye(b, dtype=backprops.dtype, device=backprops.device)
    return eye.view(b, b, *([1] * (backprops.dim() - 1))) * backprops.unsqueeze(0)


def check_graph_units(used: list[GraphCall], layer_calls: list[LayerCall]) -> None:
    """Raise ``RuntimeError`` if a graph-path unit ran more than once in the forward or
    shares parameters with another module: its recorded graph would also carry the
    other uses' gradient."""
    by_unit: dict[Unit, int] = {}
    for call in used:
        by_unit[call.unit] = by_unit.get(call.unit, 0) + 1
    for unit, n in by_unit.items():
        n += sum(1 for c in layer_calls if c.module is unit.module)
        if n > 1 or unit.shared:
            # Its per-sample gradients come through the recorded graph, which would also
            # count the other calls' (or the other owner's) use of the same parameters.
            raise RuntimeError(
                f"module {unit.name!r} ({type(unit.module).__name__}) runs "
                f"{n} times per forward or shares parameters with another "
                "module; dpclip supports that only for layers with a per-sample rule "
                "(Linear, convolutions, Embedding, LayerNorm, GroupNorm, …)"
            )


def foreign_parameters(loss: torch.Tensor, known: set[torch.Tensor]) -> list[nn.Parameter]:
    """Trainable ``nn.Parameter`` leaves of ``loss``'s autograd graph that are not in
    ``known``: a module outside the private model (its gradient would be dropped)."""
    foreign, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        leaf = getattr(fn, "variable", None)  # an AccumulateGrad node
        if isinstance(leaf, nn.Parameter) and leaf.requires_grad and leaf not in known:
            foreign.append(leaf)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return foreign
