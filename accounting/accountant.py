"""The accountant interface: compose events, then ask for ε at a δ.

Each concrete accountant is a thin adapter over a well-kept library
(Google's dp-accounting, Microsoft's prv-accountant); this module holds what
they share: composition bookkeeping and the "unsupported event" error.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

from accounting.events import Event, PoissonGaussian

__all__ = ["Accountant", "UnsupportedEventError", "validate_delta"]


class UnsupportedEventError(ValueError):
    """Raised when an accountant cannot account an event exactly."""


def validate_delta(delta: float) -> float:
    """Return δ as a float, or raise ``ValueError`` unless 0 < δ < 1."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0.0 < delta < 1.0):
        raise ValueError(f"Expected 0 < delta={delta!r} < 1")
    return float(delta)


class Accountant(ABC):
    """Composes events and reports ε for a target δ.

    Subclasses set ``name``, ``error_bound`` (a sentence that says how far the
    reported ε may be from the true ε, and on which side) and ``supported``
    (the event types they account exactly), and implement ``_epsilon``.
    """

    name: ClassVar[str]
    error_bound: ClassVar[str]
    supported: ClassVar[tuple[type, ...]] = (PoissonGaussian,)

    def __init__(self) -> None:
        self._entries: list[tuple[Event, int]] = []

    def supports(self, event: object) -> bool:
        """Whether this accountant accounts ``event`` exactly (no approximation)."""
        return isinstance(event, self.supported)

    def compose(self, event: Event, count: int = 1) -> "Accountant":
        """Add ``count`` self-compositions of ``event``; returns ``self`` for chaining."""
        if not self.supports(event):
            from accounting.registry import accountants_supporting

            raise UnsupportedEventError(
                f"accountant {self.name!r} cannot account {event!r}; "
                f"accountants that can: {accountants_supporting(event) or 'none'}"
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"Expected count={count!r} to be an int >= 0")
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
        if any(event.noise_multiplier == 0.0 for event, _ in self._entries):
            return math.inf
        return float(self._epsilon(delta))

    @abstractmethod
    def _epsilon(self, delta: float) -> float:
        """ε for the non-empty, all-noisy composition in ``self._entries``."""
