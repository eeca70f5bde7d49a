"""The privacy budget cap: refuse the optimizer step that would spend past ε."""

from __future__ import annotations

import math
from dataclasses import dataclass

import accounting
from accounting import Event, Ledger

__all__ = ["PrivacyBudget", "PrivacyBudgetExceeded"]


class PrivacyBudgetExceeded(RuntimeError):
    """The next optimizer step would take ε past ``max_epsilon``; it was not taken."""


@dataclass(frozen=True)
class PrivacyBudget:
    """A cap on ε at ``delta``, by accountant ``method``.

    Attributes:
        max_epsilon: the largest ε the run may reach (> 0).
        delta: the δ at which ε is measured (0 < δ < 1).
        method: the accountant that measures it.
    """

    max_epsilon: float
    delta: float
    method: str

    def __post_init__(self) -> None:
        if isinstance(self.max_epsilon, bool) or not isinstance(self.max_epsilon, (int, float)) or not (
            0.0 < self.max_epsilon < math.inf
        ):
            raise ValueError(f"Expected max_epsilon={self.max_epsilon!r} to be finite and > 0")
        accounting.accountant.validate_delta(self.delta)

    def steps_allowed(self, spent: Ledger, event: Event) -> int:
        """The most further steps of ``event`` after ``spent`` within the cap (``accounting.max_steps``)."""
        sample_rate = event.sample_rate
        micro_batches = getattr(event, "micro_batches", 1)
        if isinstance(event, accounting.ShuffledGaussian):
            # The cap is measured as ε is reported: the Poisson figure at the same q.
            event = accounting.PoissonGaussian(sample_rate, event.noise_multiplier)
        return accounting.max_steps(
            self.max_epsilon,
            self.delta,
            sample_rate,
            event.noise_multiplier,
            self.method,
            micro_batches=micro_batches,
            spent=spent,
        )
