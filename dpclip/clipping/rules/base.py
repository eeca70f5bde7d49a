"""What a rule is, and the registry that maps a module to its rule."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Union

import torch
import torch.nn as nn

from dpclip.clipping.norms import GhostNorm, add_weighted

if TYPE_CHECKING:  # LayerCall's module imports this one at run time
    from dpclip.clipping.recording import LayerCall

__all__ = ["MEMORY_WEIGHT", "STRATEGIES", "Rule", "Target", "register", "rule_for"]

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


class Rule:
    """How a layer type's parameter gradients follow from (activations, output gradient)."""

    def has_ghost(self, call: LayerCall) -> bool:
        return False

    def costs(self, call: LayerCall) -> tuple[float, float]:
        """(ghost, per-sample) multiply-adds per example for this call (rules with a ghost
        norm), from its activations and output shape (``call.shape``): also asked before
        the backward pass, when there is no output gradient yet."""
        raise NotImplementedError(f"{type(self).__name__} has no ghost norm")

    def ghost_sq_norms(self, call: LayerCall, rows: torch.Tensor | None = None) -> GhostNorm:
        """Σ over targets of ‖∇ ℓ_i‖², shape [B], without per-sample gradients, with the
        bound on its rounding (``GhostNorm``). With ``rows`` (example indices), those
        examples' only, in float64: the clipper's second look at examples whose bound is
        not small against their norm."""
        raise NotImplementedError(f"{type(self).__name__} has no ghost norm")

    def per_sample_grads(self, call: LayerCall) -> dict[str, torch.Tensor]:
        """{role: ∇ ℓ_i stacked over i}, each [B, *target shape]."""
        raise NotImplementedError

    def clipped_sum(self, call: LayerCall, factors: torch.Tensor, out: Mapping[str, torch.Tensor]) -> None:
        """Add Σ_i c_i ∇ ℓ_i for per-example factors c (shape [B]) into ``out[role]``,
        in place (the accumulator: no parameter-sized temporary where avoidable)."""
        grads = call.per_sample if call.per_sample is not None else self.per_sample_grads(call)
        for role, g in grads.items():
            add_weighted(out[role], g, factors)

    def abs_sum(self, call: LayerCall, out: Mapping[str, torch.Tensor]) -> None:
        """Add, element by element, Σ over examples and positions of |each contribution| to
        ``out[role]``'s gradient: the scale of its rounding error (the first micro-batch's
        self-check compares two sums of these contributions within it). This default runs
        ``clipped_sum`` (factors 1) on |activations| and |output gradient|: exact for rules
        whose contributions are products of an activation and an output-gradient entry
        (linear layers, convolutions, embeddings); others override it."""
        absolute = replace(
            call,
            activations=[
                a.abs() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in call.activations
            ],
            backprop=call.backprop.abs(),
            per_sample=None,
        )
        ones = call.backprop.new_ones(call.by_example(call.backprop).shape[0])
        self.clipped_sum(absolute, ones, out)


#: Which modules an entry is for: a module type, matched exactly (a subclass may compute
#: something else in its own ``forward``), or a predicate on the module.
Kind = Union[type[nn.Module], Callable[[nn.Module], bool]]
#: What an entry gives a module it is for: a rule; None, no rule (per-sample gradients
#: through the recorded graph); or a function of the module choosing one of those from
#: its configuration.
Choice = Union[Rule, None, Callable[[nn.Module], Union[Rule, None]]]

_ENTRIES: list[tuple[Kind, Choice]] = []
_FALLBACKS: list[tuple[Kind, Choice]] = []


def register(kind: Kind, choice: Choice, *, fallback: bool = False) -> None:
    """Add an entry to the registry ``rule_for`` consults: modules of ``kind`` get ``choice``.

    The first entry registered for a module decides, also when it chooses None; entries
    registered with ``fallback=True`` are consulted only after all the others.
    """
    (_FALLBACKS if fallback else _ENTRIES).append((kind, choice))


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this exact module type and configuration, or None (then the
    clipper takes per-sample gradients through the recorded graph)."""
    for kind, choice in (*_ENTRIES, *_FALLBACKS):
        if type(module) is kind if isinstance(kind, type) else kind(module):
            return choice if choice is None or isinstance(choice, Rule) else choice(module)
    return None
