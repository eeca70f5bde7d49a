"""Per-example independence: change one example and check that the others did not move.

Per-example clipping bounds one example's influence on the clipped sum S only if
example i's loss depends on example i's inputs alone (DESIGN §4.8). Batch
normalisation modules are refused by type (``dpclip.clipping.validate_module``);
what no type check sees is found here, by a probe:

- batch statistics in a ``forward`` (``F.batch_norm(h, None, None, training=True)``,
  ``h - h.mean(0)``);
- a transpose to sequence-first followed by a layer that takes the batch for the
  sequence (an attention layer built with ``batch_first=True`` fed [T, B, E]),
  which every shape check passes when T == B;
- a loss over the batch (contrastive losses with in-batch negatives, prototypes or
  statistics of the batch).

The probe runs the same computation once more on a copy of the inputs in which only
example 0 is changed: row 0 of every input tensor whose leading dimension is the
batch is replaced by another example's row (so token ids, masks and lengths stay
valid values), with the random state of the real run (the same dropout masks),
under ``torch.no_grad()``; then examples 1..B-1 of every batch-first
floating-point output must be unchanged up to rounding (``moved_examples``). Where
the model's inputs have floating-point tensors with B leading rows that are neither
integers (category codes, counts, masks) nor all within [0, 1] (probabilities), it
runs once more with their row 0 made twice the row that holds their largest
magnitude: a batch maximum (``x / x.abs().max()``) that another example holds does
not move when row 0 is merely replaced. (A run of this second probe that raises is
skipped: a model may refuse inputs out of their usual range. It runs on the CPU only:
on CUDA an index computed from a doubled feature, a bucket or a grid cell, out of its
table is a device-side assert, not an exception. It cannot move a maximum over integer
or [0, 1] inputs, such as images scaled by the batch's brightest pixel, nor a minimum.)

Cost: two extra forwards of one micro-batch under ``torch.no_grad()`` (one for
models whose inputs are token ids), once per run (on the first micro-batch of at
least 2 examples), and one extra call of the criterion. Where the re-run differs
from the real forward it is checked against a re-run of the unchanged inputs
(eval-mode fast paths differ from the recorded forward), and a model's refusal is
confirmed by changing example 0 of the first input tensor alone (another tensor with
B leading rows, such as a [T, T] mask when T == B, need not belong to the examples):
a refused micro-batch costs up to three extra forwards more. A model that mixes
examples only through inputs after its first tensor argument is refused when the DP
loader's dataset gives that input's values for the micro-batch (it is then the examples'
own: ``micro_batch_rows``), and otherwise warned of (such an input may also be a table
whose length equals B).
A criterion's first two arguments with B leading rows are the examples' (its
predictions and targets): a loss that mixes examples through the targets alone (a
target of shape [B] against predictions [B, 1], which broadcast to [B, B]) is refused.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import KeyPath, keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

__all__ = [
    "ExamplesMixedError",
    "ForwardProbe",
    "Movement",
    "Outcome",
    "RandomState",
    "check_independent",
    "moved_examples",
]

#: Rounding allowed per output tensor, in units of its dtype's eps times its largest
#: magnitude: the probe compares the same computation on the same rows, so only
#: kernels that sum in a different order (another path under no_grad) differ, by a few
#: units in the last place; one example leaking into another moves it by far more.
TOLERANCE_EPS = 8.0

#: Run the model (or criterion) on (args, kwargs) and return its outputs.
Runner = Callable[[tuple, dict], Any]


class ExamplesMixedError(RuntimeError):
    """Changing one example changed another's outputs: per-example clipping bounds nothing."""


class Outcome(enum.Enum):
    """What probing one call found (mixing raises instead)."""

    UNPROBED = "unprobed"  # nothing to probe in this call (B < 2, ...): probe a later one
    INDEPENDENT = "independent"  # no other example moved
    UNCHECKED = "unchecked"  # the re-run raised (warned): don't try again


@dataclass(frozen=True)
class RandomState:
    """torch's global random state: the CPU generator's, and every CUDA device's once
    CUDA is initialised (what dropout draws from)."""

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]

    @staticmethod
    def capture() -> RandomState:
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return RandomState(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)


@dataclass(frozen=True)
class Movement:
    """The largest change of an example other than 0 in one output."""

    output: str  # where in the outputs, e.g. "[0]" or "['logits']" ("" for a bare tensor)
    example: int
    amount: float  # max |changed - reference| over the example's entries (inf for NaN)
    tolerance: float


@dataclass(frozen=True)
class _Changed:
    """Inputs with example 0 changed: its rows of ``names`` replaced by example ``donor``'s."""

    args: tuple
    kwargs: dict
    names: tuple[str, ...]
    donor: int | None  #: the example whose rows example 0 got (None: made extreme)


def _input_name(path: KeyPath) -> str:
    """"argument 0", "input_ids", "features['age']": where a tensor is in (args, kwargs)."""
    first, rest = path[1], keystr(path[2:])
    return f"argument {first.idx}{rest}" if path[0].idx == 0 else f"{first.key}{rest}"


def leading_batch(args: tuple, kwargs: dict) -> int | None:
    """B: the leading dimension of the first input tensor with at least one dimension."""
    leaves, _ = tree_flatten_with_path((args, kwargs))
    for _, t in leaves:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0]
    return None


def _change_example_zero(
    args: tuple, kwargs: dict, batch: int, leading: int | None, extreme: bool | str = False,
    also: frozenset[int] = frozenset(),
) -> _Changed | None:
    """A copy of the inputs with example 0 replaced by the first example that differs from
    it in the changed tensors (the tensors with ``batch`` leading rows, or the first
    ``leading`` of them); None when none differs. ``extreme``: the changed tensors' row 0
    becomes twice the row holding the tensor's largest magnitude instead, so that example 0
    holds the batch's extremes (a batch maximum that another example holds does not move
    when row 0 is merely replaced), in the floating-point tensors that can take it
    (``_doubled_row``) and only where the first ``leading`` are all such; None otherwise.
    ``extreme="topped"``: row 0 takes, at the positions ``_doubled_row`` leaves alone, a
    value above the batch's largest that stays in the feature's range (``_topped_row``).
    ``also``: positions among the flattened inputs changed besides the first ``leading``
    (inputs known to be the examples' data)."""
    leaves, spec = tree_flatten_with_path((args, kwargs))
    rows = [
        i for i, (_, t) in enumerate(leaves)
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch
    ]
    rows = rows if leading is None else rows[:leading] + [i for i in rows[leading:] if i in also]
    values = [t for _, t in leaves]
    if extreme:
        make = _topped_row if extreme == "topped" else _doubled_row
        doubled = {i: row for i in rows if (row := make(leaves[i][1], batch)) is not None}
        if not doubled or (leading is not None and len(doubled) < len(rows)):
            return None
        rows = list(doubled)
        for i, row in doubled.items():
            values[i] = values[i].detach().clone()
            values[i][0] = row
        donor = None
    else:
        tensors = [leaves[i][1] for i in rows]
        donor = next(
            (j for j in range(1, batch) if any(not torch.equal(t[j], t[0]) for t in tensors)), None
        )
        if donor is None:
            return None
        with torch.no_grad():
            for i in rows:
                values[i] = values[i].detach().clone()
                values[i][0] = values[i][donor]
    changed_args, changed_kwargs = tree_unflatten(values, spec)
    names = tuple(_input_name(leaves[i][0]) for i in rows)
    return _Changed(tuple(changed_args), dict(changed_kwargs), names, donor)


def _data_positions(args: tuple, kwargs: dict, batch: int, data: list[torch.Tensor]) -> frozenset[int]:
    """Positions among the flattened inputs with ``batch`` leading rows whose values are
    one of the ``data`` tensors (the micro-batch as the dataset gives it): the examples'
    own inputs, not a table that has B rows by chance."""
    leaves, _ = tree_flatten_with_path((args, kwargs))
    found = set()
    for i, (_, t) in enumerate(leaves):
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
            if any(_same_values(t, d) for d in data):
                found.add(i)
    return frozenset(found)


def _same_values(t: torch.Tensor, d: torch.Tensor) -> bool:
    if t.shape != d.shape or t.is_complex() or d.is_complex():
        return False
    a, b = t.detach().to("cpu", torch.float64), d.detach().to("cpu", torch.float64)
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))


def _doubled_row(t: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Row 0 of a floating-point input for the second probe: its entries twice those of the
    row holding the largest magnitude, at the positions (features) that can take it; None
    where none can. A position whose values over the batch are all integers (a category
    code that indexes a table, a count, a mask) or all within [0, 1] (a probability) keeps
    example 0's value: doubled it may be out of range, and on CUDA an out-of-range index or
    probability is a device-side assert, not an exception."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    with torch.no_grad():
        flat = t.detach().reshape(batch, -1)
        finite = torch.isfinite(flat)
        fixed = ((flat == flat.round()) | ~finite).all(dim=0)
        fixed |= (((flat >= 0) & (flat <= 1)) | ~finite).all(dim=0)
        free = ~fixed
        if not bool(free.any()):
            return None
        peaks = torch.where(free & finite, flat.abs(), 0).amax(dim=1)
        row = flat[0].clone()
        row[free] = 2 * flat[int(peaks.argmax()), free]
        return row.reshape(t.shape[1:])


def _topped_row(t: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Row 0 of a floating-point input for the third probe: at the positions whose values
    over the batch are all integers (counts), one more than the batch's largest; at those
    within [0, 1] otherwise (min-max scaled features), 1 where the batch's largest is below
    it; elsewhere example 0's value. None where nothing changes. So that a batch maximum
    over such features (x / x.max(0)) moves: doubling skips them. A code that indexes a
    table may be out of range then: that run raises, and its probe is skipped."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    with torch.no_grad():
        flat = t.detach().reshape(batch, -1)
        finite = torch.isfinite(flat)
        if not bool(finite.all()):
            return None
        peak = flat.amax(dim=0)
        counts = (flat == flat.round()).all(dim=0)
        unit = ~counts & ((flat >= 0) & (flat <= 1)).all(dim=0) & (peak < 1)
        if not bool((counts | unit).any()):
            return None
        row = flat[0].clone()
        row[counts] = peak[counts] + 1
        row[unit] = 1.0
        return row.reshape(t.shape[1:])


def _batch_first_floats(outputs: Any, batch: int) -> dict[str, torch.Tensor]:
    leaves, _ = tree_flatten_with_path(outputs)
    return {
        keystr(path): t.detach()
        for path, t in leaves
        if isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.dim() > 0
        and t.shape[0] == batch
    }


def moved_examples(reference: Any, probed: Any, batch: int) -> Movement | None:
    """The largest change of examples 1..B-1 beyond rounding in any floating-point output
    tensor with B leading rows (matched by position in the outputs), or None.

    Tolerance per tensor: ``TOLERANCE_EPS`` · eps(dtype) · max |reference| (finite entries).
    NaN or inf where the reference has the same value is no change.
    """
    ref = _batch_first_floats(reference, batch)
    new = _batch_first_floats(probed, batch)
    worst: Movement | None = None
    for name, a in ref.items():
        b = new.get(name)
        if b is None or b.shape != a.shape or batch < 2:
            continue
        scale = float(torch.where(torch.isfinite(a), a.abs(), 0).max())
        tolerance = TOLERANCE_EPS * torch.finfo(a.dtype).eps * scale
        a, b = a[1:], b[1:]
        if a.element_size() < 4:  # half precision: differences in float32
            a, b = a.float(), b.float()
        diff = (b - a).abs_()
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        moved = (~(diff <= tolerance) & ~same).reshape(a.shape[0], -1)
        if not moved.any():
            continue
        diff = diff.nan_to_num_(nan=math.inf, posinf=math.inf).reshape(a.shape[0], -1)
        amounts = torch.where(moved, diff, 0).amax(1)
        example = int(amounts.argmax())
        amount = float(amounts[example])
        if worst is None or amount > worst.amount:
            worst = Movement(name, example + 1, amount, tolerance)
    return worst


@contextmanager
def _scratch_buffers(module: nn.Module | None) -> Iterator[None]:
    """The module's buffers replaced by copies while the probe runs, so that a forward
    that updates them (running statistics) leaves the real ones and their versions as
    they were."""
    if module is None:
        yield
        return
    saved: list[tuple[nn.Module, str, torch.Tensor]] = []
    copies: dict[int, torch.Tensor] = {}  # a buffer registered twice stays shared
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None:
                saved.append((sub, name, buf))
                sub._buffers[name] = copies.setdefault(id(buf), buf.detach().clone())
    try:
        yield
    finally:
        for sub, name, buf in saved:
            sub._buffers[name] = buf


def check_independent(
    run: Runner,
    args: tuple,
    kwargs: dict,
    reference: Any,
    batch: int,
    random_state: RandomState,
    *,
    subject: str,
    module: nn.Module | None = None,
    targets: bool = False,
    hint: str = "",
    data: Callable[[], list[torch.Tensor]] | None = None,
) -> Outcome:
    """Probe one call that gave ``reference`` for examples that depend on example 0.

    Example 0 is changed up to three times: replaced by another example, then (a model's
    call on the CPU, where its inputs have floating-point tensors that can take it:
    ``_doubled_row``) made twice the row that holds each one's largest magnitude, so that a
    batch statistic that another example decides (a maximum) moves too, and then topped at
    the integer-valued and [0, 1] features that doubling leaves alone (``_topped_row``). The second probe is skipped if its
    run raises: inputs out of their usual range may be refused. A movement that changing
    the first inputs alone does not confirm is warned of, not refused.

    Args:
        run: the call again (``run(args, kwargs)``), with nothing recorded.
        args, kwargs: the inputs of the real call.
        reference: its outputs.
        batch: B, the examples in the call (the leading dimension of its batch-first tensors).
        random_state: torch's random state just before the real call; restored before each
            re-run, and the state the real call left is restored afterwards.
        subject: what is probed, for messages ("the model (Net)").
        module: buffers to keep out of the re-runs' reach.
        targets: a criterion's call, whose first two arguments with B leading rows (the
            predictions and the targets) are the examples': a refusal is confirmed by
            changing those alone (a model's: its first alone; other batch-sized arguments,
            such as a [T, T] mask when T == B or class weights when C == B, need not be the
            examples'), and the second probe is not run.
        hint: the likely cause, said in a refusal before the advice to turn the check off.
        data: the micro-batch's tensors as the DP data loader's dataset gives them (empty
            when unknown): a later input with their values is the examples' own, so a
            movement it causes is refused, not warned of (a two-tower model's item features
            scored against the batch's: in-batch negatives).

    Returns:
        ``INDEPENDENT``; ``UNPROBED`` when this call has nothing to probe (B < 2, no
        floating-point output with B leading rows, example 0 equal to all others);
        ``UNCHECKED`` when a re-run raised (with a warning). ``INDEPENDENT`` also when a
        movement was not confirmed (with a warning).

    Raises:
        ExamplesMixedError: changing example 0 moved another example's outputs.
    """
    if batch < 2 or not _batch_first_floats(reference, batch):
        return Outcome.UNPROBED
    # a refusal is confirmed by changing the predictions and targets alone (a criterion's
    # other batch-sized arguments, class weights when C == B, need not be the examples'), or
    # a model's first input alone (a [T, T] mask when T == B need not be)
    leading = 2 if targets else 1
    after = RandomState.capture()
    clean: list[Any] = []
    #: a movement that changing the first inputs alone did not confirm: said in a warning
    unconfirmed: list[tuple[_Changed, Movement]] = []
    #: the positions of the later inputs that are the micro-batch's data (``data``), once asked
    known: list[frozenset[int]] = []

    def replay(a: tuple, k: dict) -> Any:
        random_state.restore()
        return run(a, k)

    def moved_by(changed: _Changed, extreme: bool | str) -> tuple[_Changed, Movement | None]:
        probed = replay(changed.args, changed.kwargs)
        moved = moved_examples(reference, probed, batch)
        if moved is None:
            return changed, None
        if not clean:
            clean.append(replay(args, kwargs))
        moved = moved_examples(clean[0], probed, batch)
        if moved is not None:
            confirm = _change_example_zero(args, kwargs, batch, leading, extreme)
            confirmed = None
            if confirm is not None:
                confirmed = moved_examples(clean[0], replay(confirm.args, confirm.kwargs), batch)
            if confirmed is None and data is not None:
                if not known:
                    known.append(_data_positions(args, kwargs, batch, data()))
                if known[0]:
                    confirm = _change_example_zero(args, kwargs, batch, leading, extreme, also=known[0])
                    if confirm is not None:
                        confirmed = moved_examples(clean[0], replay(confirm.args, confirm.kwargs), batch)
            if confirmed is None:
                unconfirmed.append((changed, moved))
                return changed, None
            changed, moved = confirm, confirmed
        return changed, moved

    try:
        try:
            changed = _change_example_zero(args, kwargs, batch, None)
            if changed is None:
                return Outcome.UNPROBED
            with torch.no_grad(), _scratch_buffers(module):
                changed, moved = moved_by(changed, extreme=False)
        except Exception as err:  # the probe's inputs are real rows, but a forward may refuse them
            warnings.warn(
                f"dpclip's independence probe of {subject} could not run ({type(err).__name__}: "
                f"{err}), so whether examples are independent is not checked: per-example "
                "clipping bounds each example's influence only if each example's outputs depend "
                "on its own inputs alone",
                stacklevel=2,
            )
            return Outcome.UNCHECKED
        # (on the CPU only: elsewhere an input out of its range, a bucket or grid index
        # computed from a doubled feature, is a device-side assert, not an exception)
        if moved is None and not targets and not unconfirmed and _on_cpu(args, kwargs):
            for kind in (True, "topped"):
                try:
                    extreme = _change_example_zero(args, kwargs, batch, None, extreme=kind)
                    if extreme is not None:
                        with torch.no_grad(), _scratch_buffers(module):
                            changed, moved = moved_by(extreme, extreme=kind)
                except Exception:  # noqa: BLE001 - inputs out of their range refused: the first probe stands
                    moved = None
                if moved is not None or unconfirmed:
                    break
    finally:
        after.restore()
    if moved is not None:
        raise ExamplesMixedError(_mixing_message(subject, changed, moved, hint))
    if unconfirmed:
        changed, moved = unconfirmed[0]
        warnings.warn(
            f"dpclip's independence probe of {subject}: changing example 0 in "
            f"{', '.join(changed.names)} moved example {moved.example}'s outputs by "
            f"{moved.amount:.3g} (rounding allows {moved.tolerance:.2g}), but changing it in the "
            f"first {'two inputs' if targets else 'input'} alone did not. If a later input holds "
            "one row per example, the computation mixes examples and the privacy guarantee does "
            "not hold (batch statistics over that input); if it is not per-example (a table whose "
            "length equals the batch size by chance), this is expected. Training goes on. (An "
            "input whose values are the DP data loader's micro-batch is the examples' own: a "
            "movement it causes is refused)",
            stacklevel=2,
        )
    return Outcome.INDEPENDENT


def _on_cpu(args: tuple, kwargs: dict) -> bool:
    leaves, _ = tree_flatten((args, kwargs))
    return all(t.device.type == "cpu" for t in leaves if isinstance(t, torch.Tensor))


def _mixing_message(subject: str, changed: _Changed, moved: Movement, hint: str = "") -> str:
    if subject.startswith("the criterion"):
        output = "loss"
    else:
        output = f"output {moved.output}" if moved.output else "output"
    how = (
        f"replaced by example {changed.donor}'s" if changed.donor is not None
        else "made twice the row with the largest magnitude"
    )
    return (
        f"{subject} mixes examples: changing only example 0 of the micro-batch (its rows of "
        f"{', '.join(changed.names)} {how}) changed example "
        f"{moved.example}'s {output} by {moved.amount:.3g} (rounding allows "
        f"{moved.tolerance:.2g}). "
        "Per-example clipping bounds nothing then: each example's data reaches the other "
        "examples' gradients, and the privacy guarantee does not hold. Typical causes: batch "
        "statistics (F.batch_norm with training=True, x - x.mean(0), x / x.abs().max()); a transpose to "
        "sequence-first followed by a layer that takes the batch for the sequence (e.g. an "
        "nn.MultiheadAttention built with batch_first=True given [T, B, E]); a loss over the "
        "batch (in-batch negatives, prototypes or statistics of the batch). Nothing was "
        "recorded or accumulated. Make each example's outputs depend on its own inputs only "
        f"(nn.GroupNorm or nn.LayerNorm instead of batch statistics). {hint + ' ' if hint else ''}"
        "Only if you know the "
        "computation is per-example, turn this check off with "
        "make_private(..., check_independence=False)."
    )


class ForwardProbe:
    """The model's probe as ``PerSampleClipper`` runs it, from its root module's hooks.

    Armed until a probed forward has been trained on (``trained_on``): forwards with
    gradients enabled before the first backward (an evaluation without ``torch.no_grad()``)
    are probed too, so that the first forward the clipped sum comes from is one probed
    (or one whose probe could not run, with a warning; then probing stops).

    Args:
        module: the model.
        run: a forward of the model with nothing recorded.
        enabled: False: nothing is probed.
    """

    def __init__(self, module: nn.Module, run: Runner, enabled: bool = True) -> None:
        self.module = module
        self.pending = enabled
        self._run = run
        self._random_state: RandomState | None = None
        self._probed = False  # the current forward was probed
        #: the current micro-batch's tensors as the DP loader's dataset gives them (set by
        #: make_private; None: not known)
        self.data_rows: Callable[[], list[torch.Tensor]] | None = None

    def before_forward(self) -> None:
        """From the root's forward pre-hook of a forward that records."""
        self._probed = False
        self._random_state = RandomState.capture() if self.pending else None

    def after_forward(self, args: tuple, kwargs: dict, output: Any) -> None:
        """From the root's forward hook; raises ``ExamplesMixedError`` on mixing."""
        state, self._random_state = self._random_state, None
        if not self.pending or state is None:
            return
        batch = leading_batch(args, kwargs)
        if batch is None:
            return
        subject = f"the model ({type(self.module).__name__})"
        outcome = check_independent(
            self._run, args, kwargs, output, batch, state, subject=subject, module=self.module,
            data=self.data_rows,
        )
        self._probed = outcome is Outcome.INDEPENDENT
        if outcome is Outcome.UNCHECKED:
            self.pending = False

    def trained_on(self) -> None:
        """The current forward's records reached a backward: once probed, probing stops."""
        if self._probed:
            self.pending = False
