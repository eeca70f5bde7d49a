"""What the clipper keeps between the backward pass and the clipped sum: the memory modes.

The clipped sum S = Σ_i c_i g_i needs every example's clipping factor c_i, known only
once every layer's share of ‖g_i‖² is. A layer's share comes from its recorded input
and the gradient at its output (its *output gradient*). Two ways to get its part of S:

- **keep** ("fast"): hold its input and output gradient (or its per-example gradients)
  until the factors are known, then add Σ_i c_i g_i from them (one backward pass).
- **recompute** ("low"): take its share of the norms as its output gradient arrives
  during the backward, then drop both; its part of S comes from a second backward,
  of Σ_i c_i ℓ_i, to its parameters (Opacus's two-pass ghost clipping, with a first
  pass that computes no parameter gradient). The first pass keeps the graph (the
  activations, as at the start of a non-private backward) for the second; time: one
  more backward pass.

In both, each call's norm is taken as its output gradient arrives (``EarlyNorms``), and a
call with per-example gradients keeps those, not its input and output gradient. Calls
whose parameters other calls use too (tied weights, a layer run twice) are kept in both
modes: their norm needs per-example gradients summed over the calls.

``memory="auto"`` chooses on the first micro-batch, before its backward pass, from what
its forward had autograd save (``SavedActivations``: bytes and dtypes) and what "fast"
would keep from the layers' norms to the clipped sum (``kept_bytes``: output gradients,
per-example gradients; not the inputs, which autograd holds too until the layer's
backward): "low" where the kept bytes exceed ``AUTO_LOW_ABOVE`` times the saved ones
(``auto_mode``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from dpclip.clipping.norms import GHOST_ROUNDING_TOLERANCE, GhostNorm, norm_dtype, rounding_eps, row_sq_norms
from dpclip.clipping.plan import CostMeter, timed
from dpclip.clipping.recording import LayerCall, sample_rows

__all__ = [
    "AUTO_LOW_ABOVE", "KEEPS", "MEMORY_MODES", "EarlyNorms", "GhostPart", "SavedActivations", "Scales",
    "auto_mode", "check_memory", "exact_where_rounded", "kept_bytes", "one_precision", "recomputable",
    "rerun_differences", "rerun_mismatch", "rows_overlap",
]

#: "auto", "fast" (keep output gradients: one backward), "low" (recompute: two).
MEMORY_MODES = ("auto", "fast", "low")
#: What a kept call holds until the clipped sum, by whether it took a ghost norm (the plan's
#: ``keeps``).
KEEPS = {True: "input + output gradient", False: "per-example gradients"}


#: ``auto_mode``'s threshold. Measured (peak torch allocation, the README's memory table):
#: "low" peaked lower well above it (the built-in transformer with per-example gradients
#: for every layer, kept/saved 2.4: 1.53x against 2.07x non-private); between 0.7 and 0.8
#: "fast" peaked within 0.05x of "low", lower for the classifiers (DistilBERT 0.78: 1.08x
#: against 1.13x, ViT 0.74, RoBERTa 0.72) and higher for the built-in transformer (0.74:
#: 1.24x against 1.20x), and at 0.88 (Llama and Qwen2 causal LMs,
#: B 16, T 64: the kept [B, T, vocabulary] output gradient of the LM head arrives first,
#: while the activations below are freed) all three peaked alike, where "low" took 1.45x
#: "fast"'s time. "Fast" is the quicker: it keeps its one backward pass up to here.
AUTO_LOW_ABOVE = 1.0


def auto_mode(
    kept: int, saved: int, dtypes: set[torch.dtype], checkpointed: bool = False, rerun_twice: bool = True,
) -> str:
    """The mode ``memory="auto"`` runs: "low" if "fast" would keep more than
    ``AUTO_LOW_ABOVE`` times the bytes of the activations autograd saved, in the forward
    and in the loss (``PerSampleClipper.counting_loss``; at the peak of
    "fast" the kept gradients of the layers above sit beside the activations not yet
    freed below; "low" keeps the graph and nothing else), else "fast" (one backward
    pass). Also "fast" where ``dtypes`` (the layers', the loss's and the saved
    activations') are not one float32 or float64 dtype (half precision, autocast, a
    float64 model that computes its RMSNorm in float32): "fast" scales each example's
    gradient by its factor in the layers' precision, "low" would scale its loss and
    backpropagate through the lower one.

    Under gradient checkpointing (``checkpointed``) what autograd saves inside a region is
    not counted: ``saved`` is about what non-private training keeps besides one region's
    re-run, and "fast" also keeps the inputs the re-runs give (``kept_bytes``). Its dtypes
    are not seen either: "low" only where the layers and the loss are all float32 (a
    float64 model's RMSNorm computes in float32 unseen: "low" was 4e-8 off), and only
    where the regions may run again for a second backward (``rerun_twice``; not under
    selective checkpointing, which allows one backward through a region, nor where a
    re-run draws other random numbers, ``preserve_rng_state=False``, nor where the
    gradients at which batch-less lookups meet the batch outweigh ``saved``: T5's
    relative attention bias, [B, heads, T, T] a layer, where "low" peaked at 2.58x
    non-private with checkpointing and "fast" at 2.22x)."""
    if checkpointed and (not rerun_twice or dtypes != {torch.float32}):
        return "fast"
    return "low" if one_precision(dtypes) and kept > AUTO_LOW_ABOVE * saved else "fast"


def rerun_differences(call: LayerCall, grad: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """How far the call's tensors in ``memory="low"``'s second backward pass are from those
    its norms came from, per example: [2 (difference, size), 2 (output gradient, input), B]
    (an input not compared: zeros). Its output gradient in the second pass (``grad``, of
    Σ_i c_i ℓ_i) against c_i times the first's, and an input a checkpointed region's re-run
    gave against the one the norms used, sampled (``LayerCall.samples``). A region that
    draws other random numbers when it runs again (``preserve_rng_state=False`` on an
    enclosing region, dropout from a generator of the user's) would give norms of one run
    and the clipped sum of another (``rerun_mismatch``)."""
    x_first, g_first = call.samples
    expected = g_first.double() * factors.to(g_first.device, torch.float64).view(-1, 1)
    diff, size = [(sample_rows(call, grad).double() - expected).norm(dim=1)], [expected.norm(dim=1)]
    if x_first is not None and call.rerun is not None:
        diff.append((call.rerun.double() - x_first.double()).norm(dim=1))
        size.append(x_first.double().norm(dim=1))
    else:
        diff.append(torch.zeros_like(diff[0]))
        size.append(torch.zeros_like(size[0]))
    return torch.stack([torch.stack(diff), torch.stack(size)])


def rerun_mismatch(differences: torch.Tensor, dtypes: set[torch.dtype]) -> torch.Tensor:
    """Which calls' (rows) output gradient or input (columns) differ between the two
    passes, from ``rerun_differences`` stacked ([calls, 2, 2, B]): by more than ``tol``
    of the example's size there, plus 10⁻³ of its largest over the calls (a gradient that
    is rounding alone, where the loss does not depend on a layer, is held to the others'
    scale). ``tol``: 1e-3, or 16 roundings of the least precise of the layers' and the
    loss's ``dtypes`` (under bfloat16 autocast a float32 layer norm's gradient comes
    through bfloat16 matmuls, which round c_i·g to about 4e-3)."""
    tol = max(1e-3, 16 * rounding_eps(dtypes))
    diff, size = differences[:, 0], differences[:, 1]
    return (diff > tol * (size + 1e-3 * size.amax(dim=0, keepdim=True))).any(dim=2)


def one_precision(dtypes: set[torch.dtype]) -> bool:
    """Whether ``dtypes`` are one float32 or float64 dtype: where "low"'s second backward,
    of Σ_i c_i ℓ_i, rounds each example's clipped gradient as "fast" does."""
    return len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}


def kept_bytes(call: LayerCall, batch: int) -> int:
    """What "fast" keeps of a call from its norm to the clipped sum, from its shapes: its
    output gradient (a ghost norm) or its ``batch`` per-example gradients; a ghost norm
    also the input a checkpointed region's re-run gives it (``LayerCall.awaits_input``),
    which autograd would have freed (outside a region autograd keeps the input itself)."""
    size = call.dtype.itemsize
    if call.uses_ghost():
        given = call.activations[0].numel() * call.activations[0].element_size() if call.awaits_input else 0
        return given + math.prod(call.shape) * size
    rows = 0
    for p, block in call.targets.values():
        rows += p.numel() if block is None else (block.stop - block.start) * p[0].numel()
    return batch * rows * size


#: {param: (Σ_k ‖a_k‖², Σ_k max a_k, eps)}: the audit's rounding scale of each parameter's
#: gradient sum A = Σ_k a_k (non-negative parts: one per call, per-example gradients, graph
#: call), kept as two numbers, so that no parameter-sized A is held across the first
#: micro-batch. √(Σ‖a_k‖²) ≤ ‖A‖ (the parts' inner products are non-negative): the check's
#: tolerance is never looser than one from A itself; Σ max a_k bounds every element of A.
Scales = dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor, float]]


def _unpack_checked(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    """A saved tensor back, refused as torch refuses one changed in place since it was saved."""
    t, version = packed
    if t._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
            f"expected version {version} instead (an in-place operation such as "
            "nn.Dropout(inplace=True) or x.mul_() on a tensor the backward needs)"
        )
    return t


class SavedActivations:
    """Counts the bytes of the tensors autograd saves for the backward while it is on
    (``start`` … ``stop``; ``torch.autograd.graph.saved_tensors_hooks``): each storage
    once, the parameters' left out; and their floating-point dtypes (a model may compute
    parts in another precision than its layers: Hugging Face's RMSNorm in float32).
    Inside a region with saved-tensor hooks of its own (activation checkpointing,
    offloading) what that region saves is not counted; where such hooks are disabled,
    nothing is (``stop`` gives None)."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self._params = params
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._storages: dict[int, int] = {}
        self._dtypes: set[torch.dtype] = set()

    def start(self) -> None:
        params = {p.untyped_storage().data_ptr() for p in self._params}
        storages = self._storages = {}
        dtypes = self._dtypes = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # no storage (sparse, subclasses)
                storage = None
            if storage is not None and storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
                if t.is_floating_point():
                    dtypes.add(t.dtype)
            # (the tensor itself would make a saved output a cycle; a detached view shares
            # its version counter, which torch no longer checks for a hooked saved tensor)
            return t.detach(), t._version

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, _unpack_checked)
        try:
            hooks.__enter__()
        except RuntimeError:  # hooks disabled here (disable_saved_tensors_hooks): no count
            return
        self._hooks = hooks

    def stop(self) -> tuple[int, frozenset[torch.dtype]] | None:
        """The bytes and floating-point dtypes counted since ``start``; None if it was not
        started."""
        if self._hooks is None:
            return None
        self._hooks.__exit__(None, None, None)
        self._hooks = None
        return sum(self._storages.values()), frozenset(self._dtypes)


def check_memory(memory: str) -> None:
    """Raise ``ValueError`` unless ``memory`` is one of ``MEMORY_MODES``."""
    if not isinstance(memory, str) or memory not in MEMORY_MODES:
        raise ValueError(f"Expected memory to be one of {MEMORY_MODES}, got {memory!r}")


def rows_overlap(a: slice | None, b: slice | None) -> bool:
    """Whether two targets of one parameter (None: all its rows) share a row."""
    if a is None or b is None:
        return True
    return a.start < b.stop and b.start < a.stop


def recomputable(calls: Sequence[LayerCall]) -> set[LayerCall]:
    """The calls whose part of S a second backward can give: those whose parameters no
    other call of the micro-batch uses (a layer run twice, tied weights, overlapping
    row blocks need per-example gradients summed over the calls before the norm), and
    closed over parameters (a parameter's calls are all recomputed, or all kept: the
    second backward gives a parameter's whole gradient)."""
    uses: dict[nn.Parameter, list[tuple[LayerCall, slice | None]]] = {}
    for call in calls:
        for p, rows in call.targets.values():
            uses.setdefault(p, []).append((call, rows))
    kept: set[LayerCall] = set()
    for entries in uses.values():
        for i, (a, ra) in enumerate(entries):
            for b, rb in entries[i + 1:]:
                if rows_overlap(ra, rb):
                    kept.update((a, b))
    grown = True
    while grown:  # a kept call keeps every call that shares a parameter with it
        grown = False
        for entries in uses.values():
            if any(c in kept for c, _ in entries) and not all(c in kept for c, _ in entries):
                kept.update(c for c, _ in entries)
                grown = True
    return {c for c in calls if c not in kept}


class GhostPart(NamedTuple):
    """A kept call's ghost norm (its ``sq`` is one of the norms' parts) whose rounding may
    need a second look, and the call, which holds its tensors to compute it again in float64."""

    norm: GhostNorm
    call: LayerCall


def exact_where_rounded(call: LayerCall, norm: GhostNorm) -> torch.Tensor:
    """``norm.sq``, with the examples whose rounding bound exceeds
    ``GHOST_ROUNDING_TOLERANCE`` of their value computed again in float64: for a call about
    to release its tensors (``memory="low"``), which cannot wait for the clipper's look at
    each example's total (``_exact_where_rounded``). Within the tolerance layer by layer
    is within it in total. One host synchronisation."""
    rows = (norm.scale * norm.unit > GHOST_ROUNDING_TOLERANCE * norm.sq).nonzero().squeeze(1)
    if rows.numel() == 0:
        return norm.sq
    return norm.sq.index_copy(0, rows, call.rule.ghost_sq_norms(call, rows).sq.to(norm.sq.dtype))


class EarlyNorms:
    """Norms taken during the backward pass, by hooks on the recorded calls' outputs, as
    each output gradient arrives; then the call keeps only what its part of S needs.

    A ghost-norm call in ``recompute`` keeps nothing (a second backward gives its part
    of S); else a ghost-norm call keeps its input and output gradient, and a call with
    per-example gradients keeps those (recompute: nothing) and releases the rest.

    ``parts``: the calls' [B] contributions to ‖g_i‖², ``ghost`` those of them that are
    ghost norms, with their rounding bounds; ``kept``: the calls whose part of
    S comes from what they keep; ``recomputed``: those (of ``recompute``) whose output
    got a gradient; ``wrong_batch``: the calls whose output gradient was not batch-first,
    ``without_input`` those whose output gradient came before the input a checkpointed
    region's re-run gives (the clipper raises its errors after the pass). With ``audit``,
    also the audit's sums of contributions (``own``, factors 1) and of their absolute
    values (``scales``;
    ``scales_of`` adds a call's, with its per-example gradients' where it holds them),
    taken while the call's tensors are at hand: the clipper checks a parameter against its
    whole gradient as soon as the pass gives it (``PerSampleClipper._backward``).
    """

    def __init__(
        self,
        calls: set[LayerCall],
        recompute: set[LayerCall],
        batch: int,
        meter: CostMeter | None,
        audit: bool,
        scales_of: Callable[[LayerCall, Scales], None],
        rerun_samples: bool = False,
        order: Mapping[LayerCall, int] | None = None,
    ) -> None:
        self.batch, self.meter, self.recompute = batch, meter, recompute
        #: each call's parts, under its place in the forward (``order``)
        self._parts: list[tuple[int, list[torch.Tensor]]] = []
        self._order = order or {}
        self.ghost: list[GhostPart] = []
        self.kept: list[LayerCall] = []
        self.recomputed: list[LayerCall] = []
        self.wrong_batch: list[LayerCall] = []
        self.without_input: list[LayerCall] = []
        self.own: dict[nn.Parameter, torch.Tensor] | None = {} if audit else None
        self.scales: Scales = {}
        self._audit = audit
        self._scales_of = scales_of
        #: the forward ran checkpointed regions, which the second backward runs again:
        #: recomputed calls keep ``samples`` of what their norms saw
        self.rerun_samples = rerun_samples
        self._taken: set[LayerCall] = set()
        # a hook on the node the output's gradient enters: it fires when the node runs
        # (a node the pass does not run is one whose gradient the clipper captures)
        self._handles = [c.edge.node.register_prehook(self._hook(c)) for c in calls]

    @property
    def parts(self) -> list[torch.Tensor]:
        """The calls' [B] contributions to ‖g_i‖², in the forward's order of the calls, not
        the order the pass reached them: that order changes with what else the pass computes
        (the first micro-batch's check of the parameters' gradients), and with it the
        rounding of their sum, which a resumed run would not reproduce bit for bit."""
        return [t for _, ts in sorted(self._parts, key=lambda entry: entry[0]) for t in ts]

    def took(self, call: LayerCall) -> bool:
        """Whether a gradient of the call's output was taken."""
        return call in self._taken

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, call: LayerCall) -> Callable[[tuple[torch.Tensor | None, ...]], None]:
        def hook(grads: tuple[torch.Tensor | None, ...]) -> None:
            grad = grads[call.edge.output_nr]
            if grad is not None:
                self.take(call, grad)

        return hook

    def take(self, call: LayerCall, grad: torch.Tensor) -> None:
        """The call's share of the norms from its output gradient ``grad``; then it keeps
        what its part of S needs. Once per call: a second gradient of it is ignored."""
        if call in self._taken:
            return
        self._taken.add(call)
        call.backprop = grad
        if grad.dim() == 0 or call.by_example(grad).shape[0] != self.batch:
            self.wrong_batch.append(call)
            call.release()
            return
        if call.awaits_input:  # (the clipper refuses it after the pass)
            self.without_input.append(call)
            call.release()
            return
        recompute = call in self.recompute
        ghost = call.uses_ghost()
        with timed(self.meter, call, "ghost" if ghost else "per-sample"):
            if ghost:
                norm = call.rule.ghost_sq_norms(call)
                if norm.scale is None:
                    parts = [norm.sq]
                elif recompute:
                    parts = [exact_where_rounded(call, norm)]
                else:
                    parts = [norm.sq]
                    self.ghost.append(GhostPart(norm, call))
            else:
                call.per_sample = call.rule.per_sample_grads(call)
                parts = [row_sq_norms(g) for g in call.per_sample.values()]
        self._parts.append((self._order.get(call, len(self._order)), parts))
        if self.meter is not None:
            self.meter.note_keeps(call, "nothing" if recompute else KEEPS[ghost])
        if self._audit:  # (with its per-example gradients' part, where it has them)
            self._scales_of(call, self.scales)
            self._own_sums(call)
        if not recompute:
            self.kept.append(call)
            if not ghost:
                call.release()
            return
        self.recomputed.append(call)
        if self.rerun_samples:  # (the second backward must see what these norms saw: ``rerun_differences``)
            call.samples = (sample_rows(call, call.activations[0]) if call.rerun_input else None, sample_rows(call, grad))
        call.release()
        call.per_sample = None

    def _own_sums(self, call: LayerCall) -> None:
        ones = call.backprop.new_ones(self.batch, dtype=norm_dtype(call.backprop.dtype))
        call.add_clipped(ones, self.own)
