"""Empirical lower bounds on ε from guesses about canaries (Steinke, Nasr & Jagielski
2023, "Privacy auditing with one (1) training run").

m canaries are each included in training independently with probability 1/2; after
training an auditor guesses, for r of them, whether each was included, and v guesses
are right. If training is (ε, δ)-DP, v is at most as large as a Binomial(r, e^ε/(1+e^ε))
draw, up to a δ term (their Theorem 5.2). An ε for which seeing v or more right guesses
has probability below 1 − confidence is refuted: the largest such ε is the lower bound.

Pure functions of counts (no torch): the canary training run that produces the
guesses builds on them.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

__all__ = ["p_value", "epsilon_lower_bound"]


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    for name, value in (("canaries", canaries), ("guesses", guesses), ("correct", correct)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"Expected {name} to be a whole number >= 0, got {value!r}")
    if not correct <= guesses <= canaries:
        raise ValueError(
            f"Expected correct <= guesses <= canaries, got correct={correct}, guesses={guesses}, "
            f"canaries={canaries}"
        )


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability, under an (ε, δ)-DP training run, of ``correct`` or more right
    guesses out of ``guesses`` about ``canaries`` canaries (each in with probability 1/2).

    With δ = 0 it is the Binomial(r, e^ε/(1+e^ε)) tail P[X ≥ v]; with δ > 0 the paper's
    bound adds 2mδ·max_{1≤i≤v} (P[X ≥ v − i] − P[X ≥ v]) / i (capped at 1).
    """
    _check_counts(canaries, guesses, correct)
    if not epsilon >= 0 or not 0 <= delta < 1:
        raise ValueError(f"Expected epsilon >= 0 and 0 <= delta < 1, got epsilon={epsilon}, delta={delta}")
    q = scipy.special.expit(epsilon)
    tail = float(scipy.stats.binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return tail
    i = np.arange(1, correct + 1)
    spread = (scipy.stats.binom.sf(correct - i - 1, guesses, q) - tail) / i
    return min(1.0, tail + 2 * canaries * delta * float(spread.max()))


def epsilon_lower_bound(
    canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest ε that ``correct`` right guesses out of ``guesses`` refute at
    ``confidence``: p_value(ε, δ) ≤ 1 − confidence; 0 when no ε ≥ 0 is refuted.

    With probability at least ``confidence`` (over the canaries' inclusion and the
    training run) it is below the true ε of an (ε, δ)-DP run.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"Expected 0 < confidence < 1, got {confidence}")
    significance = 1 - confidence

    def refuted(eps: float) -> float:  # > 0 where ε is refuted
        return significance - p_value(canaries, guesses, correct, eps, delta)

    if refuted(0.0) <= 0:
        return 0.0
    high = 1.0
    while refuted(high) > 0:
        if high > 1e3:  # every guess right, δ = 0: each ε is refuted by some margin
            return math.inf
        high *= 2
    return float(scipy.optimize.brentq(refuted, 0.0, high, xtol=1e-9))
