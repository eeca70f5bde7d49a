"""The clipping plan: per layer, the rule and the strategy that give its per-example
gradient norms and its part of the clipped sum, and its share of the clipping's time.

Before the first backward a plan says what the layers' types decide (the rule, and for
``clipping="auto"`` that the strategy is "decided per call" from the shapes). The
clipper measures its first ``MEASURED_MICRO_BATCHES`` micro-batches: which rule and
strategy each layer's calls took and the wall time of each layer's per-example work
(norms and clipped sum); its plan then gives each layer's share of backward() summed
over the measured micro-batches but the first (the first alone until there is a second:
it also pays first-call costs and the first-micro-batch check's parameter gradients).
The rest is the one backward pass to the recorded outputs, the row "(backward pass)".
After the first micro-batch, a layer that took the exact graph path (per-example
gradients by a batched vector-Jacobian product through its recorded graph: about B
times its own backward) is named in a ``SlowClippingWarning``, once.

Shares are wall times of a few micro-batches, so they are estimates: use them to find
the layers that dominate, not to benchmark. Off the CPU, the measured micro-batches
synchronise the device around each layer's work.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from dpclip.clipping.recording import GraphCall, LayerCall, Unit
from dpclip.clipping.rules.base import Rule
from dpclip.clipping.rules.fallback import OpacusRule

__all__ = [
    "GRAPH_PATH",
    "ClippingPlan",
    "CostMeter",
    "LayerPlan",
    "MicroBatchCosts",
    "SlowClippingWarning",
    "build_plan",
    "rule_label",
    "timed",
    "warn_slow_layers",
]

#: The rule name of the exact fallback (``dpclip.clipping.graph``).
GRAPH_PATH = "exact graph path"
#: The rule name of ``nn.MultiheadAttention``'s projections (``dpclip.clipping.attention``).
ATTENTION = "attention projections (linear)"
#: Micro-batches measured (then no more timing): the first has first-call costs.
MEASURED_MICRO_BATCHES = 8
#: The strategy of a layer with ``clipping="auto"`` before its first call has shapes.
DECIDED_PER_CALL = "decided per call"


class SlowClippingWarning(UserWarning):
    """A layer takes the exact graph path: correct, but the slowest way to its norms."""


def rule_label(rule: Rule | None) -> str:
    """A rule's name in the plan: the family from its class (``LinearRule`` -> "linear",
    ``EmbeddingBagRule`` -> "embedding bag"), "Opacus fallback" for Opacus's per-sample
    rules, ``GRAPH_PATH`` for None."""
    if rule is None:
        return GRAPH_PATH
    if isinstance(rule, OpacusRule):
        return "Opacus fallback"
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+", type(rule).__name__.removesuffix("Rule"))
    return " ".join(w.lower() for w in words) or type(rule).__name__


def _has_ghost(rule: Rule) -> bool:
    return type(rule).has_ghost is not Rule.has_ghost


@dataclass(frozen=True)
class LayerPlan:
    """One layer (a module that owns trainable parameters) in the plan.

    Attributes:
        layer: its name in ``named_modules()`` ("<root>" for the model itself).
        type: its class name.
        parameters: its trainable parameters' names, relative to the layer.
        rule: how its gradients are computed: "linear", "conv", "embedding", "norm", …
            (a rule family), "attention projections (linear)", "Opacus fallback", or
            ``GRAPH_PATH``; several, joined by " + ", where its calls took different ones.
        strategy: "ghost" (norm without per-example gradients), "per-sample"
            (per-example gradients materialised), both joined by " + " where its calls
            differed, or "decided per call" (``clipping="auto"``, nothing measured yet).
        share: fraction (0..1) of dpclip's backward() time its per-example work took on
            the measured micro-batch; None before one was measured, or if not called.
        keeps: what it holds from its norm until the clipped sum (``dpclip.clipping.memory``):
            "per-example gradients", "input + output gradient" (a ghost norm), "nothing"
            (``memory="low"``: a second backward gives its part), "summed per-example
            gradients" (calls sharing a parameter); "-" before a micro-batch was measured.
    """

    layer: str
    type: str
    parameters: tuple[str, ...]
    rule: str
    strategy: str
    share: float | None = None
    keeps: str = "-"


@dataclass(frozen=True)
class ClippingPlan:
    """The per-layer clipping plan of a private model; ``str()`` is an aligned table.

    Attributes:
        layers: one entry per layer, in ``named_modules()`` order.
        micro_batches: the micro-batches (first, last; 1 = the first clipped) the
            strategies and shares are from, None before one was clipped.
        batch_size: the size of the last of them.
        backward_share: fraction of their backward() spent in the one backward pass to
            the recorded outputs (shared by all layers).
        memory: the memory mode micro-batches run (``dpclip.clipping.memory``): "fast",
            "low", "auto: fast" / "auto: low" (what ``memory="auto"`` chose on the first
            micro-batch), or "auto" before it chose.
    """

    layers: tuple[LayerPlan, ...]
    micro_batches: tuple[int, int] | None = None
    batch_size: int | None = None
    backward_share: float | None = None
    memory: str = "auto"

    @property
    def measured(self) -> bool:
        """A micro-batch was measured: strategies are those taken, shares are known."""
        return self.micro_batches is not None

    def slow_layers(self) -> tuple[LayerPlan, ...]:
        """The layers that take the exact graph path."""
        return tuple(lp for lp in self.layers if GRAPH_PATH in lp.rule)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): ``micro_batches`` (a list, or None), ``batch_size``,
        ``backward_share`` and ``layers`` (a list of ``LayerPlan`` fields, ``parameters`` as
        a list)."""
        layers = [{**asdict(lp), "parameters": list(lp.parameters)} for lp in self.layers]
        return {
            "micro_batches": None if self.micro_batches is None else list(self.micro_batches),
            "batch_size": self.batch_size,
            "backward_share": self.backward_share,
            "memory": self.memory,
            "layers": layers,
        }

    def __str__(self) -> str:
        def pct(share: float | None) -> str:
            return "-" if share is None else f"{100 * share:.1f}%"

        header = ("layer", "type", "parameters", "rule", "strategy", "keeps", "share")
        rows = [
            (lp.layer, lp.type, ", ".join(lp.parameters), lp.rule, lp.strategy, lp.keeps, pct(lp.share))
            for lp in self.layers
        ]
        if self.micro_batches is not None:
            rows.append(("(backward pass)", "", "", "", "", "", pct(self.backward_share)))
            first, last = self.micro_batches
            which = f"micro-batch {first}" if first == last else f"micro-batches {first}-{last}"
            title = (f"clipping plan (memory {self.memory}; share: of dpclip's backward() on {which}, "
                     f"B={self.batch_size})")
        else:
            title = (f"clipping plan (memory {self.memory}; no micro-batch yet: auto strategies decided "
                     "per call, shares unknown)")
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

        def line(r: Sequence[str]) -> str:
            cells = [c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1].rjust(widths[-1])]
            return "  ".join(cells).rstrip()

        return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


@dataclass
class MicroBatchCosts:
    """One measured micro-batch, per layer name: wall time of its per-example work, the
    rules and strategies its calls took; and the time of the shared backward pass."""

    batch_size: int = 0
    backward_seconds: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    rules: dict[str, set[str]] = field(default_factory=dict)
    strategies: dict[str, set[str]] = field(default_factory=dict)
    keeps: dict[str, set[str]] = field(default_factory=dict)

    def add(self, other: MicroBatchCosts) -> None:
        """Add ``other``'s times and rules and strategies into these (its batch size last)."""
        self.batch_size = other.batch_size
        self.backward_seconds += other.backward_seconds
        for name, t in other.seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + t
        for mine, theirs in ((self.rules, other.rules), (self.strategies, other.strategies),
                             (self.keeps, other.keeps)):
            for name, labels in theirs.items():
                mine.setdefault(name, set()).update(labels)


class CostMeter:
    """Measures the clipper's first ``MEASURED_MICRO_BATCHES`` micro-batches per layer;
    ``totals`` sums those accumulated but the first (the first alone while there is no
    second). Thin state for ``build_plan``; the clipper times each call with ``timed``
    while ``measuring``.

    Args:
        owner: each covered parameter's layer name (the unit that owns it).
    """

    def __init__(self, owner: Mapping[nn.Parameter, str]) -> None:
        self.owner = owner
        #: micro-batches measured and accumulated so far
        self.measured = 0
        #: their costs (None: none yet)
        self.totals: MicroBatchCosts | None = None
        self._current = MicroBatchCosts()
        self._device: torch.device | None = None
        self._inner = 0.0  # seconds of layer work measured so far

    @property
    def measuring(self) -> bool:
        """The next micro-batch is to be measured."""
        return self.measured < MEASURED_MICRO_BATCHES

    def begin(self, device: torch.device) -> None:
        """Start measuring a micro-batch; it counts once it is accumulated (``finish``), not
        if it is refused."""
        self._current = MicroBatchCosts()
        self._device = device

    def finish(self, batch_size: int) -> None:
        """The measured micro-batch was accumulated: it counts in ``totals``."""
        self._current.batch_size = batch_size
        self.measured += 1
        if self.totals is None or self.measured == 2:  # the first, or the first to replace it
            self.totals = self._current
        else:
            self.totals.add(self._current)
        self._current = MicroBatchCosts()

    @property
    def counted(self) -> tuple[int, int] | None:
        """The micro-batches ``totals`` sums (first, last), None before one was measured."""
        if self.measured == 0:
            return None
        return (1 if self.measured == 1 else 2, self.measured)

    def layer_of(self, work: LayerCall | GraphCall | nn.Parameter) -> str:
        """The layer that owns the call's (first) parameter, or the parameter's."""
        if isinstance(work, LayerCall):
            work = next(iter(work.targets.values()))[0]
        elif isinstance(work, GraphCall):
            work = work.params[0]
        return self.owner.get(work, "?")

    def sync(self) -> None:
        """Wait for queued device work, so that wall time is the work's (not on CPU)."""
        if self._device is not None and self._device.type != "cpu":
            torch.accelerator.synchronize(self._device)

    def note_keeps(self, work: LayerCall | GraphCall | nn.Parameter, what: str) -> None:
        """Record what the call's layer holds until the clipped sum (``LayerPlan.keeps``)."""
        self._current.keeps.setdefault(self.layer_of(work), set()).add(what)

    @contextmanager
    def measure(
        self, work: LayerCall | GraphCall | nn.Parameter | None, strategy: str | None
    ) -> Iterator[None]:
        """Time the block as the work of ``work``'s layer (None: the backward pass); a call
        also records its rule and, if given, the strategy it took."""
        self.sync()
        start, inner = time.perf_counter(), self._inner
        yield
        self.sync()
        elapsed = time.perf_counter() - start
        costs = self._current
        if work is None:  # less the layers' work timed inside it (norms taken during the pass)
            costs.backward_seconds += elapsed - (self._inner - inner)
            return
        self._inner += elapsed
        name = self.layer_of(work)
        costs.seconds[name] = costs.seconds.get(name, 0.0) + elapsed
        if isinstance(work, (LayerCall, GraphCall)):
            rule = work.rule if isinstance(work, LayerCall) else None
            costs.rules.setdefault(name, set()).add(rule_label(rule))
        if strategy is not None:
            costs.strategies.setdefault(name, set()).add(strategy)


def timed(
    meter: CostMeter | None,
    work: LayerCall | GraphCall | nn.Parameter | None,
    strategy: str | None = None,
) -> AbstractContextManager[None]:
    """``meter.measure(work, strategy)``, or nothing when no micro-batch is being measured."""
    return nullcontext() if meter is None else meter.measure(work, strategy)


def build_plan(units: Sequence[Unit], meter: CostMeter, memory: str = "auto") -> ClippingPlan:
    """The plan of a clipper's units: what their types decide, and what the measured
    micro-batch took where ``meter`` has one; ``memory``: ``ClippingPlan.memory``."""
    last = meter.totals
    total = 0.0 if last is None else last.backward_seconds + sum(last.seconds.values())
    layers = []
    for u in units:
        names = tuple(_param_names(u))
        if last is not None and u.name in last.rules:
            rules = last.rules[u.name]
            if u.attention:  # its projections are linear calls
                rules = {ATTENTION if r == "linear" else r for r in rules}
            rule = " + ".join(sorted(rules))
            strategy = " + ".join(sorted(last.strategies.get(u.name, {"per-sample"})))
            share = last.seconds[u.name] / total if total > 0 else 0.0
            keeps = " + ".join(sorted(last.keeps.get(u.name, {"-"})))
        else:
            rule, strategy = _static(u)
            share, keeps = None, "-"
            tied = None if last is None else next(
                (v for v in units if v is not u and v.name in last.rules and set(u.params) <= set(v.params)), None
            )
            if tied is not None:  # (a tied weight's calls are measured under its other owner)
                rule, strategy = f"with {tied.name!r}", "-"
        layers.append(LayerPlan(u.name or "<root>", type(u.module).__name__, names, rule, strategy, share, keeps))
    if last is None:
        return ClippingPlan(tuple(layers), memory=memory)
    backward = last.backward_seconds / total if total > 0 else 0.0
    return ClippingPlan(tuple(layers), meter.counted, last.batch_size, backward, memory)


def _param_names(unit: Unit) -> list[str]:
    ids = {id(p) for p in unit.params}
    return [n for n, p in unit.module.named_parameters() if id(p) in ids]


def _static(unit: Unit) -> tuple[str, str]:
    """(rule, strategy) from the layer's type and ``clipping`` alone, before any call."""
    if unit.attention:
        rule, ghost = ATTENTION, True
    elif unit.rule is None:
        return GRAPH_PATH, "per-sample"
    else:
        rule = rule_label(unit.rule)
        ghost = _has_ghost(unit.rule)
    if not ghost or unit.strategy == "per_sample" or unit.shared:
        return rule, "per-sample"
    return rule, "ghost" if unit.strategy == "ghost" else DECIDED_PER_CALL


def warn_slow_layers(plan: ClippingPlan) -> None:
    """Warn (``SlowClippingWarning``) naming each layer on the exact graph path with its
    share, attributed to the first caller outside dpclip (the user's ``backward()``)."""
    slow = plan.slow_layers()
    if not slow:
        return
    named = ", ".join(
        f"{lp.layer!r} ({lp.type}, {'?' if lp.share is None else f'{100 * lp.share:.0f}%'})" for lp in slow
    )
    warnings.warn(
        f"{'layer' if len(slow) == 1 else 'layers'} {named} "
        f"{'takes' if len(slow) == 1 else 'take'} dpclip's exact graph path: per-example "
        "gradients by a batched vector-Jacobian product through the recorded graph, about B "
        "times the layer's own backward (the percentage is its share of dpclip's backward() "
        "on the first micro-batch). Exact, but slow: engine.clipping_plan() (or "
        "PerSampleClipper.plan()) shows every layer's rule; a rule for the layer type "
        "(dpclip.clipping.register) avoids it",
        SlowClippingWarning,
        stacklevel=_first_frame_outside_dpclip(),
    )


def _first_frame_outside_dpclip() -> int:
    """The ``stacklevel`` (counted from this function's caller) of the first frame whose
    code is not in the dpclip package."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level
