"""The ε-from-guesses bound of dpclip.audit against an independent computation: exact
binomial tails summed from math.comb, the paper's δ term written out, and ε found by
bisection."""

from __future__ import annotations

import math

import pytest

from dpclip.audit import epsilon_lower_bound, p_value


def tail(r: int, p: float, v: int) -> float:
    """P[Binomial(r, p) ≥ v], summed term by term (math.comb, in float: r ≤ 200 here)."""
    return math.fsum(math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(max(v, 0), r + 1))


def reference_p(m: int, r: int, v: int, eps: float, delta: float) -> float:
    p = math.exp(eps) / (1 + math.exp(eps))
    beta = tail(r, p, v)
    if delta == 0 or v == 0:
        return beta
    alpha = max((tail(r, p, v - i) - beta) / i for i in range(1, v + 1))
    return min(1.0, beta + 2 * m * delta * alpha)


def reference_epsilon(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    if reference_p(m, r, v, 0.0, delta) > 1 - confidence:
        return 0.0
    low, high = 0.0, 64.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if reference_p(m, r, v, mid, delta) <= 1 - confidence else (low, mid)
    return low


@pytest.mark.parametrize("m, r, v", [(100, 40, 30), (200, 100, 70), (1000, 60, 55), (50, 10, 6), (500, 200, 100)])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_p_value_is_the_papers_bound(m, r, v, delta):
    for eps in (0.0, 0.3, 1.0, 2.5):
        assert p_value(m, r, v, eps, delta) == pytest.approx(reference_p(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("m, r, v", [(100, 40, 30), (200, 100, 70), (1000, 60, 55), (1000, 200, 180)])
@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_epsilon_lower_bound_is_the_largest_refuted_epsilon(m, r, v, delta):
    got = epsilon_lower_bound(m, r, v, delta, confidence=0.95)
    assert got == pytest.approx(reference_epsilon(m, r, v, delta, 0.95), abs=1e-6)
    assert got > 0
    assert p_value(m, r, v, got + 1e-4, delta) > 0.05 - 1e-9  # just above it: not refuted


def test_guesses_no_better_than_chance_refute_nothing():
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0


def test_more_right_guesses_give_a_higher_bound_and_delta_lowers_it():
    bounds = [epsilon_lower_bound(1000, 100, v, 0.0) for v in (70, 80, 90, 99)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert epsilon_lower_bound(1000, 100, 90, 1e-3) < epsilon_lower_bound(1000, 100, 90, 0.0)


@pytest.mark.parametrize(
    "args, message",
    [((10, 20, 5, 1.0, 0.0), "guesses <= canaries"), ((10, 5, 6, 1.0, 0.0), "correct <= guesses"),
     ((10, 5, 3, -1.0, 0.0), "epsilon >= 0"), ((10, 5, 3, 1.0, 1.0), "delta < 1"),
     ((10, 5.5, 3, 1.0, 0.0), "guesses to be a whole number")],
)
def test_bad_counts_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        p_value(*args)
