"""PerSampleClipper: the clipped gradient sum S = Σ_i min(1, C/‖g_i‖) · g_i of one
micro-batch from one backward pass over what the forward recorded."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.autograd.profiler import record_function

from dpclip.clipping.functions import BroadcastCall, FunctionRecorder, resolve_broadcast
from dpclip.clipping.memory import (
    KEEPS, EarlyNorms, GhostPart, SavedActivations, Scales, auto_mode, check_memory, kept_bytes,
    one_precision, recomputable, rerun_differences, rerun_mismatch, rows_overlap,
)
from dpclip.clipping.graph import check_graph_units, foreign_parameters, graph_per_sample
from dpclip.clipping.norms import (
    GHOST_ROUNDING_TOLERANCE, accumulator, add_weighted, clip_factors, gram_unit, norm_dtype,
    rounding_eps, row_sq_norms,
)
from dpclip.clipping.plan import ClippingPlan, CostMeter, build_plan, timed, warn_slow_layers
from dpclip.clipping.recording import GraphCall, LayerCall, Recorder, build_units, check_strategies
from dpclip.clipping.shared import shared_weight_ghost

__all__ = ["COMPILED_ADVICE", "REENTRANT_ADVICE", "NonFiniteNormError", "PerSampleClipper", "validate_module"]

#: Uses of a parameter outside its module that the audit finds (F.linear and x @ W.T on a
#: module's weight are recorded where lookups are: Hugging Face models).
_UNRECORDED = (
    "e.g. the weight in torch.einsum, transformed before use as in emb.weight * 0.5, or "
    "passed to F.linear outside its module in a model without embedding lookups"
)

#: Why a compiled model is refused, and what to do instead.
COMPILED_ADVICE = (
    "torch.compile is not supported with per-example clipping: dpclip records each layer's "
    "input and output with forward hooks, and a compiled graph hides the gradient at those "
    "outputs (the per-example norms would miss terms). Make the uncompiled model private "
    "(for model = torch.compile(m), pass m, i.e. model._orig_mod) and train it uncompiled"
)


#: Why reentrant gradient checkpointing fails, and what to do instead.
REENTRANT_ADVICE = (
    "gradient checkpointing with use_reentrant=True cannot run under dpclip: its backward takes "
    "the gradients at the layers' outputs with torch.autograd.grad, which reentrant "
    "checkpointing does not support. Checkpoint with use_reentrant=False (Hugging Face: "
    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
    "False}); torch.utils.checkpoint.checkpoint(..., use_reentrant=False)). Nothing was added"
)


class NonFiniteNormError(FloatingPointError):
    """Some per-sample gradient norm is NaN or infinite; the micro-batch was not accumulated.

    It counts as an empty micro-batch of its logical batch, so the logical-batch
    boundaries stay where the sampler put them. To skip it, catch the error and carry
    on with the loop: call ``optimizer.step()`` as usual. (A loop that ``continue``s
    past its ``step()`` works too: when the failed micro-batch was the last of its
    logical batch, ``DPOptimizer`` applies that logical batch before raising, and a
    ``step()`` right after is a no-op.)
    """


def validate_module(module: nn.Module) -> None:
    """Raise ``ValueError`` if ``module`` cannot get per-sample gradients as built.

    Refused: a model or submodule compiled with ``torch.compile`` (``COMPILED_ADVICE``),
    batch normalisation (mixes samples, so one example's gradient
    depends on the others), recurrent ``nn.RNNBase`` layers (hidden states are
    batch-second), attention or transformer layers with ``batch_first=False``, and
    trainable ``nn.Embedding`` lookups with ``sparse=True`` (``nn.EmbeddingBag``: its rule).
    """
    for name, sub in module.named_modules():
        how = _compiled(sub)
        if how is not None:
            where = f"module {name or '<root>'!r} ({type(sub).__name__})"
            raise ValueError(f"{where} {how}: {COMPILED_ADVICE}")
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("module has no parameter with requires_grad=True: nothing to train")
    norms = [
        f"{name!r} ({type(sub).__name__})" for name, sub in module.named_modules()
        if isinstance(sub, nn.modules.batchnorm._BatchNorm)
    ]
    if norms:
        raise ValueError(
            f"module {norms[0]} mixes examples in a batch, so per-sample gradients are not "
            "defined; replace it with nn.GroupNorm or nn.LayerNorm. Frozen too, it normalises "
            "with the batch's statistics in train mode: in a frozen pretrained body, replace it "
            "with the fixed affine map of its running statistics (torchvision.ops."
            "FrozenBatchNorm2d) or fold it into the convolution before it"
            + (f". All {len(norms)} of them: {', '.join(norms)}" if len(norms) > 1 else "")
        )
    for name, sub in module.named_modules():
        where = f"module {name or '<root>'!r} ({type(sub).__name__})"
        _refuse_weight_reparametrization(sub, where)
        if isinstance(sub, nn.RNNBase):
            raise ValueError(
                f"{where} is not supported: use opacus.layers.DPLSTM / DPGRU / DPRNN instead"
            )
        if isinstance(sub, nn.Embedding) and sub.sparse and sub.weight.requires_grad:
            raise ValueError(
                f"{where} has sparse=True: its private gradient is dense (the noise is added to "
                "every row of its weight), and dpclip's per-example norms take dense gradients; "
                "build it with sparse=False"
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


def _refuse_weight_reparametrization(module: nn.Module, where: str) -> None:
    """Raise ``ValueError`` if a trainable weight of ``module`` is computed from other
    parameters before its forward (``nn.utils.parametrizations.weight_norm`` /
    ``spectral_norm``, or their older hook versions): that computation has no batch, so
    no example's share of its parameters' gradient can be told."""
    from torch.nn.utils import parametrize

    found = []
    if parametrize.is_parametrized(module):
        found = [
            (f"a parametrization of {tensor!r} ("
             f"{', '.join(type(f).__name__ for f in module.parametrizations[tensor])})",
             f"nn.utils.parametrize.remove_parametrizations(module, {tensor!r})")
            for tensor in module.parametrizations
            if any(p.requires_grad for p in module.parametrizations[tensor].parameters())
        ]
    for hook in module._forward_pre_hooks.values():
        kind = type(hook).__name__
        if kind in ("WeightNorm", "SpectralNorm") and type(hook).__module__.startswith("torch.nn.utils"):
            name = getattr(hook, "name", "weight")
            if any(p.requires_grad for n, p in module.named_parameters(recurse=False) if n.startswith(name)):
                undo = "remove_weight_norm" if kind == "WeightNorm" else "remove_spectral_norm"
                found.append((f"{kind} on {name!r} (nn.utils.{undo[7:]})", f"nn.utils.{undo}(module)"))
    if found:
        what, undo = found[0]
        raise ValueError(
            f"{where} has {what}: its weight is computed from other parameters before each "
            "forward, without the batch, and dpclip cannot tell each example's share of that "
            f"computation's gradient. Remove it before make_private ({undo}: the weight keeps "
            "its current value), or freeze those parameters. A weight normalised inside the "
            "module's own forward (a Conv2d subclass that standardises its weight) is trained, "
            "on the exact slower path"
        )


def _compiled(module: nn.Module) -> str | None:
    """How ``module`` itself was compiled with ``torch.compile``, or None."""
    if type(module).__module__ == "torch._dynamo.eval_frame" and hasattr(module, "_orig_mod"):
        return "is the result of torch.compile(module)"
    if getattr(module, "_compiled_call_impl", None) is not None:
        return "was compiled in place by module.compile()"
    if getattr(module.forward, "_torchdynamo_orig_callable", None) is not None:
        return "has a forward compiled by torch.compile"
    return None


class PerSampleClipper:
    """Records layer calls during the forward pass and turns per-sample losses
    into the clipped gradient sum S = Σ_i min(1, C/‖g_i‖) · g_i.

    The clipper registers forward hooks on the modules that own trainable
    parameters (its ``recorder``), which keep what they record until the next
    ``clipped_sum`` call. ``remove()`` detaches the hooks. Frozen parameters
    (``requires_grad=False``) are not recorded and cost nothing; a parameter frozen
    later is left out from then on (no part of S, no share of the norms), and one
    frozen when the clipper was built cannot be unfrozen (``clipped_sum`` refuses).

    Norms, clipping factors and S are computed in float32 at least, also for
    half-precision layers and under ``torch.autocast`` (any device: the clipper turns
    it off for its own arithmetic), so that ‖c_i·g_i‖ <= C holds to float32 rounding.
    A layer that computed in bfloat16 or float16 is clipped as it computed: its
    activations rounded to its output's dtype, as autocast rounded them.

    Args:
        module: the model, trained in place (its parameters are the ones used).
        max_grad_norm: C > 0, the per-sample L2 clipping bound.
        clipping: how per-sample norms are computed where a layer has both rules:
            "auto" (mixed: per layer, ghost norm or per-sample gradients,
            whichever costs less for its shapes: ``dpclip.clipping.rules.Rule.costs``;
            for Linear on T positions, d inputs, p outputs, ghost when
            T²(d+p) ≤ 64·p·d), "ghost", "per_sample"; or a
            mapping from module names (as in ``named_modules``) to those, "auto"
            for the modules it leaves out. The result is the same up to rounding.
            A weight used by several calls (a layer run twice, tied embeddings) gets
            one ghost norm over all their positions (``dpclip.clipping.shared``) where
            that holds less than its per-sample gradients; else those, summed over the
            calls before the norm.
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
        memory: str = "auto",
    ) -> None:
        validate_module(module)
        check_strategies(clipping)
        check_memory(memory)
        #: "fast", "low" or "auto" (``dpclip.clipping.memory``)
        self.memory = memory
        self.module = module
        self.max_grad_norm = float(max_grad_norm)
        self.units = build_units(module, clipping)
        #: the parameters clipping covers: those trainable when the clipper was built
        self.params: tuple[nn.Parameter, ...] = tuple(
            p for p in module.parameters() if p.requires_grad
        )
        self._covered = set(self.params)
        self._owner_name = {p: u.name for u in self.units for p in u.params}
        self._audited = False
        #: True while S is being added into an accumulator (still True if that failed)
        self.writing = False
        #: per-sample gradient norms ‖g_i‖ of the last micro-batch (not private: debugging only)
        self.last_norms: torch.Tensor | None = None
        self.check_independence = bool(check_independence)
        #: the forward hooks and what they recorded since the last ``clipped_sum``
        functions = FunctionRecorder(module, self.units)
        self.recorder = Recorder(
            module, self.units, self.check_independence, functions if functions.needed else None
        )
        self.mode = "fast" if memory == "auto" else memory
        if memory == "auto":
            self.recorder.saved = SavedActivations(self.params)
        #: bytes and dtypes of what autograd saved in the loss of the forward "auto" chooses on
        self._loss_saved: tuple[int, frozenset[torch.dtype]] = (0, frozenset())
        # (until the first backward: "auto" chooses, "low" warns where it rounds more than
        # "fast"; "low" counts no saved activations: its hooks would be in the user's way,
        # as in a forward that calls torch.func.grad)
        self.recorder.watch_checkpointing = memory in ("auto", "low")
        #: what the first micro-batches took per layer, for ``plan()``
        self.meter = CostMeter(self._owner_name)

    def remove(self) -> None:
        """Detach the hooks; the module is as it was before."""
        self.recorder.remove()

    @contextlib.contextmanager
    def counting_loss(self) -> Iterator[None]:
        """Until ``memory="auto"`` chose: what autograd saves inside counts with what the
        forward saved. "low" keeps the loss's graph for its second pass as it keeps the
        model's (a language model's loss saves [B, T, vocabulary] log-probabilities: GPT-2
        with checkpointing peaked at 1.40x under "low", 1.14x under "fast")."""
        saved = self.recorder.saved
        if saved is None or self.recorder.saved_counts is None:
            yield
            return
        saved.start()
        try:
            yield
        finally:
            counted = saved.stop()
            self._loss_saved = counted if counted is not None else (0, frozenset())

    @property
    def mode(self) -> str:
        """The mode micro-batches run, "fast" or "low" ("auto": ``auto_mode``, chosen on
        the first micro-batch before its backward pass)."""
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = mode
        # (what a checkpointed region's calls keep: "auto" takes "fast" where "low" could
        # not take their inputs from the re-run)
        self.recorder.low = mode == "low"

    @property
    def chosen_mode(self) -> str | None:
        """The mode ``memory="auto"`` chose ("fast" or "low"); None before it chose, or
        when the mode was set."""
        return self.mode if self.memory == "auto" and self.recorder.saved is None else None

    def resume_mode(self, mode: str | None) -> None:
        """Run ``mode``, a saved run's ``chosen_mode``, from now on where ``memory="auto"``
        (None: choose as usual), so that a resumed run rounds as the saved one did."""
        if self.memory == "auto" and mode is not None:
            self.mode = mode
            self.recorder.saved = None
            self.recorder.watch_checkpointing = False

    def plan(self) -> ClippingPlan:
        """Per layer: the rule and strategy its per-example gradients take and, once a
        micro-batch was clipped, its share of that backward() (``dpclip.clipping.plan``)."""
        chosen = self.chosen_mode
        memory = self.memory if self.memory != "auto" or chosen is None else f"auto: {chosen}"
        return build_plan(self.units, self.meter, memory)

    def discard(self) -> None:
        """Forget the forward calls recorded since the last ``clipped_sum``."""
        self.recorder.discard()

    @property
    def recorded_calls(self) -> int:
        """Forward calls recorded since the last ``clipped_sum`` or ``discard``."""
        return len(self.recorder.calls)

    @property
    def generation(self) -> int:
        """Increases whenever the recorded forward calls are used up or dropped; a loss
        made from a forward whose records are gone can no longer be clipped."""
        return self.recorder.generation

    @property
    def _audit_due(self) -> bool:
        """The next backward checks the records against the whole gradient: on the first
        micro-batch, and after the records of an unused forward were dropped."""
        return not self._audited or self.recorder.dropped

    def check_coverage(self) -> None:
        """Raise ``RuntimeError`` if a trainable parameter of the module is one clipping
        does not cover (frozen when the clipper was built, or added since)."""
        for name, p in self.module.named_parameters():
            if p.requires_grad and p not in self._covered:
                raise RuntimeError(
                    f"parameter {name!r} requires grad but was frozen when the model was made "
                    "private (or added or replaced since: a weight untied by assigning a new "
                    "nn.Parameter, say), so it has no per-example clipping and would get no "
                    "private gradient: freeze it again (requires_grad_(False)), or make a new "
                    "model private with it trainable from the start"
                )

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
            RuntimeError: the recorded forward cannot give per-sample gradients (also:
                it ran compiled, ``COMPILED_ADVICE``), or the loss depends on a
                parameter clipping does not cover (see message); nothing returned, and
                the recorded calls are kept when the refusal comes before they are used.
        """
        gram_unit.cache_clear()  # (it reads the matmul precision, which the user may change)
        # autocast left on around backward() would run the norms and sums in half precision
        with torch.autocast(loss_per_sample.device.type, enabled=False), self.recorder.paused():
            try:
                return self._clipped_sum(loss_per_sample, out)
            except RuntimeError as err:
                if "use_reentrant" in str(err):
                    raise RuntimeError(REENTRANT_ADVICE) from err
                raise

    def _clipped_sum(
        self, loss_per_sample: torch.Tensor, out: dict[nn.Parameter, torch.Tensor] | None
    ) -> dict[nn.Parameter, torch.Tensor]:
        if loss_per_sample.dim() != 1:
            raise ValueError(
                f"Expected per-sample losses of shape [B], got {tuple(loss_per_sample.shape)}"
            )
        if not loss_per_sample.requires_grad:
            raise RuntimeError("the loss does not require grad: no parameter depends on it")
        if self.recorder.compiled:
            raise RuntimeError(
                f"the model's forward ran under torch.compile after make_private. {COMPILED_ADVICE}"
            )
        self.check_coverage()
        if not self.recorder.root_ran and self.recorder.functions is not None:
            # lookups are recorded only inside the model's own call: one that ran outside it
            # (a submodule called alone, model.forward(x)) has no record (a linear probe's
            # head called on features is recorded by its module)
            lookups = self.recorder.functions.lookup_params()
            if lookups and foreign_parameters(loss_per_sample, self._covered - lookups):
                raise RuntimeError(
                    "the loss comes from a forward that did not go through the model made "
                    "private as model(x): a submodule called alone (model.hf(...), "
                    "model.encoder(...)) or model.forward(x). dpclip records lookups such as "
                    "embeddings only inside the model's own call, so their gradient would be "
                    "lost. Call the model that make_private returned, model(x), and compute the "
                    "loss from its output (in a LightningModule: define forward and call self(x) "
                    "in training_step). Nothing was added"
                )
        if self._audit_due:  # once: a trainable module outside the model gets no gradient
            foreign = foreign_parameters(loss_per_sample, self._covered)
            if foreign:
                raise RuntimeError(
                    f"the loss depends on a trainable parameter (shape {tuple(foreign[0].shape)}) "
                    "that is not a parameter of the private model, so it would get no gradient: "
                    "include its module in the model passed to make_private, or freeze it "
                    "(requires_grad_(False))"
                )
        calls = self.recorder.take()
        batch = loss_per_sample.shape[0]
        # the rounding of the layers' own arithmetic (bfloat16 under autocast), for the audit;
        # float32's at least where a call takes the graph path: a float64 model's module may
        # compute inside in float32 (Hugging Face's RMSNorms cast to it), which its outputs'
        # dtypes do not show (a rule's call has the dtype it computed in)
        graph = any(isinstance(c, GraphCall) for c in calls)
        eps = rounding_eps([
            *([torch.float32] if graph else []),
            *(d for c in calls for d in (c.dtypes if isinstance(c, GraphCall) else [c.dtype])),
        ])
        # the first few micro-batches are measured per layer, for the plan
        meter = self.meter if self.meter.measuring else None
        if meter is not None:
            meter.begin(loss_per_sample.device)
        # labelled ranges: what benchmarks/phase_profile.py reports per phase (free when not profiling)
        with record_function("dpclip.backward"), timed(meter, None):
            layer_calls, graph_calls, full, early = self._backward(loss_per_sample, calls, batch, meter, eps)
        # the audit's rounding scale needs the calls' tensors, which the norms may release
        scales = None if full is None else _contribution_scales(layer_calls, graph_calls)
        if scales is not None:
            scales.update(early.scales)  # (a parameter's calls are all early, or none)
        with record_function("dpclip.norms"):
            # per-example gradients taken whole (the graph path, groups of calls sharing a
            # parameter): the norms and the clipped sum both come from these
            graph_grads: dict[nn.Parameter, torch.Tensor] = {}
            done: set[LayerCall] = set()
            ghost: list[GhostPart] = []
            parts = self._layer_sq_norms(layer_calls, meter, graph_grads, done, ghost) + early.parts
            ghost += early.ghost
            layer_calls = [c for c in layer_calls if c not in done]
            for call in graph_calls:
                if meter is not None:
                    meter.note_keeps(call, KEEPS[False])
                with timed(meter, call, "per-sample"):
                    grads = graph_per_sample([call])
                parts += [row_sq_norms(g) for g in grads.values()]
                graph_grads.update(grads)
            sq = _total(parts, batch, norm_dtype(loss_per_sample.dtype), loss_per_sample.device)
            sq, bad = _exact_where_rounded(sq, parts, ghost)
            norms = sq.sqrt()
        if bad:
            raise NonFiniteNormError(
                f"{bad} of {batch} per-sample gradient norms are NaN or infinite; this micro-batch "
                "was not accumulated and counts as an empty micro-batch of its logical batch. To "
                "skip it, catch dpclip.NonFiniteNormError and carry on with the loop, calling "
                "optimizer.step() as usual"
            )
        if full is not None:
            self._audit(full, layer_calls, graph_grads, norms.new_ones(batch), scales, eps, early.own)
        self.last_norms = norms.detach()
        factors = clip_factors(norms, self.max_grad_norm).detach()
        result = {} if out is None else out
        self.writing = True  # an error from here on leaves ``out`` partly added to
        with record_function("dpclip.clipped_sum"):
            self._sum(layer_calls + early.kept, graph_grads, factors, False, result, meter)
        # before the second backward, which runs checkpointed regions again beside them:
        # the kept calls' tensors, the per-example gradients, and the gradients at the places
        # where batch-less lookups met the batch (T5's relative bias: [B, H, T, T] a layer)
        graph_grads.clear()
        del layer_calls
        if early.recomputed:
            with record_function("dpclip.second_backward"), timed(meter, None):
                self._second_backward(loss_per_sample, factors, early.recomputed, result)
        self.writing = False
        if meter is not None:
            meter.finish(batch)
            if meter.measured == 1:
                warn_slow_layers(self.plan())
        return result

    def _second_backward(
        self, loss_per_sample: torch.Tensor, factors: torch.Tensor, calls: list[LayerCall],
        out: dict[nn.Parameter, torch.Tensor],
    ) -> None:
        """Add Σ_i c_i ∇ ℓ_i for the parameters of the recomputed calls into ``out``: the
        gradient of Σ_i c_i ℓ_i, by a second backward through the graph the first one
        kept. Each parameter's is added by a hook as the pass reaches it, and autograd is
        handed back a zero without storage: returned together at the end of the pass, they
        held the recomputed layers' gradients once more (0.7x RoBERTa-base's parameters).
        A hook on each call's output measures whether this pass sees what the norms saw
        (``rerun_differences``): gradient checkpointing runs its regions again for it."""
        params = list(dict.fromkeys(p for c in calls for p, _ in c.targets.values()))
        weighted = (loss_per_sample.to(factors.dtype) * factors).sum()
        handles = [p.register_hook(_adder(out, p)) for p in params]
        seen: list[tuple[LayerCall, torch.Tensor]] = []

        def check(call: LayerCall) -> Callable[[tuple[torch.Tensor | None, ...]], None]:
            def hook(grads: tuple[torch.Tensor | None, ...]) -> None:
                if grads[call.edge.output_nr] is not None:
                    seen.append((call, rerun_differences(call, grads[call.edge.output_nr], factors)))

            return hook

        handles += [c.edge.node.register_prehook(check(c)) for c in calls if c.samples]
        try:
            torch.autograd.grad(weighted, params, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for c in calls:
                c.samples = c.rerun = None
        dtypes = {loss_per_sample.dtype, *(c.dtype for c in calls)}
        over = rerun_mismatch(torch.stack([d for _, d in seen]), dtypes) if seen else None
        if over is not None and bool(over.any()):  # (one host synchronisation)
            row, column = (int(i) for i in over.nonzero()[0])
            name = self._call_name(seen[row][0])
            raise RuntimeError(
                f'memory="low" took the clipped sum from a second backward pass that saw another '
                f"{('output gradient', 'input')[column]} of module {name!r} than the first pass "
                "took the norms from: a checkpointed region ran differently the second time "
                "(random numbers not drawn again: preserve_rng_state=False, also on an enclosing "
                "region, dropout from a torch.Generator of your own, ...), so the clipping bound "
                'would not hold. Use memory="fast" (one backward pass). This logical batch is lost'
            )

    def _call_name(self, call: LayerCall | GraphCall | BroadcastCall) -> str:
        """The name of the module that owns the call's (first) parameter."""
        return self._owner_name.get(next(iter(self._params_of(call))), "?")

    def _check_operands(self, calls: list[LayerCall], dtypes: set[torch.dtype]) -> None:
        """Raise ``RuntimeError`` if what a call recorded by operation computed again from
        the input a checkpointed region's re-run gave (``LayerCall.from_input``: an RMSNorm's
        n) is not what its forward took, beyond two roundings per entry of the least precise
        of ``dtypes`` (the layers' and the loss's: under bfloat16 autocast a float32
        residual stream adds bfloat16 outputs, whose rounding a region's re-run may change;
        one rounding of the attention's output in a re-run measured 0.2-0.76 of one rounding
        per entry); ``operand_checksum``, one host synchronisation. The modules of all such
        calls keep n from the forward from then on."""
        if not calls:
            return
        eps = 2 * rounding_eps(dtypes)
        gaps = torch.stack([c.operand_gap for c in calls])
        over = (gaps[:, 0] > eps * gaps[:, 1]).any(dim=1).tolist()
        if not any(over):
            return
        refused = {c.module for c, o in zip(calls, over) if o}
        for unit in self.units:
            if unit.module in refused:
                unit.rerun_scale = False
        call = calls[over.index(True)]
        raise RuntimeError(
            f"module {self._call_name(call)!r} ran inside torch.utils.checkpoint, and dpclip "
            "computed the operand its weight scales again from the module's input in the "
            "backward, to keep nothing of it from the forward; that gave other values than the "
            "forward's (its forward reads state that changed since, draws random numbers from "
            "a generator of its own, or the region ran differently when the backward ran it "
            f"again). It{' and ' + str(len(refused) - 1) + ' other modules' if len(refused) > 1 else ''} "
            "keep the operand from the forward from now on. Nothing was added: count this "
            "micro-batch with optimizer.add_empty_micro_batch() and go on"
        )

    def _changed_in_place(self, call: LayerCall) -> None:
        raise RuntimeError(
            f"the input of module {self._call_name(call)!r} was modified in place after its forward "
            "(e.g. by nn.ReLU(inplace=True) or x += layer(x) on the tensor it was given); "
            "use the out-of-place version"
        )

    def _backward(
        self, loss_per_sample: torch.Tensor, calls: list[LayerCall | GraphCall], batch: int,
        meter: CostMeter | None, eps: float,
    ) -> tuple[
        list[LayerCall], list[GraphCall], list[tuple[nn.Parameter, torch.Tensor]] | None, EarlyNorms
    ]:
        """The one backward pass: gradients of Σ ℓ_i at every recorded output (and, on
        the first micro-batch only, at the trainable parameters, for the audit).
        Lookups without a batch dimension (``BroadcastCall``) become layer calls from the
        gradients at the places where they met the batch.

        The calls ``recomputable`` allows take their norms during the pass, as their
        output gradients arrive (``EarlyNorms``), and keep only what the clipped sum needs;
        with ``memory="low"`` nothing, and the graph is kept for the second backward
        that gives their part of the clipped sum. The others (parameters shared between
        calls) get their output gradients at the end of the pass."""
        broadcast = [c for c in calls if isinstance(c, BroadcastCall)]
        calls = [c for c in calls if not isinstance(c, BroadcastCall)]
        for call in calls:
            # a layer's recorded inputs share version counters with the model's tensors: an
            # in-place change after the forward would feed stale values to the norms (its
            # output's gradient is taken where it entered the graph: a change there is none)
            if isinstance(call, LayerCall) and call.versions != call.current_versions():
                self._changed_in_place(call)
        audit = self._audit_due
        layer = [c for c in calls if isinstance(c, LayerCall)]
        # (what the layers and the loss show: a layer that casts inside is not seen)
        shown = {loss_per_sample.dtype, *(c.dtype for c in layer)}
        # (a batch-less lookup's parameter counts as used by it too: its share is summed
        # with the batched calls' per example, after the pass)
        hooked = recomputable([*layer, *broadcast]) - set(broadcast)
        if self.recorder.saved is not None and self.recorder.saved_counts is not None:
            saved, dtypes = self.recorder.saved_counts
            loss_saved, loss_dtypes = self._loss_saved
            self.recorder.saved = None
            self.mode = auto_mode(
                sum(kept_bytes(c, batch) for c in hooked), saved + loss_saved,
                {*dtypes, *loss_dtypes, *shown},
                self.recorder.checkpointed, not self.recorder.rerun_once and _met_bytes(broadcast, batch) <= saved,
            )
            self.recorder.watch_checkpointing = False
        if self.memory == "low" and self.recorder.watch_checkpointing:  # (its first backward)
            if self.recorder.single_use:
                raise RuntimeError(
                    'memory="low" takes the clipped sum from a second backward pass, which runs '
                    "the checkpointed regions again, and a region here allows one backward only "
                    "(torch.utils.checkpoint with a context_fn: selective activation "
                    "checkpointing, or debug=True). Use memory=\"fast\" or \"auto\" (one backward "
                    "pass). Nothing was added"
                )
            if not one_precision(shown):
                _warn_low_precisions(shown)
            elif self.recorder.checkpointed and shown == {torch.float64}:
                _warn_low_precisions(shown, hidden=True)
            self.recorder.watch_checkpointing = False
        recompute = hooked if self.mode == "low" else set()
        early = EarlyNorms(
            hooked, recompute, batch, meter, audit, _add_call_scales, self.recorder.checkpointed,
            order={c: i for i, c in enumerate(calls)},
        )
        # a hooked call's output is captured only where nothing captured is below it (its
        # input needs no gradient: a lookup); the pass reaches the others on the way down
        nodes = {c.edge.node for c in layer}
        nodes.update(e.node for c in calls if isinstance(c, GraphCall) for e in c.edges)
        captured = [c for c in calls if c not in hooked or not _input_needs_grad(c, nodes)]
        graph_calls = [c for c in calls if isinstance(c, GraphCall)]
        flat = [t for c in captured for t in ([c.edge] if isinstance(c, LayerCall) else c.edges)]
        trainable = [p for p in self.params if p.requires_grad] if audit else []
        met = [t for c in broadcast for t in c.inputs()]
        inputs = flat + met + trainable
        watched = [h for c in broadcast for h in c.watch(batch)]
        checked: set[nn.Parameter] = set()
        if audit:
            others = [*(c for c in calls if c not in hooked), *broadcast]
            watched += self._check_as_given(hooked, others, early, eps, checked)
        try:  # the graph path and a second backward take a second pass through the graph
            grads = torch.autograd.grad(
                loss_per_sample.sum(), inputs, retain_graph=bool(graph_calls or recompute),
                allow_unused=True,
            ) if inputs else ()
        finally:
            early.remove()
            for h in watched:
                h.remove()
        it = iter(grads[: len(flat)])
        layer_calls: list[LayerCall] = []
        used_graph: list[GraphCall] = []
        for call in captured:
            if isinstance(call, LayerCall):
                g = next(it)
                if call in hooked:  # a node the pass did not run: its hook did not fire
                    if g is not None:
                        early.take(call, g)
                    continue
                call.backprop = g
                if call.backprop is not None:
                    layer_calls.append(call)
            else:
                call.backprops = [next(it) for _ in call.edges]
                if any(b is not None for b in call.backprops):
                    used_graph.append(call)
        late = [c for c in hooked if c not in captured and not early.took(c)]
        if late:
            # no captured tensor below them (an input that requires grad from outside the
            # model, or an output the loss does not use): their gradients, in a pass of their own
            for c, g in zip(late, torch.autograd.grad(
                loss_per_sample.sum(), [c.edge for c in late], retain_graph=True, allow_unused=True,
            )):
                if g is not None:
                    early.take(c, g)
        wrong = early.wrong_batch + [
            c for c in layer_calls if c.backprop.dim() == 0 or c.by_example(c.backprop).shape[0] != batch
        ]
        if wrong:  # the first in the forward's order
            order = {c: i for i, c in enumerate(calls)}
            first = min(wrong, key=lambda c: order.get(c, len(order)))
            self._batch_error(first.module, first.shape, batch)
        changed = [c for c in layer if c.changed]
        if changed:
            self._changed_in_place(changed[0])
        self._check_operands([c for c in layer if c.operand_gap is not None], shown)
        without = early.without_input + [c for c in layer_calls if c.awaits_input]
        if without:
            raise RuntimeError(
                f"module {self._call_name(without[0])!r} ran inside torch.utils.checkpoint: dpclip takes its input "
                "from the checkpointed region's run in the backward, when the backward reaches "
                "the module's output, but its output's gradient came by another way (the output "
                "as a forward hook that ran before dpclip's saw it, e.g. one registered before "
                "make_private or with prepend=True, not as the module returned it). Use the "
                "module's returned output, or run the module outside the "
                "checkpointed region. Nothing was added"
            )
        # (after the batch check: a loss per token would fail here with a bare reshape error)
        at = iter(grads[len(flat): len(flat) + len(met)])
        for call in broadcast:
            name = self._owner_name.get(call.targets["weight"][0], "?")
            resolved = resolve_broadcast(call, [next(at) for _ in call.inputs()], batch, name)
            if resolved is not None:
                if resolved.by_example(resolved.backprop).shape[0] != batch:
                    self._batch_error(resolved.module, resolved.shape, batch)
                layer_calls.append(resolved)
        taken = early.kept + early.recomputed
        if not layer_calls and not used_graph and not taken and not audit:  # (the audit says more)
            raise RuntimeError(
                "the loss depends on no layer call recorded by a forward of the private model "
                "since the last backward(): it was computed from a forward whose records a "
                "backward() already used (dpclip takes one backward() per forward: add the "
                "losses of one forward per example first, loss_a + loss_b), or not from the "
                "model made private"
            )
        check_graph_units(used_graph, layer_calls + taken)
        for call in used_graph:
            batchless = call.batchless or [False] * len(call.shapes)
            for shape, b, alone in zip(call.shapes, call.backprops, batchless):
                if b is not None and (not shape or shape[0] != batch or alone):
                    self._batch_error(call.unit.module, shape, batch, alone)
        full = [
            (p, g) for p, g in zip(trainable, grads[len(flat) + len(met):]) if g is not None and p not in checked
        ]
        return layer_calls, used_graph, (full if audit else None), early

    def _check_as_given(
        self, hooked: set[LayerCall], others: list[LayerCall | GraphCall | BroadcastCall],
        early: EarlyNorms, eps: float, checked: set[nn.Parameter],
    ) -> list[Any]:
        """The audit's check of each parameter used only by calls whose norms the pass
        takes (``hooked``), by a hook on it, as the pass gives its whole gradient: by then
        each of its calls that got a gradient added its sum to ``early.own`` (a call's node
        runs before the nodes below it). Checked parameters go into ``checked``, and autograd
        is handed a zero without storage: returned together at the end of the pass, every
        parameter's whole gradient was held at once (the model's size more than non-private
        on the first micro-batch). A parameter with a call not taken cleanly (its output
        got no gradient, or one not batch-first, which the clipper refuses after the pass) is
        left to the check after the pass. Returns the hooks' handles."""
        shared = {p for c in others for p in self._params_of(c)}
        calls_of: dict[nn.Parameter, list[LayerCall]] = {}
        for call in hooked:
            for p, _ in call.targets.values():
                calls_of.setdefault(p, []).append(call)
        names: dict[nn.Parameter, str] = {}  # (once a check runs)

        def hook_for(p: nn.Parameter, calls: list[LayerCall]) -> Callable[[torch.Tensor], torch.Tensor]:
            def hook(g: torch.Tensor) -> torch.Tensor:
                taken = (
                    early.took(c) and not c.changed and c not in early.wrong_batch and c not in early.without_input
                    for c in calls
                )
                if p in checked or not all(taken):
                    return g
                if not names:
                    names.update(self._parameter_names())
                self._check_recorded(
                    p, names.get(p, "?"), g, early.own.pop(p, None), early.scales.pop(p, None), eps
                )
                checked.add(p)
                return _no_storage(g)

            return hook

        return [
            p.register_hook(hook_for(p, calls))
            for p, calls in calls_of.items() if p.requires_grad and p not in shared
        ]

    def _parameter_names(self) -> dict[nn.Parameter, str]:
        return {p: n for n, p in self.module.named_parameters()}

    def _batch_error(self, module: nn.Module, shape: tuple[int, ...], batch: int, batchless: bool = False) -> None:
        name = next((u.name for u in self.units if u.module is module), type(module).__name__)
        forward = self.recorder.forward_batch
        if forward is not None and batch > forward and batch % forward == 0:  # one per token
            raise RuntimeError(
                f"the criterion returned {batch} per-sample losses but the model's forward had "
                f"a batch of {forward}: dpclip needs one loss per example (shape [B] or [B, ...]). "
                "Flattening [B, T, V] logits to [B·T, V] (logits.view(-1, V), as Hugging Face's "
                "own loss does) gives one loss per token: keep the batch dimension, e.g. "
                "nn.CrossEntropyLoss on logits.transpose(1, 2) with labels [B, T] (dpclip "
                "averages each sequence's tokens)"
            )
        rows = shape[0] if shape else 0
        if isinstance(module, torch.nn.utils.parametrize.ParametrizationList):
            why = ("a parametrization (nn.utils.parametrizations.weight_norm, …) computes a "
                   "weight from parameters, without the batch, and dpclip clips no such "
                   "computation per example (remove it with nn.utils.parametrize."
                   "remove_parametrizations before make_private, or freeze the layer)")
        elif rows > batch and rows % batch == 0 and not batchless:
            why = ("the model folds the batch into another dimension there (a reshape to "
                   "[B·T, H], or windows [B·W, …]), which dpclip does not attribute to examples")
        else:
            why = ("the module runs on a tensor without the batch as its first dimension, "
                   "or gives one: computed from parameters alone (such as a relative-position "
                   "bias), or batch-second. dpclip tells each example's share of such a "
                   "computation only for an embedding lookup (nn.Embedding, F.embedding) whose "
                   "result, and what is computed from it alone, meets the batch in a "
                   "broadcasting add/sub/mul/div; a table indexed, gathered or multiplied "
                   "otherwise (table[index], as BEiT's and DeBERTa's relative positions are) is "
                   "not followed")
        has = (
            f"has shape {tuple(shape)}, computed without the batch (its first dimension equals "
            "the batch size by chance; a parameter expanded over the batch with expand() is "
            "taken, a copy of it with repeat() is not), and"
            if batchless and rows == batch else f"has shape {tuple(shape)} but"
        )
        raise RuntimeError(
            f"an output of module {name!r} {has} "
            f"the loss has {batch} per-sample values: dpclip needs batch-first tensors. Here "
            f"{why}: the model is not supported as built (freeze that module with "
            "requires_grad_(False) to leave it out of training)"
        )

    @staticmethod
    def _params_of(call: LayerCall | GraphCall | BroadcastCall) -> list[nn.Parameter]:
        if isinstance(call, GraphCall):
            return list(call.params)
        return [p for p, _ in call.targets.values()]

    @staticmethod
    def _layer_sq_norms(
        calls: list[LayerCall],
        meter: CostMeter | None,
        grouped: dict[nn.Parameter, torch.Tensor],
        done: set[LayerCall],
        ghost: list[GhostPart],
    ) -> list[torch.Tensor]:
        """‖g_i‖² contributions, [B] each: a call's own where no other call uses its
        parameters, else one per group of calls whose parameters overlap (each call's work
        timed by ``meter`` when it measures). A group's per-example gradients, summed over
        its calls, go into ``grouped`` ({param: [B, *shape]}), and its calls into ``done``:
        its clipped sum is taken from those sums. Ghost norms also go into ``ghost``."""
        uses: dict[nn.Parameter, list[tuple[LayerCall, slice | None]]] = {}
        shared = False
        for call in calls:
            for p, rows in call.targets.values():
                entries = uses.setdefault(p, [])
                shared = shared or bool(entries)
                entries.append((call, rows))
        if not shared:  # the usual case: no grouping to do
            out: list[torch.Tensor] = []
            for call in calls:
                _own_sq_norms(call, meter, out, ghost)
            return out
        group = {call: call for call in calls}

        def find(c: LayerCall) -> LayerCall:
            while group[c] is not c:
                c = group[c]
            return c

        for entries in uses.values():
            for i, (a, ra) in enumerate(entries):
                for b, rb in entries[i + 1:]:
                    if rows_overlap(ra, rb):
                        group[find(a)] = find(b)
        groups: dict[LayerCall, list[LayerCall]] = {}
        for call in calls:
            groups.setdefault(find(call), []).append(call)
        out = []
        for members in groups.values():
            if len(members) == 1:
                _own_sq_norms(members[0], meter, out, ghost)
                continue
            tied = shared_weight_ghost(members)
            if tied is not None:  # one Gram product over all their positions
                if meter is not None:
                    for call in members:
                        meter.note_keeps(call, KEEPS[True])
                with timed(meter, members[0], "ghost"):
                    norm = tied.ghost_sq_norms()
                out.append(norm.sq)
                if norm.scale is not None:
                    ghost.append(GhostPart(norm, tied))
                continue  # each call adds its own part of the clipped sum
            summed: dict[nn.Parameter, torch.Tensor] = {}
            for call in members:
                with timed(meter, call, "per-sample"):  # summed over the group: never ghost
                    grads = call.rule.per_sample_grads(call)
                call.release()
                for role, g in grads.items():
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
                del grads  # one call's per-example gradients at a time, besides the sums
            out.append(sum(row_sq_norms(g) for g in summed.values()))
            if meter is not None:
                for call in members:
                    meter.note_keeps(call, "summed per-example gradients")
            # the clipped sum is taken from the group's sums: the calls keep nothing
            grouped.update(summed)
            done.update(members)
        return out

    @staticmethod
    def _sum(
        layer_calls: list[LayerCall],
        graph_grads: dict[nn.Parameter, torch.Tensor],
        factors: torch.Tensor,
        retain_graph: bool,
        out: dict[nn.Parameter, torch.Tensor],
        meter: CostMeter | None = None,
    ) -> dict[nn.Parameter, torch.Tensor]:
        """Add Σ_i c_i g_i into ``out`` (zeros in ``norm_dtype`` allocated for parameters
        it lacks: a half-precision accumulator would round each example's c_i·g_i); each
        layer's part timed by ``meter`` when it measures."""

        for call in layer_calls:
            with timed(meter, call):
                call.add_clipped(factors, out)
            if not retain_graph:  # the last use: free as we go (the audit sums twice)
                call.release()
                call.per_sample = None
        for p, g in graph_grads.items():
            with timed(meter, p):
                add_weighted(accumulator(out, p), g, factors)
        return out

    def _audit(
        self,
        full: list[tuple[nn.Parameter, torch.Tensor]],
        layer_calls: list[LayerCall],
        graph_grads: dict[nn.Parameter, torch.Tensor],
        ones: torch.Tensor,
        scales: Scales,
        eps: float,
        own: dict[nn.Parameter, torch.Tensor] | None = None,
    ) -> None:
        """Once, on the first micro-batch: the recorded calls must account for each
        trainable parameter's whole gradient. A weight also used outside its own module
        (``F.linear(h, self.emb.weight)``) would otherwise be under-clipped.

        Per parameter, the sum o of its recorded per-example gradients (factors 1) is
        compared with its whole gradient f from autograd, element by element, within the
        rounding of the sums: both add up the same contributions (per example and
        position) in different orders, so they differ by at most ~n·eps·Σ|contributions|
        (Higham, "Accuracy and Stability of Numerical Algorithms", §4.2), typically
        √n·eps·Σ|contributions|. A parameter whose true gradient is 0 (an attention key
        bias: softmax ignores a constant shift) gets rounding noise on that scale in both,
        and passes; a use no record sees is a whole missing contribution, and does not.
        ``eps``: the relative rounding of the layers' arithmetic (bfloat16's under
        autocast, where a float32 parameter's whole gradient comes from a bfloat16 backward).
        ``own``: the sums (factors 1) of the calls whose norms the pass took (``EarlyNorms``),
        added to; their parameters that the pass already checked are not in ``full``.
        """
        own = own or {}
        for p, g in graph_grads.items():
            _add_abs_sum(scales, p, g)
        # parameter by parameter, as soon as its last call is summed, dropping its whole
        # gradient, sum and scale: all parameters' at once held up to 3x the model's size
        # more than any later micro-batch (1.3x non-private's peak on GPU for RoBERTa-base)
        names = self._parameter_names()
        whole = dict(full)
        full.clear()
        calls_left: dict[nn.Parameter, int] = {}
        for call in layer_calls:
            for p, _ in call.targets.values():
                calls_left[p] = calls_left.get(p, 0) + 1
        for call in layer_calls:
            for role, g in (call.per_sample or {}).items():  # the per-example level: holds
                _add_abs_sum(scales, call.targets[role][0], g)  # for rules that are not bilinear
            call.add_clipped(ones, own)
            for p, _ in call.targets.values():
                calls_left[p] -= 1
                if calls_left[p] == 0 and p not in graph_grads and p in whole:
                    self._check_recorded(
                        p, names.get(p, "?"), whole.pop(p), own.pop(p, None), scales.pop(p, None), eps
                    )
        for p, g in graph_grads.items():
            add_weighted(accumulator(own, p), g, ones)
        for p, f in whole.items():
            self._check_recorded(p, names.get(p, "?"), f, own.pop(p, None), scales.pop(p, None), eps)
        self._audited, self.recorder.dropped = True, False

    def _check_recorded(
        self, p: nn.Parameter, name: str, f: torch.Tensor, o: torch.Tensor | None,
        scale_unit: tuple[torch.Tensor, torch.Tensor, float] | None, eps: float,
    ) -> None:
        """The audit of one parameter (named ``name``): its whole gradient ``f`` against
        the sum ``o`` of its recorded per-example gradients (None: none recorded), within
        the rounding that ``scale_unit`` (``Scales``' entry, ``_contribution_scales``) and
        ``eps`` bound."""
        largest = torch.finfo(f.dtype).max  # (of the gradient's own dtype: float16's is 65504)
        dtype = norm_dtype(f.dtype)
        seen = o is not None
        f = f.to(dtype)
        o = o.to(dtype) if o is not None else torch.zeros_like(f)
        scale, top, unit = 0.0, 0.0, 0.0
        if scale_unit is not None:
            scale, top, unit = math.sqrt(float(scale_unit[0])), float(scale_unit[1]), scale_unit[2]
        unit = max(unit, torch.finfo(f.dtype).eps, eps)
        owner = self._owner_name.get(p, "an unhooked module")
        bad = ~(torch.isfinite(f) & torch.isfinite(o))
        if bad.any():
            # finite contributions overflow a sum only past the dtype's largest number
            if top < largest:
                raise RuntimeError(
                    f"parameter {name!r} (of module {owner!r}) has a NaN or infinite "
                    "gradient, although every per-example gradient dpclip recorded for it "
                    f"is finite and their sum cannot overflow {f.dtype}: the non-finite part "
                    f"comes from a use of the parameter that dpclip does not record ({_UNRECORDED}), "
                    "which it cannot clip per example: use the module itself, or tie weights "
                    "by sharing the module attribute (head.weight = emb.weight). Nothing was "
                    "accumulated"
                )
            keep = ~bad  # an overflow of the parameter's dtype: those elements say nothing
            f, o = f[keep], o[keep]
        # √eps covers the worst case up to n = 1/√eps contributions per element (~2900 in
        # float32) and the typical case up to n = 1/eps
        # plus what underflow can lose: a float16 backward flushes values below its
        # smallest normal number (6e-5), whatever their relative size
        diff = float((o - f).norm())
        tol = math.sqrt(unit) * scale + _smallest_normal(unit) * math.sqrt(f.numel())
        if diff > tol:
            self._refuse_unrecorded(name, owner, diff, tol, seen)

    def _refuse_unrecorded(self, name: str, owner: str, diff: float, tol: float, seen: bool) -> None:
        if self.recorder.dropped:
            raise RuntimeError(
                f"parameter {name!r} (of module {owner!r}) gets gradient that this forward's "
                "records do not account for: the loss uses a forward of the model whose records "
                "dpclip dropped when the next forward with gradients enabled started. A loss "
                "over several forwards of the model (e.g. siamese pairs) cannot be clipped per "
                "example this way: compute it in one forward of a module that takes all its "
                "inputs (forward(x1, x2)), and evaluate under torch.no_grad(). (Or the "
                f"parameter has a use dpclip does not record, {_UNRECORDED}: tie it by sharing "
                "the module attribute.) Nothing was accumulated"
            )
        recorded = (
            "its gradient differs from the sum of the per-example gradients dpclip recorded "
            f"for it by {diff:.3g} in norm, more than rounding explains ({tol:.3g})"
            if seen else "no forward of its module recorded any gradient for it"
        )
        rerun = (
            " Or, under gradient checkpointing, a checkpointed region gave other values when "
            "the backward ran it again than its forward did (dropout with "
            "preserve_rng_state=False: keep torch's default, True)." if self.recorder.checkpointed else ""
        )
        raise RuntimeError(
            f"parameter {name!r} (of module {owner!r}) gets gradient from outside its own "
            f"module's forward: {recorded}. It has a use dpclip does not record ({_UNRECORDED}), "
            "so its per-example norm would be too small: use the module itself, or tie weights "
            f"by sharing the module attribute (head.weight = emb.weight).{rerun} Nothing was accumulated"
        )


def _warn_low_precisions(dtypes: set[torch.dtype], hidden: bool = False) -> None:
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    least = rounding_eps(dtypes)
    what = (
        "a float64 model that runs gradient checkpointing, inside which dpclip cannot see "
        "in what precision its layers compute (Hugging Face's RMSNorms cast to float32)"
        if hidden else
        f"a model that computes in {names}, not in one float32 or float64 precision (half "
        "precision or autocast)"
    )
    warnings.warn(
        f'memory="low" on {what}: "low" takes the clipped sum from a backward of Σ_i c_i·ℓ_i, '
        "which rounds each example's clipped gradient in the least precise of them, so its "
        f"norm can exceed max_grad_norm by about {'1e-07' if hidden else f'{least:.0e}'} "
        'relative. memory="fast" (or "auto", which takes it here) scales each example\'s '
        "gradient by c_i in float32 or better",
        stacklevel=_user_stacklevel(),
    )


def _user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from its caller, of the first frame outside dpclip
    and torch: the user's line (``loss.backward()``, or the clipper called directly)."""
    inside = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _met_bytes(broadcast: list[BroadcastCall], batch: int) -> int:
    """The bytes of the gradients where batch-less lookups met the batch, which the
    backward gives at its end (T5's relative attention bias: [B, heads, T, T] a layer)."""
    return sum(
        (1 if m.aligned else batch) * math.prod(m.shape) * c.dtype.itemsize
        for c in broadcast for m in c.meetings
    )


def _adder(out: dict[nn.Parameter, torch.Tensor], p: nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook on ``p`` that adds its gradient into ``out`` and leaves autograd an
    expanded zero (no memory) in its place."""

    def hook(g: torch.Tensor) -> torch.Tensor:
        accumulator(out, p).add_(g)
        return _no_storage(g)

    return hook


def _no_storage(g: torch.Tensor) -> torch.Tensor:
    """A zero of ``g``'s shape without memory: what a gradient hook hands autograd back
    for a gradient it took."""
    return g.new_zeros(()).expand(g.shape)


def _input_needs_grad(call: LayerCall | GraphCall, recorded: set[Any]) -> bool:
    """Whether the backward from the call's output goes on below it, to another recorded
    call or to something other than parameters. Unsure (a deep graph of parameters
    alone) counts as yes."""
    return isinstance(call, LayerCall) and _reaches_below(call.edge.node, recorded, 3)


def _reaches_below(node: Any, recorded: set[Any], depth: int) -> bool:
    for nxt, _ in getattr(node, "next_functions", ()):
        if nxt is None or type(nxt).__name__ == "AccumulateGrad":
            continue
        if depth == 0 or nxt in recorded or not nxt.next_functions:
            return True
        if _reaches_below(nxt, recorded, depth - 1):
            return True
    return False


def _smallest_normal(eps: float) -> float:
    """The smallest normal number of the floating-point type whose rounding unit is ``eps``."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        if torch.finfo(dtype).eps == eps:
            return torch.finfo(dtype).tiny
    return 0.0


def _contribution_scales(layer_calls: list[LayerCall], graph_calls: list[GraphCall]) -> Scales:
    """``Scales`` for the audit: A, element by element, the sum of the absolute
    contributions (per example and position) to the parameter's gradient, the scale of
    the rounding of their sum (kept as two numbers); eps, the rounding unit of the least
    precise tensor they were computed from.

    A rule call gives A itself (``Rule.abs_sum``); for a graph call, the vector-Jacobian
    product of |output gradient| gives it for parameters that enter linearly (a bias, a
    broadcast parameter). The audit adds Σ_i |g_i| where per-example gradients are
    materialised, which bounds |gradient| for any rule."""
    scales: Scales = {}
    for call in layer_calls:
        _add_call_scales(call, scales)
    for call in graph_calls:
        used = [(e, b) for e, b in zip(call.edges, call.backprops) if b is not None]
        grads = torch.autograd.grad(
            [t for t, _ in used], call.params, grad_outputs=[b.abs() for _, b in used],
            retain_graph=True, allow_unused=True,
        )
        unit = max(torch.finfo(b.dtype).eps for _, b in used)
        for p, g in zip(call.params, grads):
            if g is not None:
                _add_scale(scales, p, g.abs(), unit)
    return scales


def _add_call_scales(call: LayerCall, scales: Scales) -> None:
    """Add a rule call's A (``Rule.abs_sum``, and Σ_i |g_i| of per-example gradients it
    holds) into ``scales``."""
    tensors = [call.backprop, *(a for a in call.activations if _floating(a))]
    unit = max(torch.finfo(t.dtype).eps for t in tensors)
    parts = {
        r: torch.zeros_like(p if rows is None else p[rows], dtype=norm_dtype(p.dtype))
        for r, (p, rows) in call.targets.items()
    }
    call.rule.abs_sum(call, parts)
    for role, a in parts.items():
        _add_scale(scales, call.targets[role][0], a, unit)
    for role, g in (call.per_sample or {}).items():
        _add_abs_sum(scales, call.targets[role][0], g)


def _add_scale(scales: Scales, p: nn.Parameter, part: torch.Tensor, unit: float) -> None:
    """Add a part of p's A (non-negative elements) to p's scale, its eps raised to ``unit``
    (in float64: a float32 norm overflows long before any element does)."""
    sq = torch.linalg.vector_norm(part, dtype=torch.float64).square()
    top = part.max().double() if part.numel() else sq
    if p in scales:
        total, bound, eps = scales[p]
        sq, top, unit = total + sq, bound + top, max(eps, unit)
    scales[p] = (sq, top, unit)


def _add_abs_sum(scales: Scales, p: nn.Parameter, per_sample: torch.Tensor) -> None:
    """Add Σ_i |per_sample_i| (p's, or a block of its rows) as a part of p's scale."""
    total = per_sample.abs().sum(dim=0, dtype=norm_dtype(per_sample.dtype))
    _add_scale(scales, p, total, scales[p][2] if p in scales else torch.finfo(per_sample.dtype).eps)


def _floating(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _own_sq_norms(
    call: LayerCall, meter: CostMeter | None, out: list[torch.Tensor], ghost: list[GhostPart]
) -> None:
    """Append the call's ‖∇ ℓ_i‖² ([B] each: its ghost norm, also to ``ghost``, or one per
    target from its per-sample gradients, which stay on the call for the clipped sum
    while its activations are released)."""
    uses_ghost = call.uses_ghost()
    if meter is not None:
        meter.note_keeps(call, KEEPS[uses_ghost])
    with timed(meter, call, "ghost" if uses_ghost else "per-sample"):
        if uses_ghost:
            norm = call.rule.ghost_sq_norms(call)
            out.append(norm.sq)
            if norm.scale is not None:
                ghost.append(GhostPart(norm, call))
            return
        call.per_sample = call.rule.per_sample_grads(call)
        out.extend(row_sq_norms(g) for g in call.per_sample.values())
    call.release()


def _exact_where_rounded(
    sq: torch.Tensor, parts: list[torch.Tensor], ghost: list[GhostPart]
) -> tuple[torch.Tensor, int]:
    """(‖g_i‖², the number of non-finite ones), with a second look at the examples whose
    kept ghost norms' rounding bounds add up to more than ``GHOST_ROUNDING_TOLERANCE`` of it.

    A ghost norm sums T² products of inner products; where an example's position
    contributions cancel (large activations whose terms nearly sum to zero), float32
    rounding of those products can exceed the norm itself, and an underestimated norm
    would let c_i·g_i exceed C. Those examples' ghost norms are computed again in
    float64 from the tensors their calls still hold (a call that releases them,
    ``memory="low"``, took its own look: ``exact_where_rounded``). One host
    synchronisation, with the non-finite count; a second where the look is taken."""
    if not ghost:
        return sq, int((~torch.isfinite(sq)).sum())
    scales = [p.norm.scale for p in ghost]
    if any(s.dtype != sq.dtype for s in scales):
        scales = [s.to(sq.dtype) for s in scales]
    units = torch.tensor([p.norm.unit for p in ghost], dtype=sq.dtype).to(sq.device, non_blocking=True)
    # Σ_l unit_l·scale_l − tolerance·sq in one call, +inf where sq is not finite
    excess = torch.addmv(sq, torch.stack(scales).t(), units, beta=-GHOST_ROUNDING_TOLERANCE)
    excess = torch.where(torch.isfinite(sq), excess, math.inf)
    worst = float(excess.max())
    if worst == math.inf:  # (or a bound that overflowed: that example gets its second look)
        bad = int((~torch.isfinite(sq)).sum())
        if bad:
            return sq, bad
    if not worst > 0:
        return sq, 0
    rows = (excess > 0).nonzero().squeeze(1)
    second = {id(p.norm.sq): p.call.rule.ghost_sq_norms(p.call, rows).sq for p in ghost}
    again = torch.stack([second.get(id(q), q[rows]).double() for q in parts]).sum(dim=0)
    sq = sq.index_copy(0, rows, again.to(sq.dtype))
    return sq, int((~torch.isfinite(sq)).sum())


def _total(parts: list[torch.Tensor], batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Σ of the [B] parts in ``dtype`` (one stacked sum, not one addition per layer)."""
    if not parts:
        return torch.zeros(batch, dtype=dtype, device=device)
    if any(p.dtype != dtype for p in parts):
        parts = [p.to(dtype) for p in parts]
    return torch.stack(parts).sum(dim=0)


