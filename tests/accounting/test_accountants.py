"""Every accountant against dp-accounting called directly, and the contract they all share."""

from __future__ import annotations

import math

import pytest

import accounting as acc
from accounting.prv import eps_error
from tests.accounting import oracle

DELTA = 1e-5
# q = 1 and q = 1e-4, 10⁵ steps, σ from 0.5 to 10.
CONFIGS = [
    (0.01, 1.0, 1000),
    (0.05, 2.0, 200),
    (1.0, 5.0, 10),
    (1.0, 0.5, 10),
    (0.004, 0.8, 5000),
    (1e-4, 0.5, 100_000),
    (1e-3, 10.0, 100_000),
    (0.1, 3.0, 500),
    (0.02, 0.6, 300),
    (1e-4, 1.0, 20_000),
    (0.25, 10.0, 2000),
]


def _ledger(q, sigma, steps):
    ledger = acc.Ledger()
    ledger.record(acc.PoissonGaussian(q, sigma), steps)
    return ledger


@pytest.mark.parametrize("q, sigma, steps", CONFIGS)
def test_rdp_is_dp_accounting_rdp_within_a_tenth_of_a_percent(q, sigma, steps):
    mine = _ledger(q, sigma, steps).epsilon(DELTA, "rdp")
    assert mine == pytest.approx(oracle.rdp_epsilon(q, sigma, steps, DELTA), rel=1e-3)


@pytest.mark.parametrize("q, sigma, steps", CONFIGS)
def test_pld_and_prv_lie_between_dp_accountings_optimistic_and_pessimistic_pld(q, sigma, steps):
    ledger = _ledger(q, sigma, steps)
    lower = oracle.pld_epsilon(q, sigma, steps, DELTA, pessimistic=False)  # <= true ε
    upper = oracle.pld_epsilon(q, sigma, steps, DELTA, pessimistic=True)  # >= true ε
    rdp = oracle.rdp_epsilon(q, sigma, steps, DELTA)
    assert lower <= upper <= rdp * (1 + 1e-9)
    pld = ledger.epsilon(DELTA, "pld")
    assert pld == pytest.approx(upper, rel=1e-6, abs=1e-9)
    # PRV reports the top of its interval: above the true ε, at most 2·e above it.
    prv = ledger.epsilon(DELTA, "prv")
    e = eps_error(rdp)
    assert lower - 1e-6 <= prv <= upper + 2 * e
    assert prv <= rdp + 2 * e


@pytest.mark.parametrize("method", sorted(acc.ACCOUNTANTS))
class TestContract:
    """What every accountant promises, whatever its method."""

    def test_empty_composition_is_zero_and_delta_is_validated(self, method):
        accountant = acc.make_accountant(method)
        assert accountant.get_epsilon(DELTA) == 0.0
        with pytest.raises(ValueError, match="delta"):
            accountant.get_epsilon(1.0)

    def test_compose_chains_and_noiseless_step_is_infinite_from_there_on(self, method):
        event = acc.PoissonGaussian(0.05, 1.5)
        accountant = acc.make_accountant(method).compose(event, 20)
        finite = accountant.get_epsilon(DELTA)
        assert 0.0 < finite < math.inf
        accountant.compose(acc.PoissonGaussian(0.05, 0.0)).compose(event, 5)
        assert accountant.get_epsilon_curve(DELTA, [20, 21, 26]) == pytest.approx(
            [finite, math.inf, math.inf]
        )

    def test_curve_matches_fresh_accountants_point_by_point(self, method):
        a, b = acc.PoissonGaussian(0.02, 1.0), acc.PoissonGaussian(0.05, 2.0)
        accountant = acc.make_accountant(method).compose(a, 30).compose(b, 20).compose(a, 10)
        points = [1, 29, 30, 31, 45, 60]
        curve = accountant.get_epsilon_curve(DELTA, points)
        fresh = []
        for t in points:
            one = acc.make_accountant(method)
            one.compose(a, min(t, 30))
            if t > 30:
                one.compose(b, min(t - 30, 20))
            if t > 50:
                one.compose(a, t - 50)
            fresh.append(one.get_epsilon(DELTA))
        # PRV's grid is sized for the whole run, so its points may differ by its error.
        tol = 2 * acc.prv.EPS_ERROR if method == "prv" else 1e-6
        assert curve == pytest.approx(fresh, abs=tol)
        assert curve == sorted(curve)
        assert curve[-1] == pytest.approx(accountant.get_epsilon(DELTA), abs=1e-9)

    def test_curve_rejects_points_outside_the_composition(self, method):
        accountant = acc.make_accountant(method).compose(acc.PoissonGaussian(0.1, 1.0), 5)
        for bad in ([0], [6], [3, 3], [2.5], [True]):
            with pytest.raises(ValueError, match="steps"):
                accountant.get_epsilon_curve(DELTA, bad)

    def test_an_event_it_cannot_account_is_refused_naming_who_can(self, method):
        accountant = acc.make_accountant(method)
        mixture = acc.IndependentPoissonGaussian(0.05, 2.0, 2)  # dp-accounting builds it slowly
        if accountant.supports(mixture):
            accountant.compose(mixture, 3)
            assert accountant.get_epsilon(DELTA) > 0
        else:
            with pytest.raises(acc.UnsupportedEventError, match=r"IndependentPoissonGaussian.*\['pld'\]"):
                accountant.compose(mixture)
        with pytest.raises(acc.UnsupportedEventError, match="no_amplification"):
            accountant.compose(acc.ShuffledGaussian(0.01, 1.0, 100))

    def test_error_bound_is_stated_and_approximations_say_so(self, method):
        cls = acc.ACCOUNTANTS[method]
        assert cls.error_bound
        assert cls.approximate == ("approximation" in cls.error_bound)
