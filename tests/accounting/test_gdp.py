"""The GDP accountant: Opacus's independent CLT implementation, and its label."""

from __future__ import annotations

import math

import pytest
from opacus.accountants.analysis import gdp as opacus_gdp

import accounting as acc
from tests.accounting import oracle


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.0, 1000), (0.004, 0.8, 5000), (0.05, 2.0, 200)])
def test_gdp_equals_opacus_poisson_clt(q, sigma, steps):
    ledger = acc.Ledger()
    ledger.record(acc.PoissonGaussian(q, sigma), steps)
    expected = opacus_gdp.compute_eps_poisson(
        steps=steps, noise_multiplier=sigma, sample_rate=q, delta=1e-5
    )
    assert ledger.epsilon(1e-5, "gdp") == pytest.approx(expected, rel=1e-6)


def test_q_one_steps_are_exact_gaussian_composition():
    ledger = acc.Ledger()
    ledger.record(acc.PoissonGaussian(1.0, 4.0), 9)  # 9 Gaussians of μ = 1/4: μ = 3/4 exactly
    assert ledger.epsilon(1e-5, "gdp") == pytest.approx(acc.gaussian_epsilon(1e-5, 0.75))
    assert ledger.epsilon(1e-5, "gdp") == pytest.approx(
        oracle.pld_epsilon(1.0, 4.0, 9, 1e-5), abs=2e-3
    )


def test_gdp_can_under_report_which_is_why_it_is_labelled():
    # Few steps at a large sample rate: the CLT limit is far off, and below the bound.
    ledger = acc.Ledger()
    ledger.record(acc.PoissonGaussian(0.5, 1.0), 5)
    assert ledger.epsilon(1e-5, "gdp") < oracle.pld_epsilon(0.5, 1.0, 5, 1e-5, pessimistic=False)
    assert acc.GdpAccountant.approximate
    assert "under-report" in acc.GdpAccountant.error_bound


def test_tiny_noise_is_infinite_not_an_overflow():
    ledger = acc.Ledger()
    ledger.record(acc.PoissonGaussian(0.01, 0.03), 10)
    assert ledger.epsilon(1e-5, "gdp") == math.inf
