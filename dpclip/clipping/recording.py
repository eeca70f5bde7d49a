"""What is recorded during the forward pass, for the one backward that uses it.

The clipper's forward hooks record each call of a module that owns trainable
parameters (a *unit*): a call of a layer whose type has a rule becomes a
``LayerCall`` (its tensor inputs and output), a projection inside
``nn.MultiheadAttention`` becomes a ``LayerCall`` of the linear rule, and its
``bias_k`` / ``bias_v`` one of the broadcast rule (``dpclip.clipping.attention``), and
any other call a ``GraphCall`` (its outputs, whose autograd graph gives exact
per-sample gradients: ``dpclip.clipping.graph``).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten

from dpclip.clipping.attention import AttentionRecorder
from dpclip.clipping.checkpointing import (
    InputFromRerun, autocast_state, checkpoint_region, rerun_keeps_rng, scaled_operand, selective,
    takes_rerun_input,
)
from dpclip.clipping.norms import accumulator
from dpclip.clipping.rules import LINEAR, STRATEGIES, Rule, Target, rule_for
from dpclip.clipping.rules.broadcast import BROADCAST
from dpclip.clipping.rules.elementwise import SCALE
from dpclip.clipping.rules.linear import INPUT_MAJOR_LINEAR
from dpclip.clipping.rules.norm import NORM
from dpclip.independence import ExamplesMixedError, ForwardProbe

if TYPE_CHECKING:
    from dpclip.clipping.memory import SavedActivations

__all__ = [
    "OPAQUE_MODULES",
    "GraphCall",
    "LayerCall",
    "Recorder",
    "Unit",
    "build_units",
    "check_strategies",
    "held",
    "sample_rows",
    "validate_clipping",
]

#: Rules whose calls inside a checkpointed region take their input from the region's
#: re-run in the backward (``dpclip.clipping.checkpointing``), not kept from the forward.
_RERUN_INPUT = (LINEAR, INPUT_MAJOR_LINEAR, NORM)

#: Modules that use their children's parameters without calling the children
#: (``nn.MultiheadAttention`` reads ``out_proj.weight`` directly): one unit for the subtree.
OPAQUE_MODULES: tuple[type, ...] = (nn.MultiheadAttention,)


def held(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, as a recorded call keeps it until the clipped sum: a copy where it is
    a view of at most half of its storage (a classification head's input ``h[:, 0]``, one
    position of the [B, T, d] hidden states), so that keeping it does not keep the whole
    storage alive after autograd has freed it (B·T·d held across the backward for B·d)."""
    t = t.detach()
    try:
        storage = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # no storage (sparse, subclasses)
        return t
    if 2 * t.numel() * t.element_size() <= storage:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def sample_rows(call: LayerCall, t: torch.Tensor) -> torch.Tensor:
    """A few entries of each example's rows of ``t`` (an input or output gradient of the
    call), [B, ≤ 45], in float32 or better: enough to tell two runs of a region apart
    (dropout at rate 0.1 changes an entry with probability 0.18), small beside the layer."""
    rows = call.by_example(t.detach())
    step_t, step_f = max(1, rows.shape[1] // 4), max(1, rows.shape[2] // 8)
    sample = rows[:, ::step_t, ::step_f].reshape(rows.shape[0], -1)
    return sample.to(torch.promote_types(sample.dtype, torch.float32), copy=True)


def operand_checksum(call: LayerCall, n: torch.Tensor) -> torch.Tensor:
    """[2, B]: Σ_t Σ_f q_t r_f n_itf per example (every entry of the call's rows, weighted by
    fixed numbers in [0.5, 2.5], in float64), and the weighted entries' norm: times a
    rounding, a tolerance (one rounding per entry, summed in quadrature). Two tensors whose
    checksums differ by more differ by more than rounding. Float64 copies of an eighth of
    the examples at a time: a quarter of a float32 n's bytes beside it."""
    rows = call.by_example(n.detach())
    b, t, f = rows.shape
    q = 1.5 + torch.sin(0.7548776662 * torch.arange(t, device=rows.device, dtype=torch.float64) + 0.5)
    r = 1.5 + torch.sin(2.3999632297 * torch.arange(f, device=rows.device, dtype=torch.float64))
    out = torch.empty(2, b, device=rows.device, dtype=torch.float64)
    step = max(1, b // 8)
    for i in range(0, b, step):
        weighted = rows[i:i + step].to(torch.float64, copy=True).mul_(r)
        out[0, i:i + step] = weighted.sum(dim=2) @ q
        out[1, i:i + step] = (weighted.square_().sum(dim=2) @ q.square()).sqrt()
    return out


def argument_tensors(args: Iterable[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors of a forward's arguments, also inside (nested) lists, tuples and
    mappings: ``model(batch)`` with a dict of input_ids and attention_mask (a Hugging
    Face ``BatchEncoding`` is a mapping) carries the batch as much as ``model(**batch)``."""
    out: list[torch.Tensor] = []
    for a in (*args, *kwargs.values()) if kwargs else args:
        # (the function recorder calls this for every torch function of the forward: the
        # usual arguments, tensors and numbers, are settled without the Mapping check)
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif type(a) in _LEAVES:
            continue
        elif isinstance(a, (list, tuple)):
            out.extend(argument_tensors(a, {}))
        elif isinstance(a, Mapping):
            out.extend(argument_tensors(a.values(), {}))
    return out


#: Argument types that hold no tensor.
_LEAVES = frozenset({int, float, bool, str, type(None), slice, torch.dtype, torch.device, torch.Size})


@dataclass(eq=False)
class LayerCall:
    """One forward call of a layer whose gradient has a rule.

    ``targets`` maps the rule's roles ("weight", "bias") to the trainable
    parameters (or row blocks) they fill; frozen ones are left out.

    The output itself is not kept (after the forward only autograd's own saved tensors
    should hold it): ``edge``, where its gradient enters the graph (the gradient of the
    output as computed, also if it is changed in place later), and its ``shape`` and
    ``dtype``.

    ``awaits_input``: the input comes with a checkpointed region's re-run in the backward
    (``take_input``), before the output's gradient; until then ``activations`` holds a
    tensor without data (device "meta") of its shape and dtype, for the costs.
    ``changed``: it had been changed in place after the layer.
    ``rerun_input``: each run of the call's checkpointed region hands its input to
    ``take_input`` (given or not).
    ``samples``: under ``memory="low"`` with checkpointing, a few entries per example of
    the input (``rerun_input``) and the output gradient the norms came from, and
    ``rerun``, those of the input a second run of the region gave
    (``dpclip.clipping.memory.rerun_differences``).
    """

    rule: Rule
    module: nn.Module
    activations: list[Any]
    output: torch.Tensor | None
    targets: dict[str, Target]
    strategy: str = "auto"
    #: B when rows are ordered (position, example), as inside attention; None: batch first
    batch_inner: int | None = None
    backprop: torch.Tensor | None = None
    per_sample: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    versions: tuple[int, ...] = ()
    edge: GradientEdge | None = field(default=None, repr=False)
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    awaits_input: bool = False
    rerun_input: bool = False
    changed: bool = False
    #: what the rule takes from the input a re-run gives (None: the input itself); with it,
    #: ``forward_checksum``, ``operand_checksum`` of what it took in the forward, and
    #: ``operand_gap``, how far what ``from_input`` gave in the backward is from it
    #: ([difference, size] per example)
    from_input: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    forward_checksum: torch.Tensor | None = field(default=None, repr=False)
    operand_gap: torch.Tensor | None = field(default=None, repr=False)
    samples: tuple[torch.Tensor | None, torch.Tensor] | None = field(default=None, repr=False)
    rerun: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.output is not None:
            self.edge = get_gradient_edge(self.output)
            self.shape, self.dtype = tuple(self.output.shape), self.output.dtype
            self.output = None
            self.versions = self.current_versions()

    def by_example(self, t: torch.Tensor) -> torch.Tensor:
        """An activation or output gradient as [B, T, features] (T positions per example)."""
        if self.batch_inner is None:
            return t if t.dim() == 3 else t.reshape(t.shape[0], -1, t.shape[-1])
        return t.reshape(-1, self.batch_inner, t.shape[-1]).transpose(0, 1)

    def scale_by_example(self, t: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """An activation or output gradient of the call with example i's rows times c_i
        (factors: [B]), as [rows, features] in the order the rows are stored."""
        f = t.shape[-1]
        if self.batch_inner is None:
            return (t.reshape(factors.shape[0], -1, f) * factors.view(-1, 1, 1)).reshape(-1, f)
        return (t.reshape(-1, self.batch_inner, f) * factors.view(1, -1, 1)).reshape(-1, f)

    def example_sums(self, t: torch.Tensor) -> torch.Tensor:
        """An activation or output gradient of the call summed over each example's
        positions: [B, features]."""
        f = t.shape[-1]
        if self.batch_inner is None:
            return t.reshape(t.shape[0], -1, f).sum(dim=1)
        return t.reshape(-1, self.batch_inner, f).sum(dim=0)

    def add_clipped(self, factors: torch.Tensor, out: dict[nn.Parameter, torch.Tensor]) -> None:
        """Add the call's Σ_i c_i g_i into ``out`` ({param: accumulator}, missing ones
        created by ``accumulator``)."""
        self.rule.clipped_sum(self, factors, {r: accumulator(out, p, rows) for r, (p, rows) in self.targets.items()})

    def take_input(self, x: torch.Tensor, version: int) -> None:
        """The input a checkpointed region's re-run gave (``awaits_input``; made what the
        rule takes by ``from_input``), ``version`` its version counter at the forward; a
        later run's (the second backward of "low"), sampled where the norms' input was
        (``samples``)."""
        if not self.awaits_input and self.samples is None:
            return
        changed = x._version != version
        if self.from_input is not None:
            x = self.from_input(x.detach())
        if self.awaits_input:
            self.activations = [held(x)]
            self.awaits_input = False
            self.changed = changed
            if self.forward_checksum is not None:
                first, again = self.forward_checksum, operand_checksum(self, x)
                self.operand_gap = torch.stack([(again[0] - first[0]).abs(), first[1]])
                self.forward_checksum = None
        else:
            self.rerun = sample_rows(self, x)

    def release(self) -> None:
        """Drop the activations and output gradient (their memory) once the call no longer
        needs them: per-sample gradients computed, or its clipped sum added."""
        self.activations = []
        self.backprop = None

    def current_versions(self) -> tuple[int, ...]:
        """Version counters of the tensor inputs (in-place changes bump them)."""
        return tuple(a._version for a in self.activations if isinstance(a, torch.Tensor))

    def uses_ghost(self) -> bool:
        if self.strategy == "per_sample" or not self.rule.has_ghost(self):
            return False
        if self.strategy == "ghost":
            return True
        ghost, per_sample = self.rule.costs(self)
        # at equal cost the ghost norm: it keeps no [B, p, d] until the clipped sum
        return ghost <= per_sample


@dataclass(eq=False)
class Unit:
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
    #: recorded by operation, its parameter only scaling what the module returns (RMSNorm's
    #: ``w * n``): in a checkpointed region n comes from the module's input in the re-run
    #: (``_scale_from_rerun``); None until a forward tells
    rerun_scale: bool | None = None


@dataclass(eq=False)
class GraphCall:
    """One forward call of a unit without a rule: where its outputs' gradients enter the
    recorded graph, which gives the per-sample gradients.

    As for ``LayerCall``, the outputs themselves are not kept: ``edges`` (the gradient
    of each output as computed, also if it is changed in place later, as Falcon's
    ``mlp_output += attention_output`` does), and their ``shapes`` and ``dtypes``."""

    unit: Unit
    outputs: InitVar[list[torch.Tensor]]
    #: the unit's parameters that were trainable at this forward (frozen ones are left out)
    params: tuple[nn.Parameter, ...]
    edges: list[GradientEdge] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    dtypes: list[torch.dtype] = field(default_factory=list)
    backprops: list[torch.Tensor | None] = field(default_factory=list)
    #: per output, whether the function mode saw it computed without the batch (from
    #: parameters alone: a weight_norm's weight, a [T, D] position table), so that a first
    #: dimension equal to B by chance is not taken for the examples'
    batchless: list[bool] = field(default_factory=list)

    def __post_init__(self, outputs: list[torch.Tensor]) -> None:
        self.edges = [get_gradient_edge(t) for t in outputs]
        self.shapes = [tuple(t.shape) for t in outputs]
        self.dtypes = [t.dtype for t in outputs]


def build_units(module: nn.Module, clipping: str | Mapping[str, str]) -> list[Unit]:
    """The units of ``module`` (submodules that own trainable parameters, an opaque
    module with its subtree), each with its rule and its strategy from ``clipping``."""
    # A parameter that a module also owns under a second name (Opacus's DPLSTM registers
    # its cells' weights as weight_ih_l0, …) is used through the call of the descendant
    # that owns it: the descendant's unit answers for it, the ancestor's does not.
    owned = {
        sub: [
            (r, p) for r, p in sub._parameters.items()
            if p is not None and p.requires_grad and not _owned_below(sub, p)
        ]
        for sub in module.modules()
    }
    # A ParameterDict or ParameterList is never called: the module that holds it uses its
    # parameters in its own forward (peft's LoRA embedding and IA3 keep theirs in one), so
    # that module answers for them, as a module without a rule, under the path "attr.key"
    for sub in module.modules():
        for attr, child in sub._modules.items():
            if isinstance(child, _CONTAINERS) and owned.get(child) and rule_for(sub) is None:
                owned[sub] = owned[sub] + [(f"{attr}.{r}", p) for r, p in owned[child]]
                owned[child] = []
    owners: dict[nn.Parameter, int] = {}
    for named in owned.values():
        for _, p in named:
            owners[p] = owners.get(p, 0) + 1
    shared = {p for p, n in owners.items() if n > 1}
    default = clipping if isinstance(clipping, str) else "auto"
    overrides = {} if isinstance(clipping, str) else dict(clipping)

    units: list[Unit] = []
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
                units.append(Unit(name, sub, params, None, strategy, attention=True, shared=tied))
            continue
        named = owned[sub]
        if not named:
            continue
        roles, params = zip(*named)
        tied = bool(shared.intersection(params))
        units.append(Unit(name, sub, params, rule_for(sub), strategy, shared=tied, roles=roles))
    if overrides:
        raise ValueError(
            f"clipping names {sorted(overrides)}, which are not modules with trainable parameters "
            f"of this model (those are: {[u.name for u in units]})"
        )
    return units


def validate_clipping(module: nn.Module, clipping: str | Mapping[str, str]) -> None:
    """Raise ``ValueError`` unless ``clipping`` is a strategy name or maps names of
    ``module``'s submodules that own trainable parameters to strategy names."""
    check_strategies(clipping)
    build_units(module, clipping)  # refuses names that are not such submodules


def check_strategies(clipping: str | Mapping[str, str]) -> None:
    """Raise ``ValueError`` unless ``clipping`` is a strategy name or a mapping whose
    values are strategy names (its keys are checked by ``build_units``)."""
    values = [clipping] if isinstance(clipping, str) else list(getattr(clipping, "values", list)())
    if not isinstance(clipping, (str, Mapping)) or any(v not in STRATEGIES for v in values):
        raise ValueError(
            f"Expected clipping to be one of {STRATEGIES} or a mapping from module name to one "
            f"of them, got {clipping!r}"
        )


#: Modules that only hold parameters for the module above them.
_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def parameter_at(module: nn.Module, role: str) -> nn.Parameter | None:
    """The parameter a unit's module holds under ``role`` now: a name in its own
    ``_parameters``, or "attr.key" in a ParameterDict / ParameterList it holds; None if none
    (``torch.func.functional_call`` swaps them for the call)."""
    attr, _, key = role.rpartition(".")
    if attr:
        module = module._modules.get(attr)
        if module is None:
            return None
    return module._parameters.get(key)


def _owned_below(sub: nn.Module, p: nn.Parameter) -> bool:
    """Whether a module strictly inside ``sub`` owns ``p`` too."""
    return any(
        m is not sub and any(q is p for q in m._parameters.values()) for m in sub.modules()
    )


def _input_from_rerun(unit: Unit, args: tuple, kwargs: dict, output: Any) -> bool:
    """Whether the call's input goes to autograd on ``InputFromRerun``: a layer with a rule
    on one tensor, whose output requires grad, inside a checkpointed region's forward or its
    re-run (linear and normalisation layers take it from there, ``_RERUN_INPUT``; the
    others keep it from the forward, and "low" compares it with each re-run's)."""
    if unit.rule is None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return False
    return isinstance(output, torch.Tensor) and takes_rerun_input(output)


class _Hook:
    """One of the recorder's module hooks. ``torch.save(model)`` pickles a module with its
    hooks: this one pickles as ``_Inert``, so that a saved private model loads as the
    plain module it is (parameters, buffers, the user's own hooks), without the recorder
    and its state."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[type, tuple]:
        return _Inert, ()


class _Inert:
    """A hook that does nothing: dpclip's, in a model loaded from ``torch.save``."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


def _remove_inert(module: nn.Module) -> None:
    """Take out of the module's tree the hooks a model loaded from ``torch.save`` kept of an
    earlier ``make_private`` (``_Inert``), so that they do not pile up."""
    for m in module.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, _Inert)]:
                del hooks[key]
                for flags in (m._forward_pre_hooks_with_kwargs, m._forward_hooks_with_kwargs,
                              m._forward_hooks_always_called):
                    flags.pop(key, None)


def _same_operand(operand: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: torch.Tensor) -> bool:
    """Whether ``operand(x)`` gives ``n`` bit for bit (a module whose forward it cannot run
    again, e.g. an ``autograd.Function`` without forward-mode derivatives, gives False)."""
    try:
        again = operand(x.detach())
    except Exception:  # noqa: BLE001 - any failure: n is kept from the forward, as before
        return False
    return again.shape == n.shape and torch.equal(again, n.to(again.dtype))


class FunctionRecorderLike(Protocol):
    """What the recorder asks of the recording by operation (``dpclip.clipping.functions``)."""

    active: bool
    root: Unit | None

    def records_calls_of(self, unit: Unit) -> bool: ...
    def start(self, args: tuple, kwargs: dict) -> None: ...
    def stop(self) -> bool: ...
    def take(self) -> list[Any]: ...
    def open(self, unit: Unit) -> None: ...
    def close(self, unit: Unit) -> bool: ...
    def alias(self, new: torch.Tensor, old: torch.Tensor) -> None: ...


def _is_descendant(sub: nn.Module, ancestor: nn.Module) -> bool:
    return any(sub is m for m in ancestor.modules())



class Recorder:
    """The forward hooks of a clipper: each call of a unit is recorded into ``calls``
    until the backward that uses them takes them (``take``).

    The root module's hooks also run the independence probe (``independence``) on
    forwards that record. A forward of ``module`` with gradients enabled that starts
    while an earlier one's records are still unused (evaluation without
    ``torch.no_grad()``) drops them, with a warning (once), so memory holds one
    forward's records, and sets ``dropped``: the next backward must then check that its
    loss did not use the dropped forward.

    Args:
        module: the model.
        units: its units (``build_units``); hooks are registered on their modules.
        check_independence: probe the first forward with at least 2 examples for
            examples that depend on each other (``dpclip.independence``).
    """

    def __init__(
        self,
        module: nn.Module,
        units: list[Unit],
        check_independence: bool,
        functions: FunctionRecorderLike | None = None,
    ) -> None:
        self.module = module
        self.functions = functions
        self.units = units
        self.calls: list[LayerCall | GraphCall] = []
        #: increases whenever the recorded forward calls are used up or dropped; a loss
        #: made from a forward whose records are gone can no longer be clipped
        self.generation = 0
        #: False while the independence probe re-runs the model: nothing is recorded
        self.recording = True
        #: records of an unused forward were dropped; the next backward is audited
        self.dropped = False
        #: the generations whose records were dropped so (the last 64): a loss made from one
        #: is told so at its backward, also after a later backward cleared ``dropped``
        self.dropped_generations: tuple[int, ...] = ()
        #: the last forward ran (partly) under torch.compile: its records are incomplete
        self.compiled = False
        #: a forward of the model itself (not of a submodule alone) recorded since the last
        #: ``take`` or ``discard``: what its lookups recorded by operation need
        self.root_ran = False
        #: size of the leading dimension of the last recorded forward's first tensor input
        #: (the micro-batch size B if the input is batch-first); None without one
        self.forward_batch: int | None = None
        #: set: each recorded forward counts what autograd saves into ``saved_counts``
        #: (bytes, floating-point dtypes: ``SavedActivations.stop``)
        self.saved: SavedActivations | None = None
        self.saved_counts: tuple[int, frozenset[torch.dtype]] | None = None
        #: ``checkpointed``: a call was recorded in a checkpointed region (always seen for
        #: layers with a rule, for every call while ``watch_checkpointing``);
        #: ``rerun_once``: such a region should run again for one backward only: it draws
        #: other random numbers, or (``single_use``) it runs under a context that allows one
        #: backward (selective checkpointing's, debug=True's); both while watching
        self.watch_checkpointing = False
        self.checkpointed = False
        self.rerun_once = False
        self.single_use = False
        #: the clipper runs "low" (set or chosen): ``_input_later``
        self.low = False
        self._warned_dropped = False
        self._warned_empty = False
        self._attention: dict[nn.Module, AttentionRecorder] = {}
        self.independence = ForwardProbe(module, self._rerun, check_independence)
        _remove_inert(module)
        self._handles = [
            module.register_forward_pre_hook(_Hook(self._root_enter), with_kwargs=True),
            # first among the root's forward hooks, and also when the forward raises: the
            # probe's re-run and everything after the forward run without the mode
            module.register_forward_hook(_Hook(self._functions_exit), always_call=True),
            module.register_forward_hook(_Hook(self._saved_exit), always_call=True),
            module.register_forward_hook(_Hook(self._root_exit), with_kwargs=True),
        ]
        for u in units:
            if functions is not None and functions.records_calls_of(u):
                # covered by its operations, or the graph path (the model's own unit: its
                # window is the recording's, closed by ``_functions_exit``)
                if u.rule is None and u.module is not module:
                    self._handles.append(u.module.register_forward_pre_hook(_Hook(self._open(u))))
                    self._handles.append(
                        u.module.register_forward_hook(_Hook(self._call_hook(u)), with_kwargs=True)
                    )
                continue  # a lookup table: its lookups are recorded as operations
            if u.attention:
                self._handles.append(u.module.register_forward_pre_hook(_Hook(self._attention_enter(u))))
                self._handles.append(
                    u.module.register_forward_hook(_Hook(self._attention_exit(u)), always_call=True)
                )
            else:
                self._handles.append(
                    u.module.register_forward_hook(_Hook(self._call_hook(u)), with_kwargs=True)
                )

    def remove(self) -> None:
        """Detach the hooks; the module is as it was before."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.calls.clear()

    def discard(self) -> None:
        """Forget the forward calls recorded since the last ``take``."""
        self.calls.clear()
        self.generation += 1
        self.root_ran = False

    def take(self) -> list[LayerCall | GraphCall]:
        """The calls recorded since the last ``take`` or ``discard``, for the backward
        that uses them up; the forward they came from has been trained on."""
        calls, self.calls = self.calls, []
        self.generation += 1
        self.root_ran = False
        self.independence.trained_on()
        return calls

    def _recording_now(self) -> bool:
        """A forward of the root now records: gradients on, not the probe's re-run, and the
        model's own parameters (not torch.func.functional_call's)."""
        if not self.recording or not torch.is_grad_enabled():
            return False
        unit = self.units[0]
        if unit.attention:
            return any(p is unit.params[0] for p in unit.module.parameters())
        return parameter_at(unit.module, unit.roles[0]) is unit.params[0]

    def _traced(self) -> bool:
        """True while torch.compile traces a hook. A compiled graph that holds a recorded
        output hides that output's gradient (the uses inside the graph never reach it), so
        the hook records nothing and marks the forward for the backward to refuse (the
        mark is replayed by every run of the compiled code; an exception would not reach
        the user: torch.compile runs a hook that raises eagerly instead)."""
        if torch.compiler.is_compiling():
            self.compiled = True
            return True
        return False

    def _root_enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording_now() or self._traced():
            return
        self.compiled = False
        if self.calls:
            # no backward used the last forward (an evaluation with gradients on): keep one
            # forward's records, not all; if a loss does use it, the next backward's audit
            # sees gradient nothing recorded and refuses (a loss made before this is stale)
            self.dropped_generations = (*self.dropped_generations[-63:], self.generation)
            self.discard()
            self.dropped = True
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
        first = next(iter(argument_tensors(args, kwargs)), None)
        self.forward_batch = first.shape[0] if first is not None and first.dim() > 0 else None
        if self.forward_batch == 0 and not self._warned_empty:
            self._warned_empty = True  # (said before the forward: many models fail on it)
            warnings.warn(
                "the model's forward got an empty micro-batch (Poisson sampling draws them, "
                "rarely). A model that cannot run on no examples (many Hugging Face models do "
                "not) raises inside its forward: skip forward and backward "
                "for it and call optimizer.add_empty_micro_batch() instead (the micro-batch "
                "still counts in its logical batch)",
                stacklevel=4,
            )
        self.independence.before_forward()
        if self.functions is not None:
            self.functions.start(args, kwargs)
        if self.saved is not None:
            self.saved.start()
        self.root_ran = True

    def _saved_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.saved is not None:
            counted = self.saved.stop()
            if counted is not None:
                self.saved_counts = counted

    def _functions_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.functions is not None and self.functions.active:
            covered = self.functions.stop()
            self.calls.extend(self.functions.take())
            root = self.functions.root
            if root is not None and not covered:  # the model's own parameters: graph path
                self._call_hook(root)(module, args, {}, output)

    def _open(self, unit: Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            with torch._C.DisableTorchFunction():
                self.functions.open(unit)

        return hook

    def _root_exit(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._recording_now() or self._traced():
            return
        try:
            self.independence.after_forward(args, kwargs, output)
        except ExamplesMixedError:
            self.calls.clear()  # a refused forward leaves nothing behind
            raise

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside: the clipper's backward passes, where gradient checkpointing
        runs parts of the forward again (their records would be left over for the next
        forward to drop, with a false warning that the model ran twice)."""
        recording, self.recording = self.recording, False
        try:
            yield
        finally:
            self.recording = recording

    def _rerun(self, args: tuple, kwargs: dict) -> Any:
        self.recording = False
        try:
            return self.module(*args, **kwargs)
        finally:
            self.recording = True

    def _call_hook(self, unit: Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            # the hook's own reads (t.requires_grad, t.detach(), ...) are not the model's: out
            # of the function recorder's mode, where each would cost a trip through Python
            with torch._C.DisableTorchFunction():
                rerun = _input_from_rerun(unit, args, kwargs, output)
                call = record(module, args, kwargs, output, rerun)
                if unit.rule is None and self.functions is not None:  # (rerun False above)
                    rerun, call = self._scale_from_rerun(unit, args, kwargs, output)
                if not rerun:
                    return None
                self.checkpointed = self.checkpointed or call is not None
                # (recorded or not, in the forward and in the re-run alike)
                slot = call if call is not None and call.rerun_input else None
                result = InputFromRerun.apply(output, args[0].detach(), slot)
                if self.functions is not None and self.functions.active:
                    self.functions.alias(result, output)
                return result

        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any, rerun: bool) -> LayerCall | None:
            if self.functions is not None and self.functions.close(unit):
                return None  # its parameters took part only in operations recorded as such
            if not self.recording or not torch.is_grad_enabled() or self._traced():
                return None
            self._watch_region()
            if isinstance(output, torch.Tensor):  # (the usual case, without flattening)
                outputs = [output] if output.requires_grad else []
            else:
                outputs = [
                    t for t in tree_flatten(output)[0]
                    if isinstance(t, torch.Tensor) and t.requires_grad
                ]
            if not outputs or any(parameter_at(module, r) is not p for r, p in zip(unit.roles, unit.params)):
                return None  # nothing to train, or other parameters (torch.func.functional_call)
            if self.functions is not None and self.functions.active:
                for t in (*args[:1], *outputs):
                    self.functions.refuse_moved(t, f"module {unit.name!r} ({type(module).__name__})")
            trainable = [(r, p) for r, p in zip(unit.roles, unit.params) if p.requires_grad]
            if not trainable:
                return None  # all frozen since make_private
            if unit.rule is not None and len(outputs) == 1 and args and not kwargs:
                targets = {r: (p, None) for r, p in trainable}
                later = rerun and unit.rule in _RERUN_INPUT and self._input_later()
                if later:  # (``InputFromRerun``: the re-run gives it)
                    activations = [torch.empty_like(args[0], device="meta")]
                else:
                    activations = [held(a) if isinstance(a, torch.Tensor) else a for a in args]
                call = LayerCall(
                    unit.rule, module, activations, outputs[0], targets, unit.strategy,
                    awaits_input=later, rerun_input=rerun,
                )
                self.calls.append(call)
                return call
            params = tuple(p for _, p in trainable)
            call = GraphCall(unit, outputs, params)
            if self.functions is not None and self.functions.active and self.functions.batch > 0:
                # an output not computed from the batch (a table of the module's parameters,
                # also one cut to the input's length), only where the mode saw the forward's
                # batched inputs (not a batch object it does not open); a parameter expanded
                # over the batch (stride 0) has a row per example
                call.batchless = [
                    not self.functions.carries_batch(t) and not (t.dim() and t.stride(0) == 0) for t in outputs
                ]
            self.calls.append(call)
            return None

        return hook

    def _watch_region(self) -> None:
        """Note what "low" needs to know of the checkpointed region a recorded call runs in."""
        if self.watch_checkpointing:
            region = checkpoint_region()
            if region is not None:
                self.checkpointed = True
                self.single_use = self.single_use or selective(region)
                self.rerun_once = self.rerun_once or self.single_use or not rerun_keeps_rng(region)

    def _scale_from_rerun(self, unit: Unit, args: tuple, kwargs: dict, output: Any) -> tuple[bool, LayerCall | None]:
        """For a unit recorded by operation: whether its call goes through ``InputFromRerun``
        with the module's input (in the forward and in the re-run alike, as
        ``unit.rerun_scale`` says), and the call that takes it. A module without
        submodules whose one recorded use is a scale whose product it returns (RMSNorm's
        ``w * n``), and whose forward draws no random numbers, is told on its first
        recorded call: if n computed again from its input (``checkpointing.scaled_operand``)
        is the forward's, bit for bit. Its calls in a region that replays the forward's
        random numbers then keep no n from the forward, and compute it from the input the
        re-run gives; a checksum of the forward's n is kept to compare (``operand_checksum``:
        the clipper refuses a difference beyond rounding, state the module's forward reads
        changed since, say)."""
        closed, self.functions.closed = self.functions.closed, []
        if (
            unit.rerun_scale is False or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor)
            or not isinstance(output, torch.Tensor) or not takes_rerun_input(output)
        ):
            return False, None
        call = closed[0] if len(closed) == 1 and isinstance(closed[0], LayerCall) else None
        edge = get_gradient_edge(output)
        if call is None or (
            call.rule is not SCALE or not self.recording or next(unit.module.children(), None) is not None
            or call.edge.node is not edge.node or call.edge.output_nr != edge.output_nr
        ):
            # (None: not told yet, and the re-run, which runs after the forward, cannot tell)
            return bool(unit.rerun_scale), None
        (role,) = (r for r, p in zip(unit.roles, unit.params) if p is call.targets["weight"][0])
        operand = functools.partial(scaled_operand, unit.module, role, autocast=autocast_state(args[0].device.type))
        if unit.rerun_scale is None:
            unit.rerun_scale = _same_operand(operand, args[0], call.activations[0])
            if not unit.rerun_scale:
                return False, None
        if not rerun_keeps_rng(checkpoint_region()):
            return True, None  # (n kept from the forward)
        self._watch_region()
        call.from_input, call.rerun_input = operand, True
        call.forward_checksum = operand_checksum(call, call.activations[0])
        call.activations = [torch.empty_like(call.activations[0], device="meta")]
        call.versions = call.current_versions()
        call.awaits_input = True
        return True, call

    def _input_later(self) -> bool:
        """Whether a call in the running checkpointed region takes its input from the
        region's re-run. Under "low" only if the re-run draws the forward's random numbers
        again: its second backward runs the region once more, and with other dropout masks
        (``preserve_rng_state=False``) the norms, from the first re-run, would not be those
        of the sum. ("auto" before it chose: it takes "fast" where a region does not.)"""
        return not self.low or rerun_keeps_rng(checkpoint_region())

    def _attention_enter(self, unit: Unit) -> Callable[..., None]:
        recorder = AttentionRecorder(unit.params)

        def hook(module: nn.Module, args: tuple) -> None:
            current = {id(p) for p in module.parameters()}
            if any(id(p) not in current for p in unit.params):
                return  # run with other parameters (torch.func.functional_call): not training
            if not torch.is_grad_enabled() or module in self._attention:
                return
            if torch.compiler.is_compiling():
                self.compiled = self.compiled or self.recording  # (``_traced``)
                return
            # also where nothing is recorded (paused): gradient checkpointing runs the forward
            # again in dpclip's backward, and torch refuses a run whose operations differ
            recorder.reset()
            self._attention[module] = recorder
            recorder.__enter__()

        return hook

    def _attention_exit(self, unit: Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            recorder = self._attention.pop(module, None)
            if recorder is None:
                return
            recorder.__exit__(None, None, None)
            # taken out of the recorder: it must not keep the projections' outputs alive
            projections, biases, unsupported = recorder.projections, recorder.biases, recorder.unsupported
            recorder.reset()
            if not self.recording:
                return
            outputs = [
                t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad
            ]
            params = tuple(p for p in unit.params if p.requires_grad)
            if not outputs or not params:
                return
            if unsupported is not None or not projections:
                self.calls.append(GraphCall(unit, outputs, params))
                return
            for x, y, targets, batch, slot in projections:
                later = slot is not None and self._input_later()
                call = LayerCall(
                    LINEAR, module, [torch.empty_like(x, device="meta") if later else held(x)], y, targets,
                    unit.strategy, batch_inner=batch, awaits_input=later, rerun_input=slot is not None,
                )
                self.calls.append(call)
                if slot is not None:
                    slot.call = call
            for expanded, target in biases:
                self.calls.append(
                    LayerCall(BROADCAST, module, [], expanded, {"parameter": target}, unit.strategy)
                )

        return hook

