"""Noise calibration: the smallest noise multiplier that meets a privacy target."""

from __future__ import annotations

import math

from accounting.accountant import validate_delta
from accounting.events import PoissonGaussian, validate_sample_rate
from accounting.registry import make_accountant

__all__ = ["calibrate_noise", "epsilon_for"]

#: Largest σ tried before a target is declared out of reach.
MAX_NOISE_MULTIPLIER = 1e4


def epsilon_for(
    noise_multiplier: float, *, delta: float, sample_rate: float, steps: int, method: str = "prv"
) -> float:
    """ε after ``steps`` Poisson-subsampled Gaussian steps at (sample_rate, noise_multiplier)."""
    if noise_multiplier == 0.0:
        return math.inf
    accountant = make_accountant(method)
    accountant.compose(PoissonGaussian(sample_rate, noise_multiplier), steps)
    return accountant.get_epsilon(delta)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    method: str = "prv",
    rtol: float = 1e-3,
) -> float:
    """Noise multiplier σ (noise std ÷ max_grad_norm) such that ``steps`` DP-SGD steps
    at ``sample_rate`` are (``target_epsilon``, ``delta``)-DP under accountant ``method``.

    ε is decreasing in σ, so a bracket [lo, hi] with ε(lo) > target >= ε(hi) is
    bisected until (hi - lo) <= rtol · hi. The returned σ is ``hi``: always on the
    safe side (ε(σ) <= target_epsilon) and at most ``rtol`` (relative) above the
    exact minimum.

    Raises:
        ValueError: bad arguments, or no σ <= 1e4 reaches the target.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
        0.0 < target_epsilon < math.inf
    ):
        raise ValueError(f"Expected target_epsilon={target_epsilon!r} to be finite and > 0")
    delta = validate_delta(delta)
    sample_rate = validate_sample_rate(sample_rate)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected steps={steps!r} to be an int >= 1")
    if not (0.0 < rtol < 1.0):
        raise ValueError(f"Expected 0 < rtol={rtol!r} < 1")
    make_accountant(method)  # validates the name before any work

    def eps(sigma: float) -> float:
        return epsilon_for(sigma, delta=delta, sample_rate=sample_rate, steps=steps, method=method)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2.0 * hi
        if hi > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target_epsilon={target_epsilon} at delta={delta} is out of reach: even "
                f"noise_multiplier={MAX_NOISE_MULTIPLIER:g} gives more over {steps} steps "
                f"at sample_rate={sample_rate}"
            )
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
