"""k independent Poisson micro-batches under one noise draw: exact mixture accounting."""

from __future__ import annotations

import pytest

import accounting as acc


def _eps(event, steps, method="pld", delta=1e-5):
    ledger = acc.Ledger()
    ledger.record(event, steps)
    return ledger.epsilon(delta, method)


def test_one_micro_batch_is_the_plain_poisson_step():
    q, sigma, steps = 0.02, 1.0, 50
    mixture = _eps(acc.IndependentPoissonGaussian(q, sigma, 1), steps)
    plain = _eps(acc.PoissonGaussian(q, sigma), steps)
    assert mixture == pytest.approx(plain, rel=1e-3)


# (each distinct event's PLD costs dp-accounting seconds to build, ~10 s at σ = 1: one
# configuration where six of them take ~15 s)
@pytest.mark.parametrize("q, sigma, steps", [(0.05, 4.0, 20)])
def test_never_below_the_naive_k_q_accounting_and_monotone_in_k(q, sigma, steps):
    exact = []
    for k in (1, 2, 4):
        e = _eps(acc.IndependentPoissonGaussian(q, sigma, k), steps)
        naive = _eps(acc.PoissonGaussian(min(1.0, k * q), sigma), steps)
        assert e >= naive * (1 - 1e-3)
        exact.append(e)
    assert exact == sorted(exact)


def test_sensitivity_distribution_is_binomial():
    sens, probs = acc.IndependentPoissonGaussian(0.3, 1.0, 3).sensitivity_distribution()
    assert sens == [0.0, 1.0, 2.0, 3.0]
    assert probs == pytest.approx([0.343, 0.441, 0.189, 0.027])


@pytest.mark.parametrize("method", ["rdp", "prv"])
def test_accountants_without_an_exact_rule_refuse_and_name_pld(method):
    ledger = acc.Ledger()
    ledger.record(acc.IndependentPoissonGaussian(0.01, 1.0, 4), 10)
    with pytest.raises(acc.UnsupportedEventError, match="pld"):
        ledger.epsilon(1e-5, method)


def test_state_dict_round_trip_keeps_the_event_kind():
    ledger = acc.Ledger()
    ledger.record(acc.IndependentPoissonGaussian(0.01, 1.0, 4), 10)
    ledger.record(acc.PoissonGaussian(0.04, 1.0), 5)
    restored = acc.Ledger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.entries == ledger.entries
    with pytest.raises(ValueError, match="micro_batches"):
        acc.IndependentPoissonGaussian(0.01, 1.0, 0)
