"""The ledger: run-length records, state round trip, merge, curves, shuffled batches."""

from __future__ import annotations

import math
import warnings

import pytest

import accounting as acc
from tests.accounting import oracle


def test_run_length_compression_and_state_dict_round_trip():
    ledger = acc.Ledger()
    a, b = acc.PoissonGaussian(0.01, 1.0), acc.ShuffledGaussian(0.02, 1.0, 50)
    ledger.record(a, 500_000)
    ledger.record(a, 500_000)
    ledger.record(b)
    assert ledger.entries == ((a, 1_000_000), (b, 1))
    restored = acc.Ledger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.entries == ledger.entries
    with pytest.raises(ValueError, match="version"):
        restored.load_state_dict({"entries": []})
    assert restored.entries == ledger.entries  # a refused state changes nothing


def test_merge_is_the_run_that_happened_in_two_parts():
    event = acc.PoissonGaussian(0.01, 1.0)
    first, second, whole = acc.Ledger(), acc.Ledger(), acc.Ledger()
    first.record(event, 300)
    second.record(event, 200)
    second.record(acc.PoissonGaussian(0.02, 1.0), 5)
    whole.record(event, 500)
    whole.record(acc.PoissonGaussian(0.02, 1.0), 5)
    first.merge(second)
    assert first.entries == whole.entries
    with pytest.raises(ValueError, match="itself"):
        first.merge(first)


@pytest.mark.parametrize("method", ["rdp", "pld", "gdp"])
def test_curve_points_equal_epsilon_of_each_prefix(method):
    ledger = acc.Ledger()
    ledger.record(acc.PoissonGaussian(0.01, 1.0), 400)
    curve = ledger.epsilon_curve(1e-5, method, points=5)
    assert [t for t, _ in curve] == [1, 101, 200, 300, 400]
    for t, eps in curve:
        prefix = acc.Ledger()
        prefix.record(acc.PoissonGaussian(0.01, 1.0), t)
        assert eps == pytest.approx(prefix.epsilon(1e-5, method), rel=1e-6)
    if method == "rdp":
        assert curve[2][1] == pytest.approx(oracle.rdp_epsilon(0.01, 1.0, 200, 1e-5), rel=1e-3)


def test_empty_ledger():
    ledger = acc.Ledger()
    assert ledger.epsilon(1e-5) == 0.0
    assert ledger.epsilon_curve(1e-5, "rdp") == []
    with pytest.raises(ValueError, match="delta"):
        ledger.epsilon(0.0)
    with pytest.raises(ValueError, match="method"):
        ledger.epsilon(1e-5, method="moments")


def test_shuffled_batches_get_the_poisson_figure_only_with_a_warning():
    q, sigma = 0.01, 1.0
    ledger = acc.Ledger()
    ledger.record(acc.ShuffledGaussian(q, sigma, 100), 1000)  # 10 epochs
    with pytest.warns(acc.SamplingAssumptionWarning, match="no_amplification=True"):
        assumed = ledger.epsilon(1e-5, "rdp")
    assert assumed == pytest.approx(oracle.rdp_epsilon(q, sigma, 1000, 1e-5), rel=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sound = ledger.epsilon(1e-5, "pld", no_amplification=True)
    # Each example is in one batch per epoch: 10 Gaussian mechanisms, μ = √10 / σ.
    assert sound == pytest.approx(acc.gaussian_epsilon(1e-5, math.sqrt(10) / sigma), abs=2e-3)
    assert sound > assumed


def test_shuffled_no_amplification_rounds_partial_epochs_up_along_the_curve():
    ledger = acc.Ledger()
    ledger.record(acc.ShuffledGaussian(0.25, 2.0, 4), 9)  # epochs of 4 steps: 2¼ epochs
    curve = ledger.epsilon_curve(1e-5, "gdp", steps=[1, 4, 5, 9], no_amplification=True)
    mu = lambda epochs: math.sqrt(epochs) / 2.0  # noqa: E731
    expected = [acc.gaussian_epsilon(1e-5, mu(e)) for e in (1, 1, 2, 3)]
    assert [eps for _, eps in curve] == pytest.approx(expected)


def test_no_amplification_counts_the_loaders_epochs_not_one_over_q():
    # drop_last: N = 100, batches of 30, 3 steps per epoch (q·3 = 0.9 of the data).
    ledger = acc.Ledger()
    ledger.record(acc.ShuffledGaussian(0.3, 1.0, 3), 30)  # 10 epochs
    ten_gaussians = acc.Ledger()
    ten_gaussians.record(acc.PoissonGaussian(1.0, 1.0), 10)
    assert ledger.epsilon(1e-5, "pld", no_amplification=True) == pytest.approx(
        ten_gaussians.epsilon(1e-5, "pld")
    )


def test_load_state_dict_refuses_unknown_or_missing_parameters():
    ledger = acc.Ledger()
    ledger.record(acc.PoissonGaussian(0.01, 1.0), 3)
    state = ledger.state_dict()
    state["entries"][0]["params"]["extra"] = 1
    with pytest.raises(ValueError, match="parameters"):
        acc.Ledger().load_state_dict(state)


def test_recording_checks_its_arguments_before_changing_anything():
    ledger = acc.Ledger()
    with pytest.raises(ValueError, match="event"):
        ledger.record((0.01, 1.0))
    with pytest.raises(ValueError, match="count"):
        ledger.record(acc.PoissonGaussian(0.01, 1.0), 0)
    assert ledger.entries == ()


def _state(*, count=3, **params):
    return {"version": 1, "entries": [
        {"event": "PoissonGaussian", "params": {"sample_rate": 0.01, "noise_multiplier": 1.0, **params},
         "count": count},
    ]}


def _mutated(mutate):
    state = _state()
    mutate(state)
    return state


@pytest.mark.parametrize(
    "state, needle",
    [
        (_mutated(lambda s: s.update(version=True)), "version"),
        (_mutated(lambda s: s.update(version="1")), "version"),
        (_mutated(lambda s: s.update(extra=1)), "keys"),
        (_mutated(lambda s: s.pop("entries")), "keys"),
        (_mutated(lambda s: s.update(entries={"a": 1})), "list"),
        (_mutated(lambda s: s["entries"].append([1, 2])), r"entries\[1\]"),
        (_mutated(lambda s: s["entries"][0].pop("count")), r"entries\[0\] has keys"),
        (_mutated(lambda s: s["entries"][0].update(note="x")), r"entries\[0\] has keys"),
        (_mutated(lambda s: s["entries"][0].update(event=["PoissonGaussian"])), "Unknown event type"),
        (_mutated(lambda s: s["entries"][0].update(event="Gaussian")), "Unknown event type"),
        (_mutated(lambda s: s["entries"][0].update(params=[0.01, 1.0])), "params"),
        (_state(sample_rate=True), "sample_rate"),
        (_state(sample_rate=0.0), "sample_rate"),
        (_state(sample_rate="0.01"), "sample_rate"),
        (_state(noise_multiplier=-1.0), "noise_multiplier"),
        (_state(noise_multiplier=float("nan")), "noise_multiplier"),
        (_state(count=True), "count"),
        (_state(count=0), "count"),
        (_state(count=3.0), "count"),
        (_state(count=10**30), "count"),
        (_state(count=2**53 + 1), "count"),
        (_mutated(lambda s: s["entries"].append(
            {"event": "PoissonGaussian", "params": {"sample_rate": 0.02, "noise_multiplier": 1.0}, "count": 2**53})),
         r"entries\[1\] count"),
        ({"version": 1, "entries": [{"event": "IndependentPoissonGaussian", "params": {
            "sample_rate": 0.01, "noise_multiplier": 1.0, "micro_batches": True}, "count": 1}]}, "micro_batches"),
        ([("PoissonGaussian", 1)], "dict"),
    ],
)
def test_load_state_dict_checks_types_ranges_and_keys_before_changing_anything(state, needle):
    ledger = acc.Ledger()
    ledger.record(acc.PoissonGaussian(0.5, 2.0), 7)
    before = ledger.entries
    with pytest.raises(ValueError, match=needle):
        ledger.load_state_dict(state)
    assert ledger.entries == before


def test_counts_load_up_to_two_to_the_53_in_all():
    ledger = acc.Ledger()
    ledger.load_state_dict(_state(count=2**53))
    assert ledger.steps == 2**53
    with pytest.raises(ValueError, match="count"):
        ledger.record(acc.PoissonGaussian(0.01, 1.0))  # the total would pass 2**53
    assert ledger.steps == 2**53
