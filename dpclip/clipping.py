"""Per-sample gradient norms and the clipped gradient sum of one micro-batch.

For a micro-batch with per-sample losses ℓ_1..ℓ_B and per-sample gradients
g_i = ∇_θ ℓ_i, this module computes

    S = Σ_i c_i · g_i,   c_i = min(1, C / ‖g_i‖)

with one backward pass (book-keeping, Bu et al. 2023): forward hooks record
each layer call's input; one backward gives the gradient of Σ ℓ_i with respect
to each recorded *output* (no parameter gradients). Then, per layer call
(``dpclip.layers``):

- the per-sample norms, by ghost norm or per-sample gradient, whichever the
  shapes make cheaper (or as the ``clipping`` strategy says);
- S directly from the same tensors (for Linear Σ_i c_i·g_iᵀa_i), no second
  backward.

Layer calls are Linear, Conv1d/Conv2d, Embedding, the layers Opacus has
per-sample rules for (LayerNorm, GroupNorm, …) and the projections inside
``nn.MultiheadAttention`` (``dpclip.attention``). A parameter used by several
calls (a layer run twice, tied weights) gets its per-sample gradients summed
before the norm. Any other module that owns parameters gets exact per-sample
gradients by a batched vector-Jacobian product through its own recorded graph
(so dropout masks and keyword inputs are those of the real forward), and its
part of S by one vector-Jacobian product with the clipped output gradients.

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
from torch.autograd.profiler import record_function
from torch.utils._pytree import tree_flatten

from dpclip.attention import AttentionRecorder
from dpclip.independence import ExamplesMixedError, ForwardProbe
from dpclip.layers import (
    LINEAR,
    STRATEGIES,
    LayerCall,
    Rule,
    norm_dtype,
    row_sq_norms,
    rule_for,
    scale_rows,
    sq_norms,
)

__all__ = [
    "STRATEGIES",
    "NonFiniteNormError",
    "PerSampleClipper",
    "clip_factors",
    "validate_clipping",
    "validate_module",
]

#: Modules that use their children's parameters without calling the children
#: (``nn.MultiheadAttention`` reads ``out_proj.weight`` directly): one unit for the subtree.
OPAQUE_MODULES: tuple[type, ...] = (nn.MultiheadAttention,)


class NonFiniteNormError(FloatingPointError):
    """Some per-sample gradient norm is NaN or infinite; the micro-batch was not accumulated.

    It counts as an empty micro-batch of its logical batch, so the logical-batch
    boundaries stay where the sampler put them. To skip it, catch the error and carry
    on with the loop: call ``optimizer.step()`` as usual. (A loop that ``continue``s
    past its ``step()`` works too: when the failed micro-batch was the last of its
    logical batch, ``DPOptimizer`` applies that logical batch before raising, and a
    ``step()`` right after is a no-op.)
    """


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
    """A module whose forward calls are recorded, and the parameters it answers for.

    ``rule``: its layer rule (its calls become ``LayerCall``s); ``attention``: an
    ``nn.MultiheadAttention`` whose projections become ``LayerCall``s; neither:
    per-sample gradients through the recorded graph.
    """

    name: str
    module: nn.Module
    params: tuple[nn.Parameter, ...]
    rule: Rule | None
    strategy: str
    attention: bool = False
    shared: bool = False  # some parameter is also owned by another module (tied weights)
    roles: tuple[str, ...] = ()  # the params' names in module._parameters (not attention)


@dataclass(eq=False)
class _GraphCall:
    unit: _Unit
    outputs: list[torch.Tensor]
    versions: list[int]
    #: the unit's parameters that were trainable at this forward (frozen ones are left out)
    params: tuple[nn.Parameter, ...]
    backprops: list[torch.Tensor | None] = field(default_factory=list)


def _build_units(module: nn.Module, clipping: str | Mapping[str, str]) -> list[_Unit]:
    owners: dict[nn.Parameter, int] = {}
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None and p.requires_grad:
                owners[p] = owners.get(p, 0) + 1
    shared = {p for p, n in owners.items() if n > 1}
    default = clipping if isinstance(clipping, str) else "auto"
    overrides = {} if isinstance(clipping, str) else dict(clipping)

    units: list[_Unit] = []
    opaque: list[nn.Module] = []
    for name, sub in module.named_modules():
        if any(sub is not o and _is_descendant(sub, o) for o in opaque):
            continue
        strategy = overrides.pop(name, default)
        if isinstance(sub, OPAQUE_MODULES):
            opaque.append(sub)
            params = tuple(p for p in sub.parameters() if p.requires_grad)
            if params:
                tied = bool(shared.intersection(params))
                units.append(_Unit(name, sub, params, None, strategy, attention=True, shared=tied))
            continue
        named = [(r, p) for r, p in sub._parameters.items() if p is not None and p.requires_grad]
        if not named:
            continue
        roles, params = zip(*named)
        tied = bool(shared.intersection(params))
        units.append(_Unit(name, sub, params, rule_for(sub), strategy, shared=tied, roles=roles))
    if overrides:
        raise ValueError(
            f"clipping names {sorted(overrides)}, which are not modules with trainable parameters "
            f"of this model (those are: {[u.name for u in units]})"
        )
    return units


def validate_clipping(module: nn.Module, clipping: str | Mapping[str, str]) -> None:
    """Raise ``ValueError`` unless ``clipping`` is a strategy name or maps names of
    ``module``'s submodules that own trainable parameters to strategy names."""
    _check_strategies(clipping)
    _build_units(module, clipping)  # refuses names that are not such submodules


def _check_strategies(clipping: str | Mapping[str, str]) -> None:
    values = [clipping] if isinstance(clipping, str) else list(getattr(clipping, "values", list)())
    if not isinstance(clipping, (str, Mapping)) or any(v not in STRATEGIES for v in values):
        raise ValueError(
            f"Expected clipping to be one of {STRATEGIES} or a mapping from module name to one "
            f"of them, got {clipping!r}"
        )


def _is_descendant(sub: nn.Module, ancestor: nn.Module) -> bool:
    return any(sub is m for m in ancestor.modules())


def _foreign_parameters(loss: torch.Tensor, known: set[torch.Tensor]) -> list[nn.Parameter]:
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


def _one_hot_cotangent(backprops: torch.Tensor) -> torch.Tensor:
    """[B, *shape] -> [B, B, *shape] whose slice i keeps only sample i's row."""
    b = backprops.shape[0]
    eye = torch.eye(b, dtype=backprops.dtype, device=backprops.device)
    return eye.view(b, b, *([1] * (backprops.dim() - 1))) * backprops.unsqueeze(0)


class PerSampleClipper:
    """Records layer calls during the forward pass and turns per-sample losses
    into the clipped gradient sum S = Σ_i min(1, C/‖g_i‖) · g_i.

    The clipper registers forward hooks on the modules that own trainable
    parameters and keeps what they record in its own state until the next
    ``clipped_sum`` call. ``remove()`` detaches the hooks. Frozen parameters
    (``requires_grad=False``) are not recorded and cost nothing; a parameter frozen
    later is left out from then on (no part of S, no share of the norms), and one
    frozen when the clipper was built cannot be unfrozen (``clipped_sum`` refuses).

    Norms, clipping factors and S are computed in float32 at least, also for
    half-precision layers, so that ‖c_i·g_i‖ <= C holds to float32 rounding.

    Args:
        module: the model, trained in place (its parameters are the ones used).
        max_grad_norm: C > 0, the per-sample L2 clipping bound.
        clipping: how per-sample norms are computed where a layer has both rules:
            "auto" (mixed: per layer, ghost norm or per-sample gradients,
            whichever costs less for its shapes: ``dpclip.layers.Rule.costs``;
            for Linear on T positions, d inputs, p outputs, ghost when
            T²(d+p) < 64·p·d), "ghost", "per_sample"; or a
            mapping from module names (as in ``named_modules``) to those, "auto"
            for the modules it leaves out. The result is the same up to rounding.
            A parameter used by several calls (a layer run twice, tied weights)
            always gets per-sample gradients, summed before the norm.
        check_independence: probe the first forward with at least 2 examples for
            examples that depend on each other (``dpclip.independence``: one extra
            forward under ``torch.no_grad()``, once); mixing raises
            ``ExamplesMixedError`` from that forward, with nothing recorded. False
            only for a model known to be per-example that the probe refuses.

    A forward of ``module`` with gradients enabled that starts while an earlier one's
    records are still unused (evaluation without ``torch.no_grad()``) drops them, with
    a warning (once), so memory holds one forward's records; the next backward then
    checks that its loss did not use the dropped forward (a loss over two forwards of
    the model), and refuses it if it did.
    """

    def __init__(
        self,
        module: nn.Module,
        max_grad_norm: float,
        clipping: str | Mapping[str, str] = "auto",
        check_independence: bool = True,
    ) -> None:
        validate_module(module)
        _check_strategies(clipping)
        self.module = module
        self.max_grad_norm = float(max_grad_norm)
        self.units = _build_units(module, clipping)
        #: the parameters clipping covers: those trainable when the clipper was built
        self.params: tuple[nn.Parameter, ...] = tuple(
            p for p in module.parameters() if p.requires_grad
        )
        self._covered = set(self.params)
        self._owner_name = {p: u.name for u in self.units for p in u.params}
        #: increases whenever the recorded forward calls are used up or dropped; a loss
        #: made from a forward whose records are gone can no longer be clipped
        self.generation = 0
        self._calls: list[LayerCall | _GraphCall] = []
        self._audited = False
        self._recorders: dict[nn.Module, AttentionRecorder] = {}
        #: True while S is being added into an accumulator (still True if that failed)
        self.writing = False
        #: per-sample gradient norms ‖g_i‖ of the last micro-batch (not private: debugging only)
        self.last_norms: torch.Tensor | None = None
        self.check_independence = bool(check_independence)
        #: False while the independence probe re-runs the model: nothing is recorded
        self.recording = True
        self.independence = ForwardProbe(module, self._rerun, self.check_independence)
        self._dropped = False  # records of an unused forward were dropped; audit the next backward
        self._warned_dropped = False
        self._handles = [
            module.register_forward_pre_hook(self._root_enter, with_kwargs=True),
            module.register_forward_hook(self._root_exit, with_kwargs=True),
        ]
        for u in self.units:
            if u.attention:
                self._handles.append(u.module.register_forward_pre_hook(self._attention_enter(u)))
                self._handles.append(
                    u.module.register_forward_hook(self._attention_exit(u), always_call=True)
                )
            else:
                self._handles.append(
                    u.module.register_forward_hook(self._recorder(u), with_kwargs=True)
                )

    def remove(self) -> None:
        """Detach the hooks; the module is as it was before."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._calls.clear()

    def discard(self) -> None:
        """Forget the forward calls recorded since the last ``clipped_sum``."""
        self._calls.clear()
        self.generation += 1

    @property
    def recorded_calls(self) -> int:
        """Forward calls recorded since the last ``clipped_sum`` or ``discard``."""
        return len(self._calls)

    def check_coverage(self) -> None:
        """Raise ``RuntimeError`` if a trainable parameter of the module is one clipping
        does not cover (frozen when the clipper was built, or added since)."""
        for name, p in self.module.named_parameters():
            if p.requires_grad and p not in self._covered:
                raise RuntimeError(
                    f"parameter {name!r} requires grad but was frozen when the model was made "
                    "private (or added since), so it has no per-example clipping and would get "
                    "no private gradient: freeze it again (requires_grad_(False)), or make a new "
                    "model private with it trainable from the start"
                )

    def _recording_now(self) -> bool:
        """A forward of the root now records: gradients on, not the probe's re-run, and the
        model's own parameters (not torch.func.functional_call's)."""
        if not self.recording or not torch.is_grad_enabled():
            return False
        unit = self.units[0]
        if unit.attention:
            return any(p is unit.params[0] for p in unit.module.parameters())
        return unit.module._parameters.get(unit.roles[0]) is unit.params[0]

    def _root_enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording_now():
            return
        if self._calls:
            # no backward used the last forward (an evaluation with gradients on): keep one
            # forward's records, not all; if a loss does use it, the next backward's audit
            # sees gradient nothing recorded and refuses (a loss made before this is stale)
            self.discard()
            self._audited, self._dropped = False, True
            if not self._warned_dropped:
                self._warned_dropped = True
                warnings.warn(
                    "a forward of the model with gradients enabled started before any "
                    "backward() used the previous one: dpclip dropped the previous forward's "
                    "records, so that memory does not grow. Run evaluation under "
                    "torch.no_grad() (it then costs no recording at all); a loss over several "
                    "forwards of the model is refused at its backward()",
                    stacklevel=5,  # the user's model(x): past this hook and Module.__call__
                )
        self.independence.before_forward()

    def _root_exit(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._recording_now():
            return
        try:
            self.independence.after_forward(args, kwargs, output)
        except ExamplesMixedError:
            self._calls.clear()  # a refused forward leaves nothing behind
            raise

    def _rerun(self, args: tuple, kwargs: dict) -> Any:
        self.recording = False
        try:
            return self.module(*args, **kwargs)
        finally:
            self.recording = True

    def _recorder(self, unit: _Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.recording or not torch.is_grad_enabled():
                return
            outputs = [
                t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad
            ]
            current = module._parameters
            if not outputs or any(current.get(r) is not p for r, p in zip(unit.roles, unit.params)):
                return  # nothing to train, or other parameters (torch.func.functional_call)
            trainable = [(r, p) for r, p in zip(unit.roles, unit.params) if p.requires_grad]
            if not trainable:
                return  # all frozen since make_private
            if unit.rule is not None and len(outputs) == 1 and args and not kwargs:
                targets = {r: (p, None) for r, p in trainable}
                activations = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
                self._calls.append(
                    LayerCall(unit.rule, module, activations, outputs[0], targets, unit.strategy)
                )
                return
            params = tuple(p for _, p in trainable)
            self._calls.append(_GraphCall(unit, outputs, [t._version for t in outputs], params))

        return hook

    def _attention_enter(self, unit: _Unit) -> Callable[..., None]:
        recorder = AttentionRecorder(unit.params)

        def hook(module: nn.Module, args: tuple) -> None:
            current = {id(p) for p in module.parameters()}
            if any(id(p) not in current for p in unit.params):
                return  # run with other parameters (torch.func.functional_call): not training
            if self.recording and torch.is_grad_enabled() and module not in self._recorders:
                recorder.reset()
                self._recorders[module] = recorder
                recorder.__enter__()

        return hook

    def _attention_exit(self, unit: _Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            recorder = self._recorders.pop(module, None)
            if recorder is None:
                return
            recorder.__exit__(None, None, None)
            outputs = [
                t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad
            ]
            params = tuple(p for p in unit.params if p.requires_grad)
            if not outputs or not params:
                return
            if recorder.unsupported is not None or not recorder.projections:
                versions = [t._version for t in outputs]
                self._calls.append(_GraphCall(unit, outputs, versions, params))
                return
            for x, y, targets, batch in recorder.projections:
                self._calls.append(
                    LayerCall(LINEAR, module, [x], y, targets, unit.strategy, batch_inner=batch)
                )

        return hook

    def clipped_sum(
        self,
        loss_per_sample: torch.Tensor,
        out: dict[nn.Parameter, torch.Tensor] | None = None,
    ) -> dict[nn.Parameter, torch.Tensor]:
        """S for this micro-batch: {param: Σ_i c_i ∇_param ℓ_i} for every trainable
        parameter that got a gradient (a parameter left out got none).

        Args:
            loss_per_sample: shape [B], ℓ_i of each example, attached to the
                graph of the forward pass recorded since the last call.
            out: an accumulator to add S into, in place (missing parameters get
                zeros first); returned. Untouched when this raises, unless
                ``writing`` is left True (an error, e.g. out of memory, while adding).

        Raises:
            NonFiniteNormError: a per-sample norm is NaN/inf (nothing returned).
            RuntimeError: the recorded forward cannot give per-sample gradients, or
                the loss depends on a parameter clipping does not cover (see
                message); nothing returned, and the recorded calls are kept when
                the refusal comes before they are used.
        """
        if loss_per_sample.dim() != 1:
            raise ValueError(
                f"Expected per-sample losses of shape [B], got {tuple(loss_per_sample.shape)}"
            )
        if not loss_per_sample.requires_grad:
            raise RuntimeError("the loss does not require grad: no parameter depends on it")
        self.check_coverage()
        if not self._audited:  # once: a trainable module outside the model gets no gradient
            foreign = _foreign_parameters(loss_per_sample, self._covered)
            if foreign:
                raise RuntimeError(
                    f"the loss depends on a trainable parameter (shape {tuple(foreign[0].shape)}) "
                    "that is not a parameter of the private model, so it would get no gradient: "
                    "include its module in the model passed to make_private, or freeze it "
                    "(requires_grad_(False))"
                )
        calls, self._calls = self._calls, []
        self.generation += 1
        self.independence.trained_on()
        batch = loss_per_sample.shape[0]
        # labelled ranges: what benchmarks/phase_profile.py reports per phase (free when not profiling)
        with record_function("dpclip.backward"):
            layer_calls, graph_calls, full = self._backward(loss_per_sample, calls, batch)
        with record_function("dpclip.norms"):
            sq = torch.zeros(batch, dtype=norm_dtype(loss_per_sample.dtype), device=loss_per_sample.device)
            for n in self._layer_sq_norms(layer_calls):
                sq = sq + n.to(sq.dtype)
            graph_grads = self._graph_per_sample(graph_calls)
            for g in graph_grads.values():
                sq = sq + row_sq_norms(g).to(sq.dtype)
            norms = sq.sqrt()
            bad = int((~torch.isfinite(norms)).sum())
        if bad:
            raise NonFiniteNormError(
                f"{bad} of {batch} per-sample gradient norms are NaN or infinite; this micro-batch "
                "was not accumulated and counts as an empty micro-batch of its logical batch. To "
                "skip it, catch dpclip.NonFiniteNormError and carry on with the loop, calling "
                "optimizer.step() as usual"
            )
        if full is not None:
            self._audit(full, layer_calls, graph_grads, norms.new_ones(batch))
        self.last_norms = norms.detach()
        factors = clip_factors(norms, self.max_grad_norm).detach()
        with record_function("dpclip.clipped_sum"):
            self.writing = True  # an error from here on leaves ``out`` partly added to
            result = self._sum(layer_calls, graph_grads, factors, False, {} if out is None else out)
            self.writing = False
            return result

    def _backward(
        self, loss_per_sample: torch.Tensor, calls: list[LayerCall | _GraphCall], batch: int
    ) -> tuple[list[LayerCall], list[_GraphCall], list[tuple[nn.Parameter, torch.Tensor]] | None]:
        """The one backward pass: gradients of Σ ℓ_i at every recorded output (and, on
        the first micro-batch only, at the trainable parameters, for the audit)."""
        for call in calls:
            # the recorded tensors share version counters with the model's: an in-place
            # change after the forward would feed stale values to the norms
            if isinstance(call, LayerCall):
                changed = call.versions != call.current_versions()
            else:
                changed = any(t._version != v for t, v in zip(call.outputs, call.versions))
            if changed:
                name = self._owner_name.get(next(iter(self._params_of(call))), "?")
                raise RuntimeError(
                    f"the input or output of module {name!r} was modified in place after its "
                    "forward (e.g. by nn.ReLU(inplace=True) or x += layer(x)); use the "
                    "out-of-place version"
                )
        graph_calls = [c for c in calls if isinstance(c, _GraphCall)]
        flat = [t for c in calls for t in ([c.output] if isinstance(c, LayerCall) else c.outputs)]
        audit = not self._audited
        trainable = [p for p in self.params if p.requires_grad] if audit else []
        inputs = flat + trainable
        grads = torch.autograd.grad(
            loss_per_sample.sum(), inputs, retain_graph=bool(graph_calls), allow_unused=True
        ) if inputs else ()
        it = iter(grads[: len(flat)])
        layer_calls: list[LayerCall] = []
        used_graph: list[_GraphCall] = []
        for call in calls:
            if isinstance(call, LayerCall):
                call.backprop = next(it)
                if call.backprop is not None:
                    layer_calls.append(call)
            else:
                call.backprops = [next(it) for _ in call.outputs]
                if any(b is not None for b in call.backprops):
                    used_graph.append(call)
        if not layer_calls and not used_graph and not audit:  # (the audit says more)
            raise RuntimeError(
                "the loss depends on no layer call recorded by a forward of the private model "
                "since the last backward(): it was computed from a forward whose records a "
                "backward() already used (dpclip takes one backward() per forward: add the "
                "losses of one forward per example first, loss_a + loss_b), or not from the "
                "model made private"
            )
        self._check_graph_units(used_graph, layer_calls)
        for call in layer_calls:
            if call.backprop.dim() == 0 or call.by_example(call.backprop).shape[0] != batch:
                self._batch_error(call.module, call.output, batch)
        for call in used_graph:
            for t, b in zip(call.outputs, call.backprops):
                if b is not None and (t.dim() == 0 or t.shape[0] != batch):
                    self._batch_error(call.unit.module, t, batch)
        full = [(p, g) for p, g in zip(trainable, grads[len(flat):]) if g is not None]
        return layer_calls, used_graph, (full if audit else None)

    def _batch_error(self, module: nn.Module, t: torch.Tensor, batch: int) -> None:
        name = next((u.name for u in self.units if u.module is module), type(module).__name__)
        raise RuntimeError(
            f"an output of module {name!r} has shape {tuple(t.shape)} but "
            f"the loss has {batch} per-sample values: dpclip needs batch-first tensors"
        )

    @staticmethod
    def _params_of(call: LayerCall | _GraphCall) -> list[nn.Parameter]:
        if isinstance(call, LayerCall):
            return [p for p, _ in call.targets.values()]
        return list(call.params)

    @staticmethod
    def _check_graph_units(used: list[_GraphCall], layer_calls: list[LayerCall]) -> None:
        by_unit: dict[_Unit, int] = {}
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
                    "(Linear, Conv1d/2d, Embedding, LayerNorm, GroupNorm, …)"
                )

    @staticmethod
    def _layer_sq_norms(calls: list[LayerCall]) -> list[torch.Tensor]:
        """‖g_i‖² contributions, one per group of calls whose parameters overlap."""
        uses: dict[nn.Parameter, list[tuple[LayerCall, slice | None]]] = {}
        for call in calls:
            for p, rows in call.targets.values():
                uses.setdefault(p, []).append((call, rows))
        group = {call: call for call in calls}

        def find(c: LayerCall) -> LayerCall:
            while group[c] is not c:
                c = group[c]
            return c

        for entries in uses.values():
            for i, (a, ra) in enumerate(entries):
                for b, rb in entries[i + 1:]:
                    if _overlap(ra, rb):
                        group[find(a)] = find(b)
        groups: dict[LayerCall, list[LayerCall]] = {}
        for call in calls:
            groups.setdefault(find(call), []).append(call)
        out = []
        for members in groups.values():
            if len(members) == 1:
                out.append(sq_norms(members[0]))
                if members[0].per_sample is not None:
                    members[0].release()  # the clipped sum comes from the per-sample gradients
                continue
            summed: dict[nn.Parameter, torch.Tensor] = {}
            for call in members:
                call.per_sample = call.rule.per_sample_grads(call)
                call.release()
                for role, g in call.per_sample.items():
                    p, rows = call.targets[role]
                    full = summed.get(p)
                    if full is None:
                        full = summed[p] = g.new_zeros(
                            (g.shape[0], *p.shape), dtype=norm_dtype(g.dtype)
                        )
                    if rows is None:
                        full += g
                    else:
                        full[:, rows] += g
            out.append(sum(row_sq_norms(g) for g in summed.values()))
        return out

    @staticmethod
    def _graph_per_sample(calls: list[_GraphCall]) -> dict[nn.Parameter, torch.Tensor]:
        """{param: ∇ ℓ_i stacked over i} for the graph-path calls; the clipped sum is taken
        from these same tensors, so that the norm and what is added agree to the last bit
        (a second vector-Jacobian product in half precision would round differently)."""
        out: dict[nn.Parameter, torch.Tensor] = {}
        for call in calls:
            outs = [t for t, b in zip(call.outputs, call.backprops) if b is not None]
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

    @staticmethod
    def _sum(
        layer_calls: list[LayerCall],
        graph_grads: dict[nn.Parameter, torch.Tensor],
        factors: torch.Tensor,
        retain_graph: bool,
        out: dict[nn.Parameter, torch.Tensor],
    ) -> dict[nn.Parameter, torch.Tensor]:
        """Add Σ_i c_i g_i into ``out`` (zeros in ``norm_dtype`` allocated for parameters
        it lacks: a half-precision accumulator would round each example's c_i·g_i)."""

        def target(p: nn.Parameter, rows: slice | None) -> torch.Tensor:
            if p not in out:
                out[p] = torch.zeros_like(
                    p, dtype=norm_dtype(p.dtype), memory_format=torch.contiguous_format
                )
            return out[p] if rows is None else out[p][rows]

        for call in layer_calls:
            views = {role: target(p, rows) for role, (p, rows) in call.targets.items()}
            call.rule.clipped_sum(call, factors, views)
            if not retain_graph:  # the last use: free as we go (the audit sums twice)
                call.release()
                call.per_sample = None
        for p, g in graph_grads.items():
            t = target(p, None)
            g, c = g.to(t.dtype), factors.to(t.dtype)
            if t.is_contiguous():
                t.view(-1).addmv_(g.reshape(g.shape[0], -1).t(), c)
            else:
                t.add_(torch.einsum("b,b...->...", c, g))
        return out

    def _audit(
        self,
        full: list[tuple[nn.Parameter, torch.Tensor]],
        layer_calls: list[LayerCall],
        graph_grads: dict[nn.Parameter, torch.Tensor],
        ones: torch.Tensor,
    ) -> None:
        """Once, on the first micro-batch: the recorded calls must account for each
        trainable parameter's whole gradient. A weight also used outside its own module
        (``F.linear(h, self.emb.weight)``) would otherwise be under-clipped."""
        if any(not torch.isfinite(f).all() for _, f in full):
            return  # the non-finite check refuses this micro-batch; audit the next one
        own = self._sum(layer_calls, graph_grads, ones, retain_graph=True, out={})
        # The whole gradient's norm sets an absolute floor: a parameter whose true gradient
        # is 0 (a LayerNorm over one feature, an attention key bias) gets only rounding.
        total = math.sqrt(sum(float(f.double().norm()) ** 2 for _, f in full))
        for p, f in full:
            o = own.get(p, torch.zeros_like(f)).to(f.dtype)
            # A missed use is a whole missing term (relative error ~1); rounding in a float32
            # sum over many examples and positions stays far below √eps (3e-4) in norm.
            tol = math.sqrt(torch.finfo(f.dtype).eps)
            if float((o - f).norm()) > tol * (float(f.norm()) + total) + 1e-30:
                if self._dropped:
                    raise RuntimeError(
                        f"a parameter of {self._owner_name.get(p, 'an unhooked module')!r} gets "
                        "gradient that this forward's records do not account for: the loss uses "
                        "a forward of the model whose records dpclip dropped when the next "
                        "forward with gradients enabled started. A loss over several forwards "
                        "of the model (e.g. siamese pairs) cannot be clipped per example this "
                        "way: compute it in one forward of a module that takes all its inputs "
                        "(forward(x1, x2)), and evaluate under torch.no_grad(). (Or the "
                        "parameter is used outside its own module, e.g. a tied weight passed to "
                        "F.linear: tie it by sharing the module attribute.) Nothing was "
                        "accumulated"
                    )
                raise RuntimeError(
                    f"a parameter of {self._owner_name.get(p, 'an unhooked module')!r} gets "
                    "gradient from outside its own module's forward (e.g. a tied weight passed "
                    "to F.linear): its per-sample norm would be wrong; tie weights by sharing "
                    "the module attribute (head.weight = emb.weight) instead"
                )
        self._audited, self._dropped = True, False


def _overlap(a: slice | None, b: slice | None) -> bool:
    if a is None or b is None:
        return True
    return a.start < b.stop and b.start < a.stop
