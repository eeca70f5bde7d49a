"""The privacy ledger: which events a run applied, how many times, in order.

Run-length compressed: recording the same event again only bumps a count, so
a million identical steps cost one entry.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from accounting.events import Event, IndependentPoissonGaussian, PoissonGaussian
from accounting.registry import make_accountant

__all__ = ["Ledger", "STATE_VERSION"]

STATE_VERSION = 1
_EVENT_TYPES: dict[str, type] = {
    cls.__name__: cls for cls in (PoissonGaussian, IndependentPoissonGaussian)
}


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
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"Expected count={count!r} to be an int >= 1")
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

    def epsilon(self, delta: float, method: str = "prv") -> float:
        """ε of everything recorded, at ``delta``, by accountant ``method``.

        method: "rdp" (dp-accounting RDP), "prv" (prv-accountant, upper bound)
        or "pld" (dp-accounting PLD, pessimistic). 0.0 for an empty ledger.
        Raises ``UnsupportedEventError`` (naming the accountants that can) when
        ``method`` cannot account a recorded event exactly.
        """
        accountant = make_accountant(method)
        for event, count in self._entries:
            accountant.compose(event, count)
        return accountant.get_epsilon(delta)

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
        """Replace the ledger's contents with ``state`` (from ``state_dict``)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"Expected a ledger state with version {STATE_VERSION}, got {state!r}")
        entries: list[list[Any]] = []
        for item in state["entries"]:
            cls = _EVENT_TYPES.get(item["event"])
            if cls is None:
                raise ValueError(f"Unknown event type {item['event']!r} in ledger state")
            names = {f.name for f in fields(cls)}
            event = cls(**{k: v for k, v in item["params"].items() if k in names})
            count = item["count"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"Expected count={count!r} to be an int >= 1 in ledger state")
            entries.append([event, count])
        self._entries = entries

    def __repr__(self) -> str:
        return f"Ledger(steps={self.steps}, entries={self.entries!r})"
