"""The privacy budget cap: refuse the optimizer step that would spend past ε."""

from __future__ import annotations

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
        accounting.events.validate_positive("max_epsilon", self.max_epsilon)
        if self.max_epsilon > accounting.calibrate.MAX_TARGET_EPSILON:
            raise ValueError(
                f"Expected max_epsilon={self.max_epsilon:g} <= {accounting.calibrate.MAX_TARGET_EPSILON:g}: "
                "a cap beyond it keeps no meaningful privacy, and the accountants' grids grow with ε"
            )
        accounting.accountant.validate_delta(self.delta)
        if accounting.ACCOUNTANTS[self.method].approximate:
            raise ValueError(
                f"accountant={self.method!r} is an approximation, not a bound: a budget cap needs "
                "PrivacyEngine(accountant='prv', 'pld' or 'rdp')"
            )

    def covers(self, since: tuple[tuple[Event, int], ...], now: tuple[tuple[Event, int], ...], event: Event) -> bool:
        """Whether ledger ``now`` is ledger ``since`` plus steps that ``event`` dominates,
        so that a count of steps since then is all the cap needs."""
        if len(now) < len(since) or now[: max(0, len(since) - 1)] != since[: max(0, len(since) - 1)]:
            return False
        rest = list(now[len(since) - 1 :]) if since else list(now)
        if since:
            (old_event, old_count), (cur_event, cur_count) = since[-1], rest[0]
            if cur_event != old_event or cur_count < old_count:
                return False
            rest = rest[1:]
            if old_event != event and cur_count > old_count and not _dominated(old_event, event):
                return False
        return all(_dominated(e, event) for e, _ in rest)

    def steps_allowed(self, spent: Ledger, event: Event) -> int:
        """The most further steps of ``event`` after ``spent`` within the cap (``accounting.max_steps``)."""
        sample_rate = event.sample_rate
        micro_batches = getattr(event, "micro_batches", 1)
        if isinstance(event, (accounting.ShuffledGaussian, accounting.CountedShuffledGaussian)):
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


def _dominated(step: Event, by: Event) -> bool:
    """Whether one ``step`` costs no more privacy than one ``by``: the same event, or fewer
    independent Poisson micro-batches at the same rate and noise."""
    if step == by:
        return True
    if isinstance(step, accounting.CountedShuffledGaussian) and isinstance(
        by, accounting.CountedShuffledGaussian
    ):
        # the cap is measured on the Poisson figure, which the uses do not change
        return (step.sample_rate, step.noise_multiplier) == (by.sample_rate, by.noise_multiplier)
    if isinstance(by, accounting.IndependentPoissonGaussian):
        same = (step.sample_rate, step.noise_multiplier) == (by.sample_rate, by.noise_multiplier)
        if isinstance(step, accounting.PoissonGaussian):
            return same
        if isinstance(step, accounting.IndependentPoissonGaussian):
            return same and step.micro_batches <= by.micro_batches
    return False
