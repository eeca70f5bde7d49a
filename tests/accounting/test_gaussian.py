"""The one-shot Gaussian mechanism against its defining equation (Balle & Wang 2018, Thm. 8)."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from scipy.stats import norm

import accounting as acc


def defining_delta(epsilon, sigma, sensitivity):
    """Φ(Δ/2s − εs/Δ) − e^ε Φ(−Δ/2s − εs/Δ), written out with scipy's normal CDF."""
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    return norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b)


CASES = [(0.1, 1e-6, 1.0), (0.5, 1e-5, 2.0), (1.0, 1e-5, 1.0), (3.0, 1e-7, 0.3), (10.0, 1e-10, 5.0)]


@pytest.mark.parametrize("epsilon, delta, sensitivity", CASES)
def test_analytic_sigma_solves_the_defining_equation_and_is_the_smallest(epsilon, delta, sensitivity):
    sigma = acc.analytic_gaussian_sigma(epsilon, delta, sensitivity)
    assert defining_delta(epsilon, sigma, sensitivity) == pytest.approx(delta, rel=1e-6)
    assert defining_delta(epsilon, sigma, sensitivity) <= delta * (1 + 1e-9)  # safe side
    assert defining_delta(epsilon, sigma * (1 - 1e-4), sensitivity) > delta  # and tight


@pytest.mark.parametrize("epsilon, delta, sensitivity", CASES)
def test_dp_accounting_gives_back_the_target_epsilon(epsilon, delta, sensitivity):
    sigma = acc.analytic_gaussian_sigma(epsilon, delta, sensitivity)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-5)
    pld.compose(dp_accounting.GaussianDpEvent(sigma / sensitivity))
    assert pld.get_epsilon(delta) == pytest.approx(epsilon, rel=2e-3, abs=1e-4)


@pytest.mark.parametrize("epsilon, delta", [(0.1, 1e-6), (0.5, 1e-5), (0.9, 1e-3)])
def test_classic_formula_is_valid_but_looser(epsilon, delta):
    classic = acc.classic_gaussian_sigma(epsilon, delta, sensitivity=2.0)
    assert classic == pytest.approx(2.0 * math.sqrt(2 * math.log(1.25 / delta)) / epsilon)
    assert classic > acc.analytic_gaussian_sigma(epsilon, delta, sensitivity=2.0)
    assert defining_delta(epsilon, classic, 2.0) <= delta


def test_classic_formula_refuses_epsilon_of_one_or_more():
    with pytest.raises(ValueError, match="epsilon=1.0 < 1"):
        acc.classic_gaussian_sigma(1.0, 1e-5)


def test_epsilon_and_delta_are_inverse():
    for mu in (0.05, 0.5, 2.0, 8.0):
        eps = acc.gaussian_epsilon(1e-6, mu)
        assert acc.gaussian_delta(eps, mu) <= 1e-6
        assert acc.gaussian_delta(eps, mu) == pytest.approx(1e-6, rel=1e-6)
        assert acc.gaussian_delta(0.0, mu) == pytest.approx(2 * norm.cdf(mu / 2) - 1)
    assert acc.gaussian_epsilon(0.5, 0.1) == 0.0  # δ(0) < 0.5 already


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: acc.analytic_gaussian_sigma(0.0, 1e-5), "epsilon"),
        (lambda: acc.analytic_gaussian_sigma(1.0, 0.0), "delta"),
        (lambda: acc.analytic_gaussian_sigma(1.0, 1e-5, sensitivity=-1.0), "sensitivity"),
        (lambda: acc.gaussian_epsilon(1e-5, 0.0), "mu"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
