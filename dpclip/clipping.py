"""Per-sample gradient norms and the clipped gradient sum of one micro-batch.

For a micro-batch with per-sample losses ℓ_1..ℓ_B and per-sample gradients
g_i = ∇_θ ℓ_i, this module computes

    S = Σ_i c_i · g_i,   c_i = min(1, C / ‖g_i‖)

without keeping g_i when it can. Two backward passes, as in ghost clipping
(Li et al. 2022, "Large language models can be strong differentially private
learners"; Opacus's ``grad_sample_mode="ghost"``):

1. gradients of Σ ℓ_i with respect to every hooked module *output* (no
   parameter gradients); from each module's input activations and output
   gradients, per-sample gradient norms:
   - ghost norms (Opacus's norm samplers: Linear, Embedding) where a module
     ran once and owns its parameters alone;
   - else per-sample gradients from Opacus's grad samplers (Conv, LayerNorm,
     GroupNorm, …), summed over repeated calls and tied parameters;
   - else (any other module, e.g. ``nn.MultiheadAttention``) per-sample
     gradients by a batched vector-Jacobian product through the module's own
     recorded graph, so dropout masks and masks passed as keyword arguments
     are exactly those of the real forward.
2. gradient of Σ c_i ℓ_i with respect to the parameters: S itself.

Unlike Opacus, nothing is written to ``param.grad`` and no attribute is added
to a parameter or module: the caller owns where S is accumulated.
"""

from __future__ import annotations

import math

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from opacus.grad_sample.grad_sample_module import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleModuleFastGradientClipping,
)
from torch.utils._pytree import tree_flatten

__all__ = [
    "GRAD_SAMPLERS",
    "NORM_SAMPLERS",
    "NonFiniteNormError",
    "PerSampleClipper",
    "clip_factors",
    "validate_module",
]

Sampler = Callable[[nn.Module, list[Any], torch.Tensor], dict[nn.Parameter, torch.Tensor]]

#: Ghost-norm rules by exact module type: (layer, activations, output grads) -> {param: norms [B]}.
NORM_SAMPLERS: Mapping[type, Sampler] = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
#: Per-sample gradient rules by exact module type: -> {param: grads [B, *param.shape]}.
GRAD_SAMPLERS: Mapping[type, Sampler] = GradSampleModule.GRAD_SAMPLERS

#: Modules that use their children's parameters without calling the children
#: (``nn.MultiheadAttention`` reads ``out_proj.weight`` directly): one unit for the subtree.
OPAQUE_MODULES: tuple[type, ...] = (nn.MultiheadAttention,)


class NonFiniteNormError(FloatingPointError):
    """Some per-sample gradient norm is NaN or infinite; the micro-batch was not accumulated."""


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-sample clipping factors c_i = min(1, C / ‖g_i‖) (Abadi et al. 2016, Alg. 1).

    Args:
        norms: per-sample L2 gradient norms ‖g_i‖, shape [B], finite and >= 0.
        max_grad_norm: C > 0, the L2 bound each clipped gradient c_i·g_i meets.

    A zero gradient gets factor 1, so c_i·g_i = 0.
    """
    return max_grad_norm / norms.clamp(min=max_grad_norm)


def validate_module(module: nn.Module) -> None:
    """Raise ``ValueError`` if ``module`` cannot get per-sample gradients as built.

    Refused: batch normalisation (mixes samples, so one example's gradient
    depends on the others), recurrent ``nn.RNNBase`` layers (hidden states are
    batch-second), and attention or transformer layers with ``batch_first=False``.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("module has no parameter with requires_grad=True: nothing to train")
    for name, sub in module.named_modules():
        where = f"module {name or '<root>'!r} ({type(sub).__name__})"
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"{where} mixes examples in a batch, so per-sample gradients are not defined; "
                "replace it with nn.GroupNorm or nn.LayerNorm"
            )
        if isinstance(sub, nn.RNNBase):
            raise ValueError(
                f"{where} is not supported: use opacus.layers.DPLSTM / DPGRU / DPRNN instead"
            )
        if getattr(sub, "batch_first", True) is False and isinstance(
            sub,
            (
                nn.MultiheadAttention,
                nn.TransformerEncoderLayer,
                nn.TransformerDecoderLayer,
                nn.Transformer,
            ),
        ):
            raise ValueError(
                f"{where} has batch_first=False; dpclip needs the batch dimension first: "
                "build it with batch_first=True"
            )


@dataclass(eq=False)
class _Unit:
    """A module whose forward calls are recorded, and the parameters it answers for."""

    name: str
    module: nn.Module
    params: tuple[nn.Parameter, ...]
    ghost: Sampler | None
    grad_sampler: Sampler | None
    shared: bool = False  # some parameter is also owned by another module (tied weights)


@dataclass(eq=False)
class _Call:
    unit: _Unit
    activations: list[Any]
    outputs: list[torch.Tensor]
    versions: list[int]
    backprops: list[torch.Tensor | None] = field(default_factory=list)


def _build_units(module: nn.Module) -> list[_Unit]:
    owners: dict[nn.Parameter, int] = {}
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None and p.requires_grad:
                owners[p] = owners.get(p, 0) + 1
    shared = {p for p, n in owners.items() if n > 1}

    units: list[_Unit] = []
    opaque: list[nn.Module] = []
    for name, sub in module.named_modules():
        if any(sub is not o and _is_descendant(sub, o) for o in opaque):
            continue
        if isinstance(sub, OPAQUE_MODULES):
            opaque.append(sub)
            params = tuple(p for p in sub.parameters() if p.requires_grad)
            if params:
                units.append(_Unit(name, sub, params, None, None))
            continue
        params = tuple(p for p in sub._parameters.values() if p is not None and p.requires_grad)
        if not params:
            continue
        tied = bool(shared.intersection(params))
        ghost = NORM_SAMPLERS.get(type(sub)) if not tied else None
        units.append(_Unit(name, sub, params, ghost, GRAD_SAMPLERS.get(type(sub)), tied))
    return units


def _is_descendant(sub: nn.Module, ancestor: nn.Module) -> bool:
    return any(sub is m for m in ancestor.modules())


def _one_hot_cotangent(backprops: torch.Tensor) -> torch.Tensor:
    """[B, *shape] -> [B, B, *shape] whose slice i keeps only sample i's row."""
    b = backprops.shape[0]
    eye = torch.eye(b, dtype=backprops.dtype, device=backprops.device)
    return eye.view(b, b, *([1] * (backprops.dim() - 1))) * backprops.unsqueeze(0)


class PerSampleClipper:
    """Records module calls during the forward pass and turns per-sample losses
    into the clipped gradient sum S = Σ_i min(1, C/‖g_i‖) · g_i.

    The clipper registers one forward hook per unit (a module that owns
    trainable parameters) and keeps what it records in its own state until the
    next ``clipped_sum`` call. ``remove()`` detaches the hooks.

    Args:
        module: the model, trained in place (its parameters are the ones used).
        max_grad_norm: C > 0, the per-sample L2 clipping bound.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        validate_module(module)
        self.module = module
        self.max_grad_norm = float(max_grad_norm)
        self.units = _build_units(module)
        self.params: tuple[nn.Parameter, ...] = tuple(
            p for p in module.parameters() if p.requires_grad
        )
        self._owner_name = {p: u.name for u in self.units for p in u.params}
        self._calls: list[_Call] = []
        self._audited = False
        #: per-sample gradient norms ‖g_i‖ of the last micro-batch (not private: debugging only)
        self.last_norms: torch.Tensor | None = None
        self._handles = [
            u.module.register_forward_hook(self._recorder(u), with_kwargs=True) for u in self.units
        ]

    def remove(self) -> None:
        """Detach the hooks; the module is as it was before."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._calls.clear()

    def discard(self) -> None:
        """Forget the forward calls recorded since the last ``clipped_sum``."""
        self._calls.clear()

    def _recorder(self, unit: _Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            outputs = [
                t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad
            ]
            if not outputs:
                return
            activations = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
            self._calls.append(_Call(unit, activations, outputs, [t._version for t in outputs]))

        return hook

    def clipped_sum(self, loss_per_sample: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """S for this micro-batch: {param: Σ_i c_i ∇_param ℓ_i} for every trainable
        parameter that got a gradient (a parameter left out got none).

        Args:
            loss_per_sample: shape [B], ℓ_i of each example, attached to the
                graph of the forward pass recorded since the last call.

        Raises:
            NonFiniteNormError: a per-sample norm is NaN/inf (nothing returned).
            RuntimeError: the recorded forward cannot give per-sample gradients
                (see message); nothing returned.
        """
        calls, self._calls = self._calls, []
        if loss_per_sample.dim() != 1:
            raise ValueError(
                f"Expected per-sample losses of shape [B], got {tuple(loss_per_sample.shape)}"
            )
        if not loss_per_sample.requires_grad:
            raise RuntimeError("the loss does not require grad: no parameter depends on it")
        batch = loss_per_sample.shape[0]
        sq_norms, covered = self._squared_norms(loss_per_sample, calls, batch)
        norms = sq_norms.sqrt()
        bad = int((~torch.isfinite(norms)).sum())
        if bad:
            raise NonFiniteNormError(
                f"{bad} of {batch} per-sample gradient norms are NaN or infinite; "
                "this micro-batch was not accumulated (it counts as empty in its logical batch)"
            )
        self.last_norms = norms.detach()
        factors = clip_factors(norms, self.max_grad_norm).detach()
        grads = torch.autograd.grad(
            (factors * loss_per_sample).sum(), self.params, allow_unused=True
        )
        result = {}
        for p, g in zip(self.params, grads):
            if g is None:
                continue
            if p not in covered:
                raise RuntimeError(
                    f"parameter of {self._owner_name.get(p, 'an unhooked module')!r} received a "
                    "gradient but no per-sample gradient was computed for it: its forward was "
                    "not recorded (run the forward pass with grad enabled, between backward "
                    "calls) or it is used outside its own module's forward"
                )
            result[p] = g
        return result

    def _squared_norms(
        self, loss_per_sample: torch.Tensor, calls: list[_Call], batch: int
    ) -> tuple[torch.Tensor, set[nn.Parameter]]:
        for call in calls:
            if any(t._version != v for t, v in zip(call.outputs, call.versions)):
                raise RuntimeError(
                    f"the output of module {call.unit.name!r} was modified in place after its "
                    "forward (e.g. by nn.ReLU(inplace=True)); use the out-of-place version"
                )
        flat = [t for c in calls for t in c.outputs]
        backprops = (
            torch.autograd.grad(loss_per_sample.sum(), flat, retain_graph=True, allow_unused=True)
            if flat
            else ()
        )
        it = iter(backprops)
        for call in calls:
            call.backprops = [next(it) for _ in call.outputs]
        used = [c for c in calls if any(b is not None for b in c.backprops)]
        by_unit: dict[_Unit, list[_Call]] = {}
        for call in used:
            by_unit.setdefault(call.unit, []).append(call)
        for unit, unit_calls in by_unit.items():
            if unit.grad_sampler is None and (len(unit_calls) > 1 or unit.shared):
                # Its per-sample gradients come through the recorded graph, which would also
                # count the other calls' (or the other owner's) use of the same parameters.
                raise RuntimeError(
                    f"module {unit.name!r} ({type(unit.module).__name__}) runs "
                    f"{len(unit_calls)} times per forward or shares parameters with another "
                    "module; dpclip supports that only for layers with a per-sample rule "
                    f"({', '.join(sorted(t.__name__ for t in GRAD_SAMPLERS))})"
                )
        if not self._audited:
            self._audited = self._audit(loss_per_sample, used)
        for call in used:
            for t, b in zip(call.outputs, call.backprops):
                if b is not None and (t.dim() == 0 or t.shape[0] != batch):
                    raise RuntimeError(
                        f"an output of module {call.unit.name!r} has shape {tuple(t.shape)} but "
                        f"the loss has {batch} per-sample values: dpclip needs batch-first tensors"
                    )

        sq = loss_per_sample.new_zeros(batch)
        covered: set[nn.Parameter] = set()
        per_sample: dict[nn.Parameter, torch.Tensor] = {}
        for unit, unit_calls in by_unit.items():
            covered.update(unit.params)
            if len(unit_calls) == 1 and (norms := self._ghost_norms(unit, unit_calls[0])):
                for n in norms:
                    sq = sq + n.to(sq.dtype) ** 2
                continue
            for call in unit_calls:
                for p, g in self._per_sample_grads(unit, call).items():
                    per_sample[p] = per_sample[p] + g if p in per_sample else g
        for g in per_sample.values():
            sq = sq + g.reshape(batch, -1).to(sq.dtype).pow(2).sum(dim=1)
        return sq, covered

    def _audit(self, loss_per_sample: torch.Tensor, used: list[_Call]) -> bool:
        """Once, on the first micro-batch: the recorded module calls must account for
        each parameter's whole gradient. A weight also used outside its own module
        (``F.linear(h, self.emb.weight)``) would otherwise be under-clipped."""
        full = torch.autograd.grad(
            loss_per_sample.sum(), self.params, retain_graph=True, allow_unused=True
        )
        if any(f is not None and not torch.isfinite(f).all() for f in full):
            return False  # the non-finite check refuses this micro-batch; audit the next one
        own: dict[nn.Parameter, torch.Tensor] = {}
        for call in used:
            # per-call rules see only this call's inputs and output gradients, so paths
            # through other calls don't leak in (graph-path units are single and unshared)
            for p, g in self._per_sample_grads(call.unit, call).items():
                own[p] = own[p] + g.sum(0) if p in own else g.sum(0)
        for p, f in zip(self.params, full):
            if f is None:
                continue
            o = own.get(p, torch.zeros_like(f))
            # A missed use is a whole missing term (relative error ~1); rounding in a float32
            # sum over many examples and positions stays far below √eps (3e-4) in norm.
            tol = math.sqrt(torch.finfo(f.dtype).eps)
            if float((o - f).norm()) > tol * float(f.norm()) + 1e-30:
                raise RuntimeError(
                    f"a parameter of {self._owner_name.get(p, 'an unhooked module')!r} gets "
                    "gradient from outside its own module's forward (e.g. a tied weight passed "
                    "to F.linear): its per-sample norm would be wrong; tie weights by sharing "
                    "the module attribute (head.weight = emb.weight) instead"
                )
        return True

    @staticmethod
    def _ghost_norms(unit: _Unit, call: _Call) -> list[torch.Tensor] | None:
        if unit.ghost is None or len(call.outputs) != 1 or not call.activations:
            return None
        norms = unit.ghost(unit.module, call.activations, call.backprops[0])
        if not all(p in norms for p in unit.params):
            return None  # the rule does not cover this input shape: fall back
        return [norms[p] for p in unit.params]

    @staticmethod
    def _per_sample_grads(unit: _Unit, call: _Call) -> dict[nn.Parameter, torch.Tensor]:
        if unit.grad_sampler is not None and len(call.outputs) == 1 and call.activations:
            grads = unit.grad_sampler(unit.module, call.activations, call.backprops[0])
            if all(p in grads for p in unit.params):
                return {p: grads[p] for p in unit.params}
        outs = [t for t, b in zip(call.outputs, call.backprops) if b is not None]
        cots = [_one_hot_cotangent(b) for b in call.backprops if b is not None]
        with warnings.catch_warnings():
            # vmap over some backward kernels (CPU attention) falls back to a loop and says so
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads = torch.autograd.grad(
                outs,
                unit.params,
                grad_outputs=cots,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        return {p: g for p, g in zip(unit.params, grads) if g is not None}
