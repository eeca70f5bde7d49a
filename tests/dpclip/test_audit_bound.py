"""The ε-from-guesses bounds of dpclip.audit against independent computations: exact
binomial tails summed from math.comb, the paper's δ term written out, and ε found by
bisection; the f-DP test against the binomial test on pure-DP curves and against
simulated Gaussian canaries; DP-SGD's curve against the Gaussian closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

import accounting
import scipy.stats

from dpclip.audit import (
    canary_scores,
    dpsgd_epsilon_lower_bound,
    dpsgd_tradeoff,
    epsilon_lower_bound,
    guess_counts,
    p_value,
    refutes,
)


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


# The f-DP test (Mahloujifar, Melis & Chaudhuri 2024) and DP-SGD's trade-off curve.


def pure_dp_curve(eps: float):
    return lambda a: max(0.0, 1 - math.exp(eps) * a, math.exp(-eps) * (1 - a))


@pytest.mark.parametrize("m", [100, 1000])
@pytest.mark.parametrize("r", [10, 40, 100])
@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 3.0])
def test_refutes_on_the_pure_dp_curve_is_the_binomial_tail_test(m, r, eps):
    # For pure ε-DP the f-DP test and the binomial tail (Steinke et al., δ = 0) agree, up
    # to the boundary: a tail below 0.05/1.5 is refuted, one above 0.05·1.5 is not (the
    # grid has one case between, tail 0.044, refuted by the f-DP test at 0.06).
    for v in range(r // 2, r + 1):
        tail_p = reference_p(m, r, v, eps, 0.0)
        if tail_p <= 0.05 / 1.5:
            assert refutes(m, r, v, pure_dp_curve(eps), 0.05), v
        if tail_p > 0.05 * 1.5:
            assert not refutes(m, r, v, pure_dp_curve(eps), 0.05), v


def test_refutes_keeps_its_significance_on_gaussian_canaries_and_has_power():
    # 300 simulated one-run audits of a Gaussian mechanism with μ = 1 (DP-SGD, q = 1,
    # one step, σ = 1): the true curve is refuted in at most 5 % of them (+3 sd of a
    # binomial(300, 0.05)); a claim of σ = 2 is refuted in most.
    rng = np.random.default_rng(0)
    true, claim = dpsgd_tradeoff(1.0, 1.0, 1), dpsgd_tradeoff(1.0, 2.0, 1)
    trials, m = 300, 1000
    false_alarms = power = 0
    for _ in range(trials):
        included = rng.random(m) < 0.5
        ((r, v),) = guess_counts(included + rng.standard_normal(m), included, (0.1,))
        false_alarms += refutes(m, r, v, true, 0.05)
        power += refutes(m, r, v, claim, 0.05)
    assert false_alarms <= trials * 0.05 + 3 * math.sqrt(trials * 0.05 * 0.95)
    assert power >= 0.8 * trials


@pytest.mark.parametrize("sigma", [0.7, 1.0, 3.0])
def test_dpsgd_tradeoff_is_the_gaussian_curve_from_below(sigma):
    # One step at q = 1 is the Gaussian mechanism: f(α) = Φ(Φ⁻¹(1 − α) − 1/σ) (Dong, Roth
    # & Su). The curve from the PLD is a lower bound, close to it.
    f = dpsgd_tradeoff(1.0, sigma, 1)
    for a in np.linspace(1e-4, 1 - 1e-4, 41):
        exact = scipy.stats.norm.cdf(scipy.stats.norm.ppf(1 - a) - 1 / sigma)
        assert exact - 0.01 <= f(a) <= exact + 1e-9


def test_canary_scores_are_the_mixture_likelihood_ratio():
    rng = np.random.default_rng(1)
    y = rng.normal(0.5, 2.0, size=(7, 5))
    for q in (0.01, 0.3, 1.0):
        sigma = 1.5
        null = scipy.stats.norm.pdf(y, 0, sigma)
        mixture = (1 - q) * null + q * scipy.stats.norm.pdf(y, 1, sigma)
        expected = np.log(mixture / null).sum(axis=0)
        np.testing.assert_allclose(canary_scores(y, q, sigma), expected, rtol=1e-10, atol=1e-12)


def test_guess_counts_guess_the_extremes():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    included = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    # 10 %: one "in" (5.0, in: right) and one "out" (-4.0, out: right); 20 %: two each
    # (5, 4 in: right; -3, -4 out: right); 30 %: (5, 4, 3) 2 right, (-2, -3, -4) 3 right.
    assert guess_counts(scores, included, (0.1, 0.2, 0.3)) == [(2, 2), (4, 4), (6, 5)]


def test_dpsgd_bound_finds_the_noise_the_guesses_allow():
    # Many right guesses refute large σ; no better than chance refutes nothing.
    eps, sigma = dpsgd_epsilon_lower_bound(
        1000, [(200, 190)], sample_rate=1.0, steps=1, noise_multiplier=2.0, delta=1e-5
    )
    assert 0 < sigma < 2.0 and eps > epsilon_lower_bound(1000, 200, 190, 1e-5) > 0
    # ε is from below: under every accountant's figure for σ*, close to them
    assert eps <= accounting.epsilon_for(sigma, delta=1e-5, sample_rate=1.0, steps=1, method="pld")
    assert eps == pytest.approx(accounting.epsilon_for(sigma, delta=1e-5, sample_rate=1.0, steps=1), rel=0.01)
    # σ* is the refuted end: DP-SGD at σ* is refuted, a little less noise is not.
    assert refutes(1000, 200, 190, dpsgd_tradeoff(1.0, sigma, 1), 0.05)
    assert not refutes(1000, 200, 190, dpsgd_tradeoff(1.0, sigma / 1.01, 1), 0.05)
    assert dpsgd_epsilon_lower_bound(
        1000, [(200, 100)], sample_rate=1.0, steps=1, noise_multiplier=2.0, delta=1e-5
    ) == (0.0, math.inf)
