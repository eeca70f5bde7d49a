"""Events: immutable, hashable, validated."""

from __future__ import annotations

import pytest

import accounting as acc


@pytest.mark.parametrize(
    "event",
    [
        acc.PoissonGaussian(0.1, 1.0),
        acc.IndependentPoissonGaussian(0.1, 1.0, 3),
        acc.ShuffledGaussian(0.1, 1.0, 10),
    ],
)
def test_events_are_immutable_and_hashable(event):
    assert hash(event) == hash(type(event)(*[getattr(event, f) for f in event.__slots__]))
    with pytest.raises(AttributeError):
        event.sample_rate = 0.2


@pytest.mark.parametrize(
    "make",
    [acc.PoissonGaussian, lambda q, s: acc.ShuffledGaussian(q, s, 10),
     lambda q, s: acc.IndependentPoissonGaussian(q, s, 2)],
)
def test_bad_parameters_are_named(make):
    with pytest.raises(ValueError, match="sample_rate"):
        make(1.5, 1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        make(0.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        make(0.1, -1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        make(0.1, float("nan"))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        acc.ShuffledGaussian(0.1, 1.0, 0)
