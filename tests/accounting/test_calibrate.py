"""Calibration both ways: σ for a target ε, and the steps a budget allows."""

from __future__ import annotations

import pytest

import accounting as acc
from tests.accounting import oracle


@pytest.mark.parametrize("method", ["rdp", "prv", "pld"])
def test_calibrated_sigma_meets_the_target_on_the_safe_side_within_rtol(method):
    target, q, steps, rtol = 2.0, 0.01, 1000, 1e-3
    sigma = acc.calibrate_noise(target, 1e-5, q, steps, method=method, rtol=rtol)
    eps = acc.epsilon_for(sigma, delta=1e-5, sample_rate=q, steps=steps, method=method)
    assert eps <= target
    # σ is at most rtol above the smallest σ that meets the target.
    assert acc.epsilon_for(sigma * (1 - 2 * rtol), delta=1e-5, sample_rate=q, steps=steps, method=method) > target
    if method == "rdp":  # the same number from dp-accounting itself
        assert oracle.rdp_epsilon(q, sigma, steps, 1e-5) <= target * (1 + 1e-9)
    if method == "pld":
        assert oracle.pld_epsilon(q, sigma, steps, 1e-5) <= target * (1 + 1e-6)


def test_epochs_are_steps_at_one_over_q_per_epoch():
    by_epochs = acc.calibrate_noise(2.0, 1e-5, 0.01, epochs=10, method="rdp")
    assert by_epochs == acc.calibrate_noise(2.0, 1e-5, 0.01, 1000, method="rdp")
    assert acc.calibrate.steps_for_epochs(3, 0.03) == 100  # 3 / 0.03 is 100.00000000000001
    assert acc.calibrate.steps_for_epochs(2.5, 0.1, micro_batches=4) == 7
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        acc.calibrate_noise(2.0, 1e-5, 0.01, 1000, epochs=10)


def test_calibration_for_independent_micro_batches_needs_pld():
    with pytest.raises(acc.UnsupportedEventError, match="pld"):
        acc.calibrate_noise(2.0, 1e-5, 0.05, 10, method="rdp", micro_batches=2)


def test_calibration_rejects_unreachable_targets():
    with pytest.raises(ValueError, match="out of reach"):
        acc.calibrate_noise(1e-4, 1e-10, 1.0, 10**6, method="rdp")


def test_an_approximation_is_refused_for_budgets_and_calibration():
    with pytest.raises(ValueError, match="approximation"):
        acc.max_steps(1.5, 1e-5, 0.02, 1.2, "gdp")
    with pytest.raises(ValueError, match="approximation"):
        acc.calibrate_noise(1.5, 1e-5, 0.02, 100, method="gdp")


@pytest.mark.parametrize("method", ["rdp", "prv", "pld"])
def test_max_steps_is_the_last_step_within_budget(method):
    budget, q, sigma = 1.5, 0.02, 1.2
    steps = acc.max_steps(budget, 1e-5, q, sigma, method)
    at = acc.epsilon_for(sigma, delta=1e-5, sample_rate=q, steps=steps, method=method)
    past = acc.epsilon_for(sigma, delta=1e-5, sample_rate=q, steps=steps + 1, method=method)
    assert at <= budget < past
    if method == "rdp":
        assert oracle.rdp_epsilon(q, sigma, steps, 1e-5) <= budget < oracle.rdp_epsilon(q, sigma, steps + 1, 1e-5)


def test_max_steps_counts_what_was_already_spent():
    spent = acc.Ledger()
    spent.record(acc.PoissonGaussian(0.05, 1.0), 20)  # ε = 2.48 already
    more = acc.max_steps(3.0, 1e-5, 0.02, 1.2, "rdp", spent=spent)
    assert 0 < more < acc.max_steps(3.0, 1e-5, 0.02, 1.2, "rdp")
    total = acc.Ledger()
    total.merge(spent)
    total.record(acc.PoissonGaussian(0.02, 1.2), more)
    assert total.epsilon(1e-5, "rdp") <= 3.0
    total.record(acc.PoissonGaussian(0.02, 1.2))
    assert total.epsilon(1e-5, "rdp") > 3.0
    assert acc.max_steps(2.0, 1e-5, 0.02, 1.2, "rdp", spent=spent) == 0  # already over


def test_max_steps_validates_before_searching():
    with pytest.raises(ValueError, match="sample_rate"):
        acc.max_steps(1.0, 1e-5, 2.0, 1.0)
    with pytest.raises(ValueError, match="method"):
        acc.max_steps(1.0, 1e-5, 0.1, 1.0, method="moments")
    with pytest.raises(ValueError, match="more than"):
        acc.max_steps(50.0, 1e-5, 1e-6, 50.0, method="rdp")
