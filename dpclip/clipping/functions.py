"""Recording by operation: the torch functions in which a trainable parameter takes
part, wherever they run, and which tensors carry the batch.

``FunctionRecorder`` is a torch-function mode, entered by the recorder's root
pre-hook and left by its post-hook, so it sees every torch function of the
model's forward. It records:

- ``F.embedding`` on a trainable weight (any ``nn.Embedding`` subclass, such as
  Hugging Face's scaled word embeddings, or a bare call): the embedding rule;
- ``torch.addmm(b, a, W)``, ``a @ W`` and ``F.linear(a, W, b)`` with a trainable W
  of a module that has no rule of its own (GPT-2's ``Conv1D``): the linear rules;
- ``w * x`` / ``x * w`` and ``x + b`` / ``b + x`` with a trainable parameter of such a
  module whose shape is x's trailing shape, x batch-first (the weight of T5's
  ``T5LayerNorm`` and Llama's ``LlamaRMSNorm``, applied after a normalisation computed
  in the module): the elementwise rules;
- a trainable parameter of such a module broadcast over the batch otherwise: in an add,
  sub, mul or div with a batch-first x where it has a leading dimension of size 1 or
  fewer dimensions than x (ViT's ``embeddings + position_embeddings``, [1, T, D]), the
  operation is given the parameter's view expanded over the batch; ``p.expand(B, …)``
  (ViT's ``cls_token.expand(B, -1, -1)``) is recorded once the expanded view meets
  batch-first tensors aligned at the batch dimension (a ``torch.cat`` or ``stack`` along
  another dimension, a broadcasting add/sub/mul/div of as many dimensions), and
  ``p.expand_as(x)`` at once: the broadcast rule, from the gradient of the expanded view;
- ``F.prelu(x, w)`` with a trainable w of such a module: the PReLU rule;
- ``F.conv1d/2d/3d`` with a trainable weight or bias of such a module on a batch-first
  x (a convolution subclass with its own ``forward``, a bare call): the convolution rule;
- ``F.layer_norm`` / ``F.group_norm`` with a trainable weight or bias of such a module
  on a batch-first x (a LayerNorm subclass with its own ``forward``, such as ConvNeXt's
  channels-first one): the normalisation rule;
- ``x @ w.T`` (``w.t()``, ``w.transpose(0, 1)``) with a trainable 2-D w of such a
  module (Falcon's ``FalconLinear``): the linear rule;
- a view of such a parameter that only adds or drops dimensions of size 1
  (``w[:, None, None]``, ``w.view(1, -1, 1, 1)``, ``w.unsqueeze(-1)``), and ``1 + w``,
  ``w + c`` for a number c, ``w.float()``, ``w.to(dtype)`` (Gemma's RMSNorm scales by
  ``1 + w`` in float32), are followed as the parameter itself into the elementwise and
  broadcast rules: their gradient is the parameter's, element for element;
- batch provenance: the tensors derived from the root forward's tensor inputs
  carry the batch; a lookup on ids that do not (position ids ``[1, T]`` from
  ``torch.arange``, T5's ``[T, T]`` relative-position buckets) has no batch
  dimension, whatever its shape. Its output and what is computed from it alone
  are followed until they meet a batched tensor in a broadcasting add, sub, mul
  or div (``BroadcastCall``): there the batch-less operand is replaced by a view
  expanded over the batch, whose gradient in the one backward is each example's
  own cotangent; a batched vector-Jacobian product back to the lookup's output,
  taken as the backward reaches the meeting (``BroadcastCall.watch``), gives each
  example's cotangent there (``resolve_broadcast``), and the embedding rule the
  per-example gradient. Only graph edges of these tensors are held, not their memory.

The model itself, if it owns parameters and has no rule, is such a module: its window
is its whole forward.

A module without a rule whose parameters take part only in recorded operations
during its forward is covered by them; if any of its parameters takes part in
another operation, what was recorded for it in that forward call is dropped and
the module takes the exact graph path (``dpclip.clipping.graph``).

Ops that involve neither a followed nor a batched tensor nor a watched
parameter cost one pass over their arguments.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode

from dpclip.clipping.recording import LayerCall, Unit, argument_tensors, held
from dpclip.clipping.rules import Rule, Target
from dpclip.clipping.rules.broadcast import BROADCAST, per_example_shape
from dpclip.clipping.rules.elementwise import SCALE, SHIFT
from dpclip.clipping.rules.conv import functional_conv_rule
from dpclip.clipping.rules.embedding import EmbeddingRule, embedding_rule
from dpclip.clipping.rules.linear import INPUT_MAJOR_LINEAR, LINEAR
from dpclip.clipping.rules.norm import functional_norm_rule
from dpclip.clipping.rules.prelu import PRELU

__all__ = ["BroadcastCall", "FunctionRecorder", "resolve_broadcast"]

#: Elementwise functions that broadcast their operands: where a batch-less operand
#: meets a batched one in these, each example's share of its gradient is known.
_BROADCASTING = frozenset(
    {
        f"{prefix}{op}{suffix}"
        for op in ("add", "sub", "mul", "div", "truediv")
        for prefix, suffix in (("", ""), ("", "_"), ("__", "__"), ("__r", "__"), ("__i", "__"))
    }
    | {"where", "masked_fill", "scaled_dot_product_attention"}  # the mask is added to scores
)

#: Elementwise products and sums whose operand may be a parameter broadcast over x.
_SCALING = frozenset({torch.mul, torch.Tensor.mul, torch.Tensor.__mul__})
_SHIFTING = frozenset({torch.add, torch.Tensor.add, torch.Tensor.__add__})
#: Elementwise operations in which a parameter broadcast over the batch is recorded.
_BROADCAST_ARITHMETIC = _SCALING | _SHIFTING | frozenset(
    {
        torch.sub, torch.Tensor.sub, torch.Tensor.__sub__,
        torch.div, torch.Tensor.div, torch.Tensor.__truediv__,
    }
)
#: Additions that may add a number to a parameter: (1 + w) is followed as w.
_ADDING = frozenset({torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__})
#: Products that may take a parameter's transpose: x @ w.T is a linear layer's forward.
_MATMUL = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__})
#: Functions (by name) whose batched output has its dimensions where their batched input
#: had them: elementwise maps, and maps of the last dimension (linear layers, norms, softmax).
_KEEPING = frozenset(
    {"linear", "matmul", "__matmul__", "embedding", "tanh", "relu", "gelu", "silu", "sigmoid", "dropout",
     "softmax", "log_softmax", "layer_norm", "contiguous", "clone", "float", "double", "half",
     "bfloat16", "neg", "__neg__", "exp", "square", "sqrt", "rsqrt"}
    | {f"{prefix}{op}{suffix}" for op in ("add", "sub", "mul", "div", "truediv")
       for prefix, suffix in (("", ""), ("__", "__"), ("__r", "__"))}
)
#: Functions that may move a tensor's first dimension elsewhere.
_MOVING = frozenset({"transpose", "swapaxes", "swapdims", "permute", "t", "movedim", "moveaxis"})
#: Functions that join tensors along a dimension: an expanded parameter joined with
#: batch-first tensors along another dimension than the batch's is aligned with them.
_JOINING = frozenset({torch.cat, torch.concat, torch.concatenate, torch.stack})
#: Normalisations with an elementwise weight and bias, and their arguments in order.
_NORMALISING = {
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
}
#: Convolutions, by their number of spatial dimensions.
_CONVOLVING = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
#: Functions that may give a view of a parameter with dimensions of size 1 added or dropped.
_VIEWING = frozenset(
    {
        torch.Tensor.__getitem__, torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.view,
        torch.Tensor.reshape, torch.reshape, torch.Tensor.squeeze, torch.squeeze,
    }
)


@dataclass(frozen=True)
class Meeting:
    """A place where a tensor P computed from a lookup's output alone met the batch: the
    operation used P_b, P's view expanded over the batch, instead (P_b's gradient is per
    example). Only graph edges are held, not the tensors (their memory).

    ``p``: P's gradient edge, None when P is the lookup's output itself; ``shape``: P's;
    ``pb``: P_b's edge; ``aligned``: P's leading dimension already had the batch size (a
    batch-less ``expand(B, T)``), so P_b's row i is example i's, not a broadcast.
    """

    p: GradientEdge | None
    shape: tuple[int, ...]
    pb: GradientEdge
    aligned: bool

    def cotangents(self, g: torch.Tensor, batch: int) -> torch.Tensor:
        """Example i's cotangent on P, [B, *shape], from P_b's gradient ``g``: its row of
        g (broadcast), or g's row i alone (aligned)."""
        return _one_hot(g) if self.aligned else g.reshape(batch, *self.shape)


@dataclass(eq=False)
class BroadcastCall:
    """An embedding lookup on ids without a batch dimension (``edge``: where its
    output's gradient enters the graph; ``shape``, ``dtype``: the output's), and the
    places where a tensor computed from its output alone met the batch (``meetings``).
    """

    rule: Rule
    module: nn.Module
    ids: torch.Tensor
    edge: GradientEdge
    shape: tuple[int, ...]
    dtype: torch.dtype
    targets: dict[str, Target]
    strategy: str
    meetings: list[Meeting] = field(default_factory=list)
    #: Σ over the meetings at a P other than the output of the per-example cotangents
    #: carried back from P to the output ([B, *shape]; ``watch``)
    through: torch.Tensor | None = None

    def inputs(self) -> list[GradientEdge]:
        """Where ``resolve_broadcast`` needs the gradients: the output, then each P_b."""
        return [self.edge, *(m.pb for m in self.meetings)]

    def watch(self, batch: int) -> list[Any]:
        """Hooks that, as the backward pass reaches each meeting at a P computed from the
        output, carry its per-example cotangents back to the output (into ``through``):
        then, before the pass frees the operations between them, so it needs not keep
        the graph for after it. Returns the hook handles (remove them after the pass)."""
        handles = []
        for m in self.meetings:
            if m.p is None:
                continue

            def hook(grads: tuple[torch.Tensor | None, ...], m: Meeting = m) -> None:
                g = grads[m.pb.output_nr]
                if g is None:
                    return
                t = _batched_vjp(m.p, self.edge, m.cotangents(g, batch))
                self.through = t if self.through is None else self.through + t

            handles.append(m.pb.node.register_prehook(hook))
        return handles


def _batched_vjp(output: GradientEdge, edge: GradientEdge, cotangents: torch.Tensor) -> torch.Tensor:
    """The vector-Jacobian products of ``output`` at ``edge`` for each of ``cotangents``
    ([B, ...]), stacked: one vmapped pass, or one pass each where that pass runs a
    checkpointed region again with random operations (dropout), which vmap refuses
    (T5 with its default dropout under gradient checkpointing)."""
    try:
        (t,) = torch.autograd.grad(
            [output], [edge], grad_outputs=[cotangents], retain_graph=True, is_grads_batched=True,
        )
        return t
    except RuntimeError as err:
        if "random operations inside of vmap" not in str(err):
            raise
    return torch.stack([
        torch.autograd.grad([output], [edge], grad_outputs=[c], retain_graph=True)[0] for c in cotangents
    ])


def resolve_broadcast(
    call: BroadcastCall, grads: list[torch.Tensor | None], batch: int, name: str
) -> LayerCall | None:
    """The lookup as a ``LayerCall`` with per-example output gradients, from the
    gradients of ``call.inputs()`` in the one backward; None when the loss does not
    depend on the lookup.

    Raises ``RuntimeError`` when the per-example cotangents do not add up to the
    output's whole gradient: the lookup's output reached the loss other than through
    the broadcasting operations followed (its per-example gradient would be wrong).
    """
    total, *met = grads
    if total is None:
        return None
    pairs = [(m, g) for m, g in zip(call.meetings, met) if g is not None]
    if pairs and all(m.aligned and m.p is None for m, _ in pairs):
        # row i of the output is example i's: an ordinary batch-first lookup
        backprop = pairs[0][1] if len(pairs) == 1 else sum(g for _, g in pairs)
        ids = call.ids
        summed = backprop
    else:
        backprop = torch.zeros((batch, *call.shape), dtype=total.dtype, device=total.device)
        for m, g in pairs:
            if m.p is None:
                backprop = backprop + m.cotangents(g, batch)
        if call.through is not None:
            backprop = backprop + call.through
        ids = call.ids.expand(batch, *call.ids.shape)
        summed = backprop.sum(dim=0)
    tol = math.sqrt(torch.finfo(total.dtype).eps)
    if float((summed - total).norm()) > tol * float(total.norm()) + 1e-30:
        raise RuntimeError(
            f"the embedding lookup of module {name!r} on ids without a batch dimension (shape "
            f"{tuple(call.ids.shape)}) reaches the loss other than through broadcasting "
            "add/sub/mul/div onto batch-first tensors, which is where dpclip can tell each "
            "example's share of its gradient: combine it with the batch by broadcasting "
            "(x + pos_emb), or pass ids with the batch dimension (expanded from the input). "
            "Ids expanded from a buffer or a constant have no batch either, even at shape "
            "[B, n]: peft's prompt tuning, prefix tuning and P-tuning look up their virtual "
            "tokens so and join them to the input along the sequence, which is not supported "
            "(LoRA is)"
        )
    return LayerCall(
        call.rule, call.module, [ids], None, call.targets, call.strategy, backprop=backprop,
        edge=call.edge, shape=call.shape, dtype=call.dtype,
    )


def _one_hot(g: torch.Tensor) -> torch.Tensor:
    """[B, *shape] -> [B, B, *shape] whose slice i keeps only row i."""
    b = g.shape[0]
    eye = torch.eye(b, dtype=g.dtype, device=g.device)
    return eye.view(b, b, *([1] * (g.dim() - 1))) * g.unsqueeze(0)


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """A call's arguments by parameter name (``names`` in order); None for a call that
    does not fit them."""
    bound = dict(zip(names, args))
    if len(args) > len(names) or any(k not in names or k in bound for k in kwargs):
        return None
    bound.update(kwargs)
    return bound


def _dim_kind(func: Any) -> str:
    """"keep", "move" or "other": what ``func`` does to where its input's batch is."""
    name = getattr(func, "__name__", "")
    if name in _KEEPING or func is F.linear:
        return "keep"
    if name in _MOVING or (name == "__get__" and func in (torch.Tensor.T.__get__, torch.Tensor.mT.__get__)):
        return "move"
    return "other"


def _moved_dim(func: Any, args: tuple, dim: int) -> int | None:
    """Where dimension ``dim`` of ``args[0]`` is in the result of ``func(*args)``, a
    ``"move"`` of ``_dim_kind`` (``x.T``, ``x.mT``, ``x.t()``, ``transpose``, ``swapaxes``,
    ``permute``); None where that is not told."""
    x, name = args[0], getattr(func, "__name__", "")
    if func == torch.Tensor.T.__get__:
        return x.dim() - 1 - dim
    if func == torch.Tensor.mT.__get__:
        return {x.dim() - 1: x.dim() - 2, x.dim() - 2: x.dim() - 1}.get(dim, dim)
    if name == "t" and x.dim() == 2:
        return 1 - dim
    if name in ("transpose", "swapaxes", "swapdims") and len(args) == 3:
        if not all(isinstance(d, int) for d in args[1:]):
            return None
        a, b = (d % x.dim() for d in args[1:])
        return b if dim == a else a if dim == b else dim
    if name == "permute":
        order = args[1] if len(args) == 2 and not isinstance(args[1], int) else args[1:]
        order = [int(d) % x.dim() for d in order]
        return order.index(dim) if dim in order else None
    return None


def _transposes(func: Any, args: tuple) -> bool:
    """Whether ``func(*args)`` swaps the two dimensions of a 2-D ``args[0]`` as ``w.T``,
    ``w.mT``, ``w.t()`` or ``w.transpose(0, 1)`` do."""
    name = getattr(func, "__name__", "")
    return (
        name in ("__get__", "t", "transpose") and _dim_kind(func) == "move"
        and args[0].dim() == 2 and len(args) in (1, 3) and _moved_dim(func, args, 0) == 1
    )


#: Names of the torch functions that draw random numbers, or may (attention with its
#: dropout: the arguments are not looked at): dropout, the samplers, randomised layers.
_RANDOM = frozenset({
    "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "alpha_dropout_",
    "feature_alpha_dropout", "feature_alpha_dropout_", "feature_dropout", "feature_dropout_",
    "native_dropout", "scaled_dot_product_attention", "multi_head_attention_forward",
    "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like",
    "randperm", "normal", "normal_", "uniform_", "random_", "exponential_", "geometric_", "cauchy_",
    "log_normal_", "poisson", "multinomial", "gumbel_softmax", "rrelu", "rrelu_", "rrelu_with_noise",
    "fractional_max_pool2d", "fractional_max_pool3d", "fractional_max_pool2d_with_indices",
    "fractional_max_pool3d_with_indices",
})


def _outputs(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (list, tuple)):
        return [t for t in result if isinstance(t, torch.Tensor)]
    return []


class FunctionRecorder(TorchFunctionMode):
    """Active during each recording forward of the model (``start`` / ``stop``);
    ``take`` hands over what it recorded.

    Args:
        module: the model (its own parameters, if it has no rule, are recorded by
            operation over its whole forward, ``root``).
        units: the model's units. Lookups on the parameters of the units recorded by
            operation (``records_calls_of``) are recorded wherever they run; linear
            operations only on parameters that no module-recorded unit owns (an
            ``nn.Linear`` tied to an embedding records its own calls).
    """

    def __init__(self, module: nn.Module, units: list[Unit]) -> None:
        super().__init__()
        self._units = {
            u for u in units if not u.attention
            and (u.rule is None or u.module is not module and isinstance(u.rule, EmbeddingRule))
        }
        #: the model's own unit, if it has no rule: its window opens at ``start`` and
        #: closes at ``stop``, which says whether the operations recorded cover it
        self.root = next((u for u in self._units if u.module is module), None)
        by_module = {p for u in units if u not in self._units for p in u.params}
        self._owner: dict[int, tuple[nn.Parameter, Unit]] = {}
        for u in units:
            if u in self._units:
                for p in u.params:
                    self._owner.setdefault(id(p), (p, u))
        self._linear_ok = {k for k, (p, _) in self._owner.items() if p not in by_module}
        self.active = False
        self.batch = 0
        self._records: list[LayerCall | BroadcastCall] = []
        #: what the last call of ``close`` that returned True found recorded for its unit,
        #: if no random operation ran in it (its forward is a function of its input)
        self.closed: list[LayerCall | BroadcastCall] = []
        self._batched: dict[int, weakref.ref] = {}
        self._derived: dict[int, tuple[weakref.ref, tuple[BroadcastCall, ...]]] = {}
        #: p.expand(B, …) not yet seen aligned with batch-first tensors, and its record
        self._pending: dict[int, tuple[weakref.ref, LayerCall]] = {}
        #: views of a watched parameter that only add or drop dimensions of size 1
        #: (``w[:, None, None]``, ``w.view(1, -1, 1, 1)``), and tensors whose gradient is the
        #: parameter's element for element (``1 + w``, ``w.float()``): the parameter
        self._views: dict[int, tuple[weakref.ref, nn.Parameter]] = {}
        #: transposes of a watched 2-D parameter (``w.T``, ``w.t()``), and the parameter
        self._transposed: dict[int, tuple[weakref.ref, nn.Parameter]] = {}
        #: batched tensors whose batch dimension is known to be another than the first (a
        #: transpose to sequence-first, [T, B, ·]), and its index; None: unknown (after an
        #: operation on such a tensor that is neither ``_KEEPING`` nor ``_MOVING``); a
        #: batched tensor not in it has its batch first
        self._batch_dims: dict[int, tuple[weakref.ref, int | None]] = {}
        self._dim_kinds: dict[Any, str] = {}
        self._unrecognised: dict[int, int] = {}
        #: (unit, its first record, its parameters' unrecognised uses, random operations
        #: so far) of each module call running
        self._windows: list[tuple[Unit, int, int, int]] = []
        #: random operations (``_RANDOM``) the mode has seen
        self._random = 0
        #: each torch function's ``_kind`` and whether it is random (``_RANDOM``)
        self._kinds: dict[Any, tuple[str, bool]] = {}

    @property
    def needed(self) -> bool:
        """Whether any unit is recorded by operation. Without one the mode would record
        nothing (e.g. LoRA with frozen embeddings), and its cost (a trip through Python for
        every torch function and tensor attribute read in the forward) is left out."""
        return bool(self._units)

    # --- the recorder's hooks -------------------------------------------------------------

    def start(self, args: tuple, kwargs: dict) -> None:
        """Enter the mode for a root forward whose tensor inputs carry the batch."""
        inputs = argument_tensors(args, kwargs)
        self.batch = inputs[0].shape[0] if inputs and inputs[0].dim() > 0 else 0
        for t in inputs:
            self._batched[id(t)] = weakref.ref(t)
        self.active = True
        if self.root is not None:
            self._windows.append((self.root, len(self._records), self._uses(self.root), self._random))
        self.__enter__()

    def stop(self) -> bool:
        """Leave the mode (the root forward ended, or raised); keep the records. True if
        the model's own parameters (``root``) took part only in recorded operations; if
        not, their records are dropped (the model takes the graph path)."""
        if not self.active:
            return False
        covered = self.root is not None and self.close(self.root)
        self.active = False
        self.__exit__(None, None, None)
        self._batched.clear()
        self._derived.clear()
        self._pending.clear()
        self._transposed.clear()
        self._batch_dims.clear()
        self._windows.clear()
        return covered

    def lookup_params(self) -> set[nn.Parameter]:
        """The parameters whose uses are recorded only while the mode is on, inside the
        model's own call: lookup tables' and the model's own (the other units recorded by
        operation fall back to their module's hook, and the graph path, outside it)."""
        return {
            p for p, u in self._owner.values()
            if u is self.root or isinstance(u.rule, EmbeddingRule)
        }

    def records_calls_of(self, unit: Unit) -> bool:
        """Whether ``unit``'s calls are recorded by operation rather than by its module
        hook: a lookup table, or a module without a rule (covered by its operations, or
        else the graph path)."""
        return unit in self._units

    def take(self) -> list[LayerCall | BroadcastCall]:
        records, self._records = self._records, []
        return records

    def open(self, unit: Unit) -> None:
        """A forward call of ``unit`` (no rule of its own) starts."""
        if self.active:
            self._windows.append((unit, len(self._records), self._uses(unit), self._random))

    def close(self, unit: Unit) -> bool:
        """The forward call of ``unit`` ends: True if what was recorded by operation
        covers every use of its parameters in it; otherwise its records from this
        call are dropped (it takes the graph path)."""
        self.closed = []
        if not self.active or not self._windows or self._windows[-1][0] is not unit:
            return False
        _, start, uses, random = self._windows.pop()
        mine = {id(p) for p in unit.params}
        window = self._records[start:]
        ours = [r for r in window if any(id(p) in mine for p, _ in r.targets.values())]
        pending = [c for _, c in self._pending.values()]
        if ours and self._uses(unit) == uses and not any(r is c for r in ours for c in pending):
            self.closed = ours if self._random == random else []
            return True
        self._records[start:] = [r for r in window if all(r is not o for o in ours)]
        return False

    def _uses(self, unit: Unit) -> int:
        return sum(self._unrecognised.get(id(p), 0) for p in unit.params)

    # --- the mode --------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: A002 - torch's signature
        kwargs = kwargs or {}
        tensors = argument_tensors(args, kwargs)
        batched = False
        derived: list[tuple[torch.Tensor, tuple[BroadcastCall, ...]]] = []
        watched = []
        expanded = []
        for t in tensors:
            key = id(t)
            ref = self._batched.get(key)
            if ref is not None and ref() is t:
                batched = True
                continue
            entry = self._derived.get(key)
            if entry is not None and entry[0]() is t:
                derived.append((t, entry[1]))
            elif key in self._owner and t.requires_grad:
                watched.append(t)
            elif key in self._views and self._views[key][0]() is t:
                watched.append(t)
            elif key in self._transposed and self._transposed[key][0]() is t:
                watched.append(t)
            elif key in self._pending and self._pending[key][0]() is t:
                expanded.append(t)
        if expanded:
            self._settle(func, args, kwargs, expanded, batched)
        if watched and torch.is_grad_enabled():
            recorded = self._record(func, args, kwargs, batched, watched)
            if recorded is not None:
                return recorded
        else:
            watched = []
        kinds = self._kinds.get(func)
        if kinds is None:
            kinds = self._kinds[func] = (self._kind(func), getattr(func, "__name__", "") in _RANDOM)
        kind = kinds[0]
        self._random += kinds[1]
        if batched and derived and kind in ("broadcast", "inplace-broadcast"):
            args, kwargs = self._meet(args, kwargs, derived, inplace=kind == "inplace-broadcast")
            derived = []
        result = func(*args, **kwargs)
        if watched and any(t.requires_grad for t in _outputs(result)):
            # a use the rules do not cover (reading .device or .shape is none)
            for t in watched:
                key = id(self._parameter(t))
                self._unrecognised[key] = self._unrecognised.get(key, 0) + 1
        if batched:
            dim = self._output_batch_dim(func, args, kwargs, tensors)
            for t in _outputs(result):
                self._batched[id(t)] = weakref.ref(t)
                if dim == 0:
                    self._batch_dims.pop(id(t), None)
                else:
                    self._batch_dims[id(t)] = (weakref.ref(t), dim)
            if kind.startswith("inplace") and args and isinstance(args[0], torch.Tensor):
                self._batched[id(args[0])] = weakref.ref(args[0])
        elif derived:
            sources = tuple({id(c): c for _, s in derived for c in s}.values())
            for t in _outputs(result):
                if t.requires_grad:
                    self._derived[id(t)] = (weakref.ref(t), sources)
        return result

    def alias(self, new: torch.Tensor, old: torch.Tensor) -> None:
        """Follow ``new`` as ``old``: a hook returned it for a module's output, outside the
        mode (``dpclip.clipping.checkpointing.InputFromRerun``)."""
        for table in (self._batched, self._batch_dims, self._derived):
            entry = table.get(id(old))
            if entry is None:
                continue
            ref = entry if isinstance(entry, weakref.ref) else entry[0]
            if ref() is old:
                table[id(new)] = weakref.ref(new) if isinstance(entry, weakref.ref) else (weakref.ref(new), entry[1])

    def batch_dim(self, t: Any) -> int | None:
        """The dimension of a batched tensor that holds the batch, as far as the operations
        since the root's inputs tell (0 for a tensor not followed); None: unknown."""
        entry = self._batch_dims.get(id(t))
        return 0 if entry is None or entry[0]() is not t else entry[1]

    def carries_batch(self, t: torch.Tensor) -> bool:
        """Whether ``t`` was computed from the root forward's inputs, as far as the mode saw
        (a tensor computed from parameters alone does not, whatever its first dimension)."""
        ref = self._batched.get(id(t))
        return ref is not None and ref() is t

    def moved(self, t: Any) -> bool:
        """Whether ``t``'s batch is known to be in another dimension than the first: a
        layer on it would take positions for examples (when T == B every shape check
        passes)."""
        return isinstance(t, torch.Tensor) and (self.batch_dim(t) or 0) > 0

    def refuse_moved(self, t: Any, user: str, what: str = "a tensor") -> None:
        """Raise ``RuntimeError`` if ``t``'s batch is known to be in another dimension than
        the first (``moved``): ``user`` ("module 'proj' (Linear)") would take positions for
        examples."""
        if not self.moved(t):
            return
        raise RuntimeError(
            f"{user} runs on {what} of shape {tuple(t.shape)} whose batch is dimension "
            f"{self.batch_dim(t)}, not the first (the model transposed its batch-first input, "
            "e.g. to sequence-first, as XLNet does): dpclip takes the first dimension of each "
            "layer's input and output for the examples, which would mix up positions and "
            "examples. The model is not supported as built: keep tensors batch-first around "
            "layers with parameters (transpose back before them)"
        )

    def _output_batch_dim(self, func, args: tuple, kwargs: dict, tensors: list) -> int | None:
        """Where the batch is in ``func``'s batched output (``batch_dim``): moved by a
        transpose or permute of a tensor whose batch is first, kept by ``_KEEPING`` on a
        moved one; any other operation on a moved tensor loses track (None), and on tensors
        whose batch is first counts as keeping it first."""
        kind = self._dim_kinds.get(func)
        if kind is None:
            kind = self._dim_kinds[func] = _dim_kind(func)
        if not self._batch_dims and kind != "move":
            return 0  # (the usual case: one dictionary lookup per operation)
        dims = {
            self.batch_dim(t) for t in tensors
            if self._batched.get(id(t)) is not None and self._batched[id(t)]() is t
        }
        if len(dims) != 1:
            return None
        dim = next(iter(dims))
        if kind == "keep" or (dim == 0 and kind == "other"):
            return dim
        if kind == "other" or dim is None or not args or not isinstance(args[0], torch.Tensor) or kwargs:
            return None
        return _moved_dim(func, args, dim)

    @staticmethod
    def _kind(func: Any) -> str:
        name = getattr(func, "__name__", "")
        inplace = name.endswith("_") and not name.endswith("__") or name.startswith("__i")
        inplace = inplace or name == "__setitem__"
        if name in _BROADCASTING:
            return "inplace-broadcast" if inplace else "broadcast"
        return "inplace" if inplace else "other"

    def _meet(self, args: tuple, kwargs: dict, derived: list, inplace: bool) -> tuple[tuple, dict]:
        """Replace each batch-less operand by its view expanded over the batch (the
        operations in ``_BROADCASTING`` align operands at their last dimension)."""
        tensors = argument_tensors(args, kwargs)
        ndim = max(a.dim() for a in tensors)
        if any(t.dim() == ndim and t.shape[0] != self.batch for t in tensors if self.carries_batch(t)):
            # the batch folded into its first dimension ([B·C, T, ·] of a multiple-choice
            # head): expanded over B it would not broadcast; one example's slice (h[:1]):
            # expanded, the result would have B rows, not 1. Left as it is (the backward
            # refuses a lookup whose gradient it then cannot tell apart by example)
            return args, kwargs
        swaps = {}
        for p, sources in derived:
            if inplace and args and p is args[0]:
                continue  # a batch-less tensor changed in place by a batched one: not followed
            lead = p.reshape((1,) * (ndim - p.dim()) + tuple(p.shape))
            if lead.dim() == 0 or lead.shape[0] not in (1, self.batch):
                continue  # does not broadcast over the batch: the backward check refuses it
            aligned = lead.shape[0] == self.batch and self.batch != 1
            pb = lead.expand(self.batch, *lead.shape[1:])
            edge, pb_edge = get_gradient_edge(p), get_gradient_edge(pb)
            for call in sources:
                call.meetings.append(
                    Meeting(None if edge == call.edge else edge, tuple(p.shape), pb_edge, aligned)
                )
            swaps[id(p)] = pb
        def swap(a: Any) -> Any:
            return swaps.get(id(a), a) if isinstance(a, torch.Tensor) else a

        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

    def _settle(self, func, args: tuple, kwargs: dict, expanded: list, batched: bool) -> None:
        """The first use of each expanded parameter view (``_expand``): kept if it joins
        batch-first tensors of as many dimensions along another dimension than the batch's,
        or meets them in a broadcasting add/sub/mul/div (operands aligned at their last
        dimensions); otherwise its record is dropped and the use counts as one no rule
        covers (its module takes the graph path)."""
        others = [
            t for t in argument_tensors(args, kwargs)
            if self._batched.get(id(t)) is not None and self._batched[id(t)]() is t
        ]
        kind = self._kinds[func][0] if func in self._kinds else self._kind(func)
        for t in expanded:
            _, call = self._pending.pop(id(t))
            aligned = batched and all(o.dim() == t.dim() for o in others)
            if func in _JOINING:
                dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                rank = t.dim() + (func is torch.stack)
                aligned = aligned and isinstance(dim, int) and dim % rank != 0
            else:
                aligned = aligned and (
                    kind == "broadcast" or kind == "inplace-broadcast" and args[0] is not t
                )
            if aligned:
                self._batched[id(t)] = weakref.ref(t)
            else:
                self._records = [r for r in self._records if r is not call]
                p = call.targets["parameter"][0]
                self._unrecognised[id(p)] = self._unrecognised.get(id(p), 0) + 1

    def _record(self, func, args: tuple, kwargs: dict, batched: bool, watched: list) -> Any:
        """Record ``func`` if it is a recognised use of the watched parameters; its
        result then, else None (not called)."""
        if func is F.embedding:
            return self._embedding(args, kwargs, batched, watched)
        if any(id(self._parameter(w)) not in self._linear_ok for w in watched):
            return None
        if len(watched) == 1 and not batched and args and not kwargs:
            aliased = self._alias(func, args, watched[0])
            if aliased is not None:
                return aliased
        if (
            func in _MATMUL and len(args) == 2 and not kwargs and batched and len(watched) == 1
            and args[1] is watched[0] and id(args[1]) in self._transposed
        ):
            x, transposed = args  # x @ w.T: a linear layer's forward (Falcon's FalconLinear)
            return self._linear(func, args, x, transposed, None, watched, LINEAR)
        if any(id(w) in self._transposed for w in watched):
            return None  # elsewhere a transpose's gradient is the parameter's transposed
        if func in _VIEWING:
            return self._view(func, args, kwargs, watched)
        if any(w is not self._parameter(w) for w in watched) and func not in _BROADCAST_ARITHMETIC:
            return None  # a view of a parameter is recorded only in elementwise arithmetic
        if func is torch.Tensor.expand and not batched and not kwargs:
            return self._expand(args, watched)
        if not batched:
            return None
        if func is torch.Tensor.expand_as and not kwargs and len(args) == 2:
            return self._expand_as(args, watched)
        if func is torch.addmm and not kwargs and len(args) == 3:
            bias, x, weight = args
            return self._linear(torch.addmm, args, x, weight, bias, watched, INPUT_MAJOR_LINEAR)
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) == 2:
            x, weight = args
            return self._linear(func, args, x, weight, None, watched, INPUT_MAJOR_LINEAR)
        if func is F.linear and not kwargs and len(args) in (2, 3):
            x, weight, bias = (*args, None)[:3]
            return self._linear(F.linear, args, x, weight, bias, watched, LINEAR)
        if func is torch.prelu and not kwargs and len(args) == 2:
            return self._prelu(args, watched)
        if func in _NORMALISING:
            return self._norm(func, args, kwargs, watched)
        if func in _CONVOLVING:
            return self._conv(func, args, kwargs, watched)
        if func in _BROADCAST_ARITHMETIC and not kwargs and len(args) == 2:  # (alpha=…: not)
            recorded = None
            if func in _SCALING:
                recorded = self._elementwise(func, args, watched, "weight")
            elif func in _SHIFTING:
                recorded = self._elementwise(func, args, watched, "bias")
            return recorded if recorded is not None else self._broadcast(func, args, watched)
        return None

    def _targets(self, roles: dict[str, Any], watched: list) -> dict[str, Target] | None:
        """{role: (param, None)} if the watched tensors are exactly parameters (or their
        views) in ``roles``."""
        targets = {r: (t, None) for r, t in roles.items() if any(t is w for w in watched)}
        if len(targets) != len(watched):
            return None
        return {r: (self._owner[id(self._parameter(t))][0], None) for r, (t, _) in targets.items()}

    def _record_call(self, rule: Rule, param: torch.Tensor, activations: list, output: torch.Tensor,
                     targets: dict[str, Target], result: torch.Tensor) -> torch.Tensor:
        """Record ``rule``'s call (gradient taken at ``output``) for the unit owning
        ``param`` (or the parameter it is a view of); ``result``, what the model gets,
        carries the batch."""
        owner = self._owner[id(self._parameter(param))][1]
        self._records.append(LayerCall(rule, owner.module, activations, output, targets, owner.strategy))
        self._batched[id(result)] = weakref.ref(result)
        return result

    def _parameter(self, t: torch.Tensor) -> torch.Tensor:
        """The parameter a watched tensor is, or is a view (or transpose) of."""
        view = self._views.get(id(t)) or self._transposed.get(id(t))
        return view[1] if view is not None and view[0]() is t else t

    def _alias(self, func, args: tuple, w: torch.Tensor) -> Any:
        """``func(*args)`` if it gives a tensor to follow as the watched ``w``'s parameter,
        else None (not called): ``w + c`` or ``c + w`` for a number c (Gemma's RMSNorm
        scales by 1 + weight) and ``w.float()`` / ``w.to(dtype)`` (a float64 model's norm
        computed in float32) have the parameter's gradient element for element, so the
        elementwise and broadcast rules take them as the parameter; a transpose of a 2-D
        parameter (``w.T``, ``w.t()``, ``w.transpose(0, 1)``) is followed into ``x @ w.T``
        only, the linear rule."""
        if id(w) in self._transposed:
            return None
        param = self._parameter(w)
        if func in _ADDING and len(args) == 2 and (args[0] is w or args[1] is w):
            other = args[1] if args[0] is w else args[0]
            if not isinstance(other, (int, float)) or isinstance(other, bool):
                return None
        elif func is torch.Tensor.float and len(args) == 1 and args[0] is w:
            pass
        elif func is torch.Tensor.to and len(args) == 2 and args[0] is w and isinstance(args[1], torch.dtype):
            if not args[1].is_floating_point:
                return None
        elif w is param and param.dim() == 2 and args[0] is w and _transposes(func, args):
            result = func(*args)
            self._transposed[id(result)] = (weakref.ref(result), param)
            return result
        else:
            return None
        result = func(*args)
        if result is not w:  # (a cast to the dtype it has is w itself)
            self._views[id(result)] = (weakref.ref(result), param)
        return result

    def _view(self, func, args: tuple, kwargs: dict, watched: list) -> Any:
        """A view of one watched parameter that only adds or drops dimensions of size 1
        (its elements in the same order): followed as the parameter itself into the
        elementwise and broadcast rules, whose per-example gradients have its elements."""
        if len(watched) != 1 or not args or args[0] is not watched[0]:
            return None
        result = func(*args, **kwargs)
        param = self._parameter(watched[0])
        if (
            not isinstance(result, torch.Tensor) or result.numel() != param.numel()
            or [n for n in result.shape if n != 1] != [n for n in param.shape if n != 1]
            or result.data_ptr() != param.data_ptr()
        ):
            # a slice or a copy: not the parameter's elements in order. (Computed already:
            # counted as a use no rule covers, as the caller would have.)
            key = id(param)
            self._unrecognised[key] = self._unrecognised.get(key, 0) + 1
            return result
        self._views[id(result)] = (weakref.ref(result), param)
        return result

    def _linear(self, func, args, x, weight, bias, watched, rule) -> Any:
        if (
            not isinstance(x, torch.Tensor) or weight.dim() != 2 or x.dim() < 2
            or self.batch == 0 or x.shape[0] % self.batch or self.moved(x)
        ):
            return None
        targets = self._targets({"weight": weight, "bias": bias}, watched)
        if targets is None or any(t is x for t in watched):
            return None
        result = func(*args)
        # 2-D inputs are [B·T, d], rows example-major (a batch-first tensor flattened):
        # record [B, T, ·] views so that each example's rows are together
        rows = held(x.reshape(self.batch, -1, x.shape[-1]))
        y = result.view(self.batch, -1, result.shape[-1]) if x.dim() == 2 else result
        # the unit of a trainable target: the weight may be frozen (a bias-only fine-tune)
        owner = self._owner[id(next(iter(targets.values()))[0])][1]
        self._records.append(LayerCall(rule, owner.module, [rows], y, targets, owner.strategy))
        out = y.view(result.shape) if y is not result else result
        self._batched[id(out)] = weakref.ref(out)
        return out

    def _elementwise(self, func, args: tuple, watched: list, role: str) -> Any:
        """``w * x``, ``x * w`` (role "weight") or ``x + b``, ``b + x`` (role "bias") with
        one watched parameter whose shape is the trailing shape of a batch-first x."""
        a, b = args
        if len(watched) != 1 or not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return None
        param, x = (a, b) if a is watched[0] else (b, a)
        if (
            param is not watched[0] or x is param or self.batch == 0 or self.moved(x)
            or x.dim() < 2 or x.dim() <= param.dim() or x.shape[0] != self.batch
            or tuple(x.shape[x.dim() - param.dim():]) != tuple(param.shape)
        ):
            return None  # broadcasting within x's trailing shape too: not this rule
        targets = self._targets({role: param}, watched)
        if targets is None:
            return None
        result = func(*args)
        rule, activations = (SCALE, [held(x)]) if role == "weight" else (SHIFT, [])
        return self._record_call(rule, param, activations, result, targets, result)

    def _norm(self, func, args: tuple, kwargs: dict, watched: list) -> Any:
        """``F.layer_norm(x, shape, w, b, eps)`` / ``F.group_norm(x, groups, w, b, eps)``
        with watched w, b and a batch-first x not normalised over its batch dimension:
        the normalisation rule."""
        bound = _bind(_NORMALISING[func], args, kwargs)
        if bound is None:
            return None
        x = bound.get("input")
        if not isinstance(x, torch.Tensor) or self.batch == 0 or x.dim() < 2 or x.shape[0] != self.batch:
            return None
        if any(t is x for t in watched) or self.moved(x):
            return None
        eps = float(bound.get("eps", 1e-5))
        if func is F.layer_norm:
            shape = tuple(bound.get("normalized_shape", ()))
            if not shape or len(shape) >= x.dim():
                return None  # over the batch dimension too: the examples are mixed
            rule = functional_norm_rule(shape, 0, eps)
        else:
            rule = functional_norm_rule(None, int(bound.get("num_groups", 0)), eps)
        targets = self._targets({"weight": bound.get("weight"), "bias": bound.get("bias")}, watched)
        if targets is None:
            return None
        result = func(*args, **kwargs)
        return self._record_call(rule, watched[0], [held(x)], result, targets, result)

    def _conv(self, func, args: tuple, kwargs: dict, watched: list) -> Any:
        """``F.conv1d/2d/3d(x, w, b, stride, padding, dilation, groups)`` with watched w, b,
        a batch-first x and padding given as numbers or "valid": the convolution rule."""
        bound = _bind(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, kwargs)
        if bound is None:
            return None
        x, weight = bound.get("input"), bound.get("weight")
        n = _CONVOLVING[func]
        if (
            not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor)
            or self.batch == 0 or x.dim() != n + 2 or x.shape[0] != self.batch
            or any(t is x for t in watched) or self.moved(x)
        ):
            return None

        def spatial(v: Any, default: int) -> tuple[int, ...] | None:
            v = default if v is None else v
            if isinstance(v, int):
                return (v,) * n
            v = tuple(v)
            return v if len(v) == n and all(isinstance(i, int) for i in v) else None

        padding = bound.get("padding", 0)
        padding = 0 if padding == "valid" else padding  # ("same": uneven padding, not here)
        stride, dilation = spatial(bound.get("stride"), 1), spatial(bound.get("dilation"), 1)
        padding = None if isinstance(padding, str) else spatial(padding, 0)
        groups = bound.get("groups", 1)
        if stride is None or dilation is None or padding is None or not isinstance(groups, int):
            return None
        targets = self._targets({"weight": weight, "bias": bound.get("bias")}, watched)
        if targets is None:
            return None
        result = func(*args, **kwargs)
        rule = functional_conv_rule(weight.shape, stride, padding, dilation, groups)
        return self._record_call(rule, watched[0], [held(x)], result, targets, result)

    def _broadcast(self, func, args: tuple, watched: list) -> Any:
        """``x ∘ p`` or ``p ∘ x`` (add, sub, mul, div) with one watched parameter p that
        broadcasts over a batch-first x (a leading dimension of size 1, or fewer
        dimensions than x): computed with p's view expanded over the batch, P_b, whose
        gradient is each example's own (the broadcast rule)."""
        a, b = args
        if len(watched) != 1 or not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            return None
        param = watched[0]
        x = b if a is param else a
        if x is param or self.batch == 0 or x.dim() < 2 or x.shape[0] != self.batch:
            return None
        rows = per_example_shape(param.shape, x.dim())
        targets = self._targets({"parameter": param}, watched)
        if rows is None or targets is None:
            return None
        expanded = param.reshape(1, *rows).expand(self.batch, *rows)
        result = func(expanded, b) if a is param else func(a, expanded)
        # a view of the parameter (``w[:, None, None]``) is broadcast as the view's shape says
        shape = [] if param is self._parameter(param) else [param.detach()]
        return self._record_call(BROADCAST, param, shape, expanded, targets, result)

    def _expand(self, args: tuple, watched: list) -> Any:
        """``p.expand(B, …)`` of one watched parameter p with a leading dimension of size 1
        (or fewer dimensions than asked for) to the batch size: recorded for the broadcast
        rule, and followed until ``_settle`` sees it aligned with the batch (a size that
        equals B by chance is not the batch's)."""
        if len(args) < 2 or args[0] is not watched[0] or len(watched) != 1 or self.batch == 0:
            return None
        param = args[0]
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        if len(sizes) < 2 or sizes[0] != self.batch or per_example_shape(param.shape, len(sizes)) is None:
            return None
        targets = self._targets({"parameter": param}, watched)
        if targets is None:
            return None
        result = torch.Tensor.expand(*args)
        owner = self._owner[id(param)][1]
        call = LayerCall(BROADCAST, owner.module, [], result, targets, owner.strategy)
        self._records.append(call)
        self._pending[id(result)] = (weakref.ref(result), call)
        return result

    def _expand_as(self, args: tuple, watched: list) -> Any:
        """``p.expand_as(x)`` of one watched parameter p that broadcasts over a batch-first
        x: the result is aligned with x, so it is recorded for the broadcast rule as is."""
        param, x = args
        if (
            param is not watched[0] or len(watched) != 1 or x is param or self.batch == 0
            or x.dim() < 2 or x.shape[0] != self.batch or per_example_shape(param.shape, x.dim()) is None
        ):
            return None
        targets = self._targets({"parameter": param}, watched)
        if targets is None:
            return None
        result = torch.Tensor.expand_as(param, x)
        return self._record_call(BROADCAST, param, [], result, targets, result)

    def _prelu(self, args: tuple, watched: list) -> Any:
        """``F.prelu(x, w)`` with a trainable w and a batch-first x: the PReLU rule."""
        x, weight = args
        if (
            not isinstance(x, torch.Tensor) or x is weight or self.batch == 0 or x.dim() < 2
            or x.shape[0] != self.batch or weight.numel() not in (1, x.shape[1])
        ):
            return None
        targets = self._targets({"weight": weight}, watched)
        if targets is None:
            return None
        result = torch.prelu(x, weight)
        return self._record_call(PRELU, weight, [held(x)], result, targets, result)

    def _embedding(self, args: tuple, kwargs: dict, batched: bool, watched: list) -> Any:
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        bound = dict(zip(names, args), **kwargs)
        ids, weight = bound.get("input"), bound.get("weight")
        if (
            bound.get("max_norm") is not None or bound.get("scale_grad_by_freq") or bound.get("sparse")
            or not isinstance(ids, torch.Tensor) or any(t is ids for t in watched)
            or weight is not self._parameter(weight)
        ):
            # (a lookup into a view, such as peft's LoRA embedding F.embedding(x, A.T), has
            # the parameter's gradient reshaped: its module takes the graph path)
            return None
        targets = self._targets({"weight": weight}, watched)
        if targets is None:
            return None
        padding_idx = bound.get("padding_idx")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        rule = embedding_rule(padding_idx)
        owner = self._owner[id(weight)][1]
        if batched:
            self.refuse_moved(ids, f"an embedding lookup of module {owner.name!r}", "ids")
        result = F.embedding(*args, **kwargs)
        if batched:
            self._records.append(LayerCall(rule, owner.module, [ids], result, targets, owner.strategy))
            self._batched[id(result)] = weakref.ref(result)
        else:
            call = BroadcastCall(
                rule, owner.module, ids, get_gradient_edge(result), tuple(result.shape), result.dtype,
                targets, owner.strategy,
            )
            self._records.append(call)
            self._derived[id(result)] = (weakref.ref(result), (call,))
        return result

