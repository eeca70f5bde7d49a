"""The privacy ledger: which events a run applied, how many times, in order.

Run-length compressed: recording the same event again only bumps a count, so
a million identical steps cost one entry.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any

from accounting.accountant import validate_delta, validate_steps
from accounting.events import (
    CountedShuffledGaussian,
    Event,
    IndependentPoissonGaussian,
    PoissonGaussian,
    ShuffledGaussian,
    validate_int,
)
from accounting.registry import make_accountant

__all__ = ["Ledger", "MAX_COUNT", "STATE_VERSION", "SamplingAssumptionWarning"]

STATE_VERSION = 1
#: Most steps a ledger holds, in one entry and in all. 2**53 is the largest count that
#: float64 (every accountant's arithmetic, and JSON readers outside Python) still holds
#: exactly; a run of 10⁶ steps a second would take 285 years to reach it.
MAX_COUNT = 2**53
_EVENT_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (PoissonGaussian, IndependentPoissonGaussian, ShuffledGaussian, CountedShuffledGaussian)
}
_SHUFFLED = (ShuffledGaussian, CountedShuffledGaussian)


class SamplingAssumptionWarning(UserWarning):
    """ε assumes an amplification by sampling that the recorded run did not have."""


def _epochs(steps: int, steps_per_epoch: int) -> int:
    """Epochs that ``steps`` shuffled steps touch, rounded up, counted from an epoch start."""
    return -(-steps // steps_per_epoch)


def _as_composable(event: Event, steps: int, no_amplification: bool) -> tuple[Event, int]:
    """The accountable (event, count) that ``steps`` applications of ``event`` amount to."""
    if not isinstance(event, _SHUFFLED):
        return event, steps
    if no_amplification and isinstance(event, CountedShuffledGaussian):
        # The worst example's uses, counted as they happened (see the event's docstring).
        return PoissonGaussian(1.0, event.noise_multiplier), steps * event.added_uses
    if no_amplification:
        # Each example is in at most one batch per epoch: one Gaussian mechanism
        # (q = 1) per epoch, as TF Privacy's "each example occurring once per epoch".
        return PoissonGaussian(1.0, event.noise_multiplier), _epochs(steps, event.steps_per_epoch)
    return PoissonGaussian(event.sample_rate, event.noise_multiplier), steps


class Ledger:
    """Ordered record of (event, count) pairs; ε on demand.

    Example:
        >>> ledger = Ledger()
        >>> ledger.record(PoissonGaussian(sample_rate=0.01, noise_multiplier=1.0), count=1000)
        >>> ledger.steps
        1000
        >>> round(ledger.epsilon(delta=1e-5, method="rdp"), 2)
        2.1
    """

    def __init__(self) -> None:
        self._entries: list[list[Any]] = []

    def record(self, event: Event, count: int = 1) -> None:
        """Append ``count`` applications of ``event`` (count: int >= 1)."""
        if type(event) not in _EVENT_TYPES.values():
            raise ValueError(f"Expected an accounting event, got {event!r}")
        _validate_count("count", count, self.steps)
        if self._entries and self._entries[-1][0] == event:
            self._entries[-1][1] += count
        else:
            self._entries.append([event, count])

    @property
    def entries(self) -> tuple[tuple[Event, int], ...]:
        """The (event, count) runs, oldest first."""
        return tuple((event, count) for event, count in self._entries)

    @property
    def steps(self) -> int:
        """Total number of recorded events (optimizer steps for dpclip)."""
        return sum(count for _, count in self._entries)

    def epsilon(self, delta: float, method: str = "prv", *, no_amplification: bool = False) -> float:
        """ε of everything recorded, at ``delta``, by accountant ``method``.

        Args:
            delta: target δ, 0 < δ < 1.
            method: "prv" (prv-accountant, upper bound), "rdp" (dp-accounting
                RDP), "pld" (dp-accounting PLD, pessimistic) or "gdp"
                (central-limit *approximation*, may under-report). Each
                accountant's ``error_bound`` states its error.
            no_amplification: for ``ShuffledGaussian`` steps, report the sound
                bound (one Gaussian mechanism per epoch) instead of the Poisson
                figure at the same q, which comes with a ``SamplingAssumptionWarning``.

        Returns:
            ε; 0.0 for an empty ledger, ``math.inf`` once a step had σ = 0.

        Raises:
            UnsupportedEventError: ``method`` cannot account a recorded event
                exactly; the message names the accountants that can.
        """
        if not self._entries:
            make_accountant(method)  # validates the name
            validate_delta(delta)
            return 0.0
        return self.epsilon_curve(
            delta, method, steps=[self.steps], no_amplification=no_amplification, _stacklevel=3
        )[0][1]

    def epsilon_curve(
        self,
        delta: float,
        method: str = "prv",
        *,
        points: int = 50,
        steps: Sequence[int] | None = None,
        no_amplification: bool = False,
        _stacklevel: int = 2,
    ) -> list[tuple[int, float]]:
        """ε after each of several step counts: the privacy spent along the run.

        Computed in one pass over the ledger, the accountant's state carried
        from point to point: RDP and GDP add up, PLD composes each increment
        into the running distribution, PRV discretises once and pays one FFT
        per point (50 points over 10⁴ steps: RDP 1 s, PLD 5 s, PRV 13 s on 2
        cores; ``benchmarks/accounting_bench.py``).

        Args:
            delta, method, no_amplification: as for ``epsilon``.
            points: how many evenly spaced step counts from 1 to ``self.steps``
                (the last one always included); ignored when ``steps`` is given.
            steps: the step counts to report, increasing, each in 1..``self.steps``.

        Returns:
            ``[(step, ε), ...]``; empty for an empty ledger.
        """
        accountant = make_accountant(method)
        total = self.steps
        if steps is None:
            validate_int("points", points)
            if total == 0:
                return []
            steps = sorted({round(1 + i * (total - 1) / max(1, points - 1)) for i in range(points)})
        checkpoints = validate_steps(steps, total)
        if not no_amplification and any(isinstance(e, _SHUFFLED) for e, _ in self._entries):
            warnings.warn(
                "the ledger has steps over shuffled fixed-size batches: their ε is the Poisson "
                "figure at the same sample rate, which assumes an amplification by sampling that "
                "shuffling does not give (not a guarantee); pass no_amplification=True for a "
                "sound bound",
                SamplingAssumptionWarning,
                stacklevel=_stacklevel,
            )
        for event, count in self._entries:
            composable, times = _as_composable(event, count, no_amplification)
            if times:  # steps in which no example reached the worst count cost nothing more
                accountant.compose(composable, times)
        # Where each checkpoint falls in the composed (possibly per-epoch) sequence.
        mapped, done, composed, i = [], 0, 0, 0
        for event, count in self._entries:
            while i < len(checkpoints) and checkpoints[i] <= done + count:
                mapped.append(composed + _as_composable(event, checkpoints[i] - done, no_amplification)[1])
                i += 1
            done += count
            composed += _as_composable(event, count, no_amplification)[1]
        unique = sorted(set(mapped) - {0})
        values = dict(zip(unique, accountant.get_epsilon_curve(delta, unique) if unique else []))
        values[0] = 0.0  # nothing composed yet: no example used
        return [(t, values[m]) for t, m in zip(checkpoints, mapped)]

    def merge(self, other: "Ledger") -> None:
        """Append ``other``'s entries after this ledger's (runs that happened in that order).

        For a run resumed in a fresh process: load the first part with
        ``load_state_dict`` (or keep its ledger) and merge the ledger of the
        part that followed; ε then covers the whole run.
        """
        if not isinstance(other, Ledger):
            raise ValueError(f"Expected a Ledger to merge, got {type(other)}")
        if other is self:
            raise ValueError("cannot merge a ledger into itself (that would double its steps)")
        for event, count in other.entries:
            self.record(event, count)

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot; ``load_state_dict`` restores it exactly."""
        return {
            "version": STATE_VERSION,
            "entries": [
                {"event": type(event).__name__, "params": asdict(event), "count": count}
                for event, count in self._entries
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the ledger's contents with ``state`` (from ``state_dict``).

        Everything is checked before anything changes: exactly the keys
        ``state_dict`` writes, a known event type whose parameters pass that
        event's own validation, counts that are ints (not bools) in
        1..``MAX_COUNT`` and add up to at most ``MAX_COUNT``.

        Raises:
            ValueError: naming the entry and the field that is wrong.
        """
        _check_keys("ledger state", state, {"version", "entries"})
        version = state["version"]
        if isinstance(version, bool) or version != STATE_VERSION:
            raise ValueError(f"Expected a ledger state with version {STATE_VERSION}, got version={version!r}")
        if not isinstance(state["entries"], list):
            raise ValueError(f"Expected ledger state entries to be a list, got {type(state['entries']).__name__}")
        entries: list[list[Any]] = []
        total = 0
        for i, item in enumerate(state["entries"]):
            where = f"ledger state entries[{i}]"
            _check_keys(where, item, {"event", "params", "count"})
            cls = _EVENT_TYPES.get(item["event"]) if isinstance(item["event"], str) else None
            if cls is None:
                raise ValueError(f"Unknown event type {item['event']!r} in {where}; known: {sorted(_EVENT_TYPES)}")
            _check_keys(f"{where} params", item["params"], {f.name for f in fields(cls)}, noun="parameters")
            try:
                event = cls(**item["params"])
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            _validate_count(f"{where} count", item["count"], total)
            total += item["count"]
            entries.append([event, item["count"]])
        self._entries = entries

    def __repr__(self) -> str:
        return f"Ledger(steps={self.steps}, entries={self.entries!r})"


def _check_keys(what: str, value: Any, expected: set[str], noun: str = "keys") -> None:
    """Raise ``ValueError`` unless ``value`` is a dict with exactly the ``expected`` keys."""
    if not isinstance(value, dict):
        raise ValueError(f"Expected {what} to be a dict with {noun} {sorted(expected)}, got {type(value).__name__}")
    if set(value) != expected:
        got = sorted(map(str, value))
        raise ValueError(f"{what} has {noun} {got}, expected {sorted(expected)}")


def _validate_count(name: str, count: Any, before: int) -> None:
    """Raise ``ValueError`` unless ``count`` is an int in 1..MAX_COUNT that keeps the total within it."""
    validate_int(name, count)
    if count > MAX_COUNT - before:
        raise ValueError(
            f"Expected {name}={count!r} <= {MAX_COUNT - before} (a ledger holds at most "
            f"MAX_COUNT = 2**53 steps in all, {before} before this entry)"
        )
