"""The accountant interface: compose events, then ask for ε at a δ.

Each concrete accountant is a thin adapter over a well-kept library
(Google's dp-accounting, Microsoft's prv-accountant); this module holds what
they share: composition bookkeeping and the "unsupported event" error.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import ClassVar

from accounting.events import Event, PoissonGaussian, validate_int

__all__ = [
    "MAX_GRID_POINTS",
    "Accountant",
    "OutOfRangeError",
    "UnsupportedEventError",
    "check_grid",
    "increments",
    "validate_delta",
    "validate_steps",
]

#: Most points a numerical accountant ("prv", "pld") discretises one evaluation on.
#: Measured on 2 cores: about 180 bytes per point at the peak for either (PRV keeps
#: long doubles, PLD its FFTs), so 10⁷ points is about 1.8 GB and 30 s; past it a
#: σ = 1e-9 or an ε of 10⁹ asks for terabytes. Every DP-SGD setting up to ε ≈ 100
#: over 10⁵ steps stays far below (PRV: 1.8·10⁶ points at ε = 3.7 over 10⁵ steps).
MAX_GRID_POINTS = 10**7


class UnsupportedEventError(ValueError):
    """Raised when an accountant cannot account an event exactly."""


class OutOfRangeError(ValueError):
    """Raised, before anything large is allocated, when a composition is beyond what an
    accountant evaluates at bounded cost (its grid would pass ``MAX_GRID_POINTS``)."""


def check_grid(method: str, points: float, what: str, advice: str) -> None:
    """Raise ``OutOfRangeError`` naming ``what`` if a grid of ``points`` is past ``MAX_GRID_POINTS``."""
    if not points <= MAX_GRID_POINTS:  # also catches an infinite or NaN size
        raise OutOfRangeError(
            f"accountant {method!r} cannot evaluate {what}: its grid would need {points:.3g} points, "
            f"more than the {MAX_GRID_POINTS:.0e} it allows; {advice}"
        )


def validate_delta(delta: float) -> float:
    """Return δ as a float, or raise ``ValueError`` unless 0 < δ < 1."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0.0 < delta < 1.0):
        raise ValueError(f"Expected 0 < delta={delta!r} < 1")
    return float(delta)


class Accountant(ABC):
    """Composes events and reports ε for a target δ, at the end or along the way.

    Subclasses set ``name``, ``error_bound`` (a sentence that says how far the
    reported ε may be from the true ε, and on which side), ``supported`` (the
    event types they account exactly) and ``approximate`` (True when the
    result is an estimate, not a bound), and implement ``_epsilons``.
    """

    name: ClassVar[str]
    error_bound: ClassVar[str]
    supported: ClassVar[tuple[type, ...]] = (PoissonGaussian,)
    approximate: ClassVar[bool] = False

    def __init__(self) -> None:
        self._entries: list[tuple[Event, int]] = []

    @property
    def steps(self) -> int:
        """Number of events composed so far."""
        return sum(count for _, count in self._entries)

    def supports(self, event: object) -> bool:
        """Whether this accountant accounts ``event`` exactly (no approximation)."""
        return isinstance(event, self.supported)

    def compose(self, event: Event, count: int = 1) -> "Accountant":
        """Add ``count`` self-compositions of ``event``; returns ``self`` for chaining."""
        if not self.supports(event):
            from accounting.registry import accountants_supporting

            capable = accountants_supporting(event)
            hint = "" if capable else " (Ledger.epsilon reports it with a warning, or no_amplification=True)"
            raise UnsupportedEventError(
                f"accountant {self.name!r} cannot account {event!r}; "
                f"accountants that can: {capable or 'none'}{hint}"
            )
        validate_int("count", count, minimum=0)
        if count:
            self._entries.append((event, count))
        return self

    def get_epsilon(self, delta: float) -> float:
        """Smallest ε such that the composition is (ε, δ)-DP, as this accountant bounds it.

        Returns 0.0 for an empty composition and ``math.inf`` if any composed
        event has ``noise_multiplier == 0``.
        """
        delta = validate_delta(delta)
        if not self._entries:
            return 0.0
        return self.get_epsilon_curve(delta, [self.steps])[0]

    def get_epsilon_curve(self, delta: float, steps: Sequence[int]) -> list[float]:
        """ε after the first t composed events, for each t in ``steps``.

        One pass over the composition: each accountant carries its state from
        one point to the next instead of starting again (RDP and GDP add up,
        PLD composes the increment, PRV discretises once).

        Args:
            delta: target δ, 0 < δ < 1.
            steps: strictly increasing event counts, each in 1..``self.steps``.

        Returns:
            ε at each point; ``math.inf`` from the first σ = 0 event on.
        """
        delta = validate_delta(delta)
        points = validate_steps(steps, self.steps)
        noisy: list[tuple[Event, int]] = []  # the composition up to the first σ = 0 event
        for event, count in self._entries:
            if event.noise_multiplier == 0.0:
                break
            noisy.append((event, count))
        noisy_steps = sum(count for _, count in noisy)
        finite = [t for t in points if t <= noisy_steps]
        values = [float(e) for e in self._epsilons(noisy, delta, finite)] if finite else []
        return values + [math.inf] * (len(points) - len(finite))

    @abstractmethod
    def _epsilons(
        self, entries: list[tuple[Event, int]], delta: float, checkpoints: list[int]
    ) -> list[float]:
        """ε of ``entries`` (all noisy) at each checkpoint (non-empty, increasing, in range)."""


def validate_steps(steps: Sequence[int], total: int) -> list[int]:
    """``steps`` as a list, or ``ValueError`` unless strictly increasing ints in 1..``total``."""
    if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in steps):
        raise ValueError(f"Expected steps={list(steps)!r} to be ints")
    points = [int(t) for t in steps]
    if any(b <= a for a, b in zip(points, points[1:])):
        raise ValueError(f"Expected steps={points!r} to be strictly increasing ints")
    if points and not (1 <= points[0] and points[-1] <= total):
        raise ValueError(f"Expected steps={points!r} within 1..{total} (the steps recorded)")
    return points


def increments(
    entries: Sequence[tuple[Event, int]], checkpoints: Sequence[int]
) -> Iterator[tuple[Event, int] | None]:
    """Walk a composition in order, cut at the checkpoints.

    Yields ``(event, count)`` pieces whose counts add up to the composition
    up to the last checkpoint, and ``None`` each time the pieces so far reach
    the next checkpoint. Nothing past the last checkpoint is yielded.
    """
    targets = iter(checkpoints)
    target = next(targets, None)
    done = 0
    for event, count in entries:
        while target is not None and count > 0:
            take = min(count, target - done)
            if take:
                yield event, take
                done += take
                count -= take
            if done == target:
                yield None
                target = next(targets, None)
        if target is None:
            return
