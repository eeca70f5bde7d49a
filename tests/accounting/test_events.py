"""Events: immutable, hashable, validated."""

from __future__ import annotations

import pytest

import accounting as acc


@pytest.mark.parametrize(
    "event",
    [
        acc.PoissonGaussian(0.1, 1.0),
        acc.IndependentPoissonGaussian(0.1, 1.0, 3),
        acc.ShuffledGaussian(0.1, 1.0),
    ],
)
def test_events_are_immutable_and_hashable(event):
    assert hash(event) == hash(type(event)(*[getattr(event, f) for f in event.__slots__]))
    with pytest.raises(AttributeError):
        event.sample_rate = 0.2


@pytest.mark.parametrize("cls", [acc.PoissonGaussian, acc.ShuffledGaussian])
def test_bad_parameters_are_named(cls):
    with pytest.raises(ValueError, match="sample_rate"):
        cls(1.5, 1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        cls(0.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        cls(0.1, -1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        cls(0.1, float("nan"))
