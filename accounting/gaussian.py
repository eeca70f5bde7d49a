"""The Gaussian mechanism, once: (ε, δ) ↔ noise, for a single noisy release.

For users who add Gaussian noise to an aggregate once (a federated round, a
released statistic) rather than run DP-SGD. The same trade-off curve is the
μ-GDP curve (Dong, Roth & Su 2019): a Gaussian mechanism with sensitivity Δ
and noise std s is μ-GDP with μ = Δ / s, so the GDP accountant reuses
``gaussian_epsilon``.

Numerics: both terms of δ(ε) are evaluated in log space (``log_ndtr``), so
δ is accurate down to ~1e-300 and large ε does not overflow e^ε.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.special import log_ndtr

from accounting.accountant import validate_delta
from accounting.events import validate_positive

#: Above this μ = Δ/s, ``gaussian_epsilon`` reports ∞ (ε would exceed ~5·10⁷).
MAX_MU = 1e4

__all__ = [
    "analytic_gaussian_sigma",
    "classic_gaussian_sigma",
    "gaussian_delta",
    "gaussian_epsilon",
]


def gaussian_delta(epsilon: float, mu: float) -> float:
    """Smallest δ for which the Gaussian mechanism with Δ/s = ``mu`` is (ε, δ)-DP.

    δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ)  (Balle & Wang 2018, Theorem 8).

    Args:
        epsilon: ε >= 0.
        mu: sensitivity divided by the noise std (Δ/s, unitless, > 0).
    """
    if not (epsilon >= 0.0):
        raise ValueError(f"Expected epsilon={epsilon!r} >= 0")
    mu = validate_positive("mu", mu)
    log_first = float(log_ndtr(mu / 2.0 - epsilon / mu))
    log_second = epsilon + float(log_ndtr(-mu / 2.0 - epsilon / mu))
    # δ = Φ(a)·(1 − e^{log_second − log_first}); expm1 keeps the difference accurate.
    # δ >= 0 exactly; rounding in the far tails must not turn it into an overflow.
    return max(0.0, -math.exp(log_first) * math.expm1(min(0.0, log_second - log_first)))


def gaussian_epsilon(delta: float, mu: float) -> float:
    """Smallest ε for which the Gaussian mechanism with Δ/s = ``mu`` is (ε, δ)-DP.

    Inverts ``gaussian_delta`` (decreasing in ε) by Brent's method to an
    absolute tolerance of 1e-12, then steps up so the result is never below
    the exact ε. 0.0 when δ(0) <= ``delta`` already.
    """
    delta = validate_delta(delta)
    mu = validate_positive("mu", mu)
    if mu > MAX_MU:  # ε > μ²/2 − O(μ) ≈ 5e7: no meaningful privacy, and beyond the numerics
        return math.inf
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    hi = max(1.0, mu * mu)
    while gaussian_delta(hi, mu) > delta:
        hi *= 2.0
    eps = brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-15)
    while gaussian_delta(eps, mu) > delta:
        eps += 1e-12 * max(1.0, eps)
    return float(eps)


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Noise std s for which x ↦ f(x) + N(0, s²) is (ε, δ)-DP: the analytic Gaussian mechanism.

    The smallest s with δ(ε; Δ/s) <= δ for the exact condition of Balle &
    Wang 2018 (Theorem 8, "Improving the Gaussian mechanism for differential
    privacy", ICML 2018): Φ(Δ/2s − εs/Δ) − e^ε Φ(−Δ/2s − εs/Δ) <= δ. Valid
    for every ε > 0 and tight: no smaller s satisfies the condition. Compare
    ``classic_gaussian_sigma``, which is larger and valid only for ε < 1.

    Args:
        epsilon: target ε > 0.
        delta: target δ, 0 < δ < 1.
        sensitivity: Δ, the L2 sensitivity of f (in f's units, > 0).

    Returns:
        s in f's units (for DP-SGD-style noise: noise_multiplier = s / Δ),
        solved to a relative tolerance of 1e-12 and on the safe side.

    Example:
        >>> round(analytic_gaussian_sigma(1.0, 1e-5), 3)
        3.731
        >>> round(classic_gaussian_sigma(1.0 - 1e-9, 1e-5), 3)
        4.845
    """
    epsilon = validate_positive("epsilon", epsilon)
    delta = validate_delta(delta)
    sensitivity = validate_positive("sensitivity", sensitivity)
    # δ(ε; μ) increases with μ = Δ/s: find the largest μ with δ <= target.
    excess = lambda mu: gaussian_delta(epsilon, mu) - delta  # noqa: E731
    lo, hi = 1e-3, 1.0
    while excess(lo) > 0.0:
        lo /= 2.0
    while excess(hi) <= 0.0:
        lo, hi = hi, 2.0 * hi
    mu = brentq(excess, lo, hi, xtol=1e-300, rtol=1e-13)
    while excess(mu) > 0.0:
        mu *= 1.0 - 1e-13
    return sensitivity / mu


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Noise std s = Δ·√(2 ln(1.25/δ)) / ε: the classic Gaussian mechanism.

    Dwork & Roth 2014, Theorem A.1. Valid only for 0 < ε < 1, and loose: it
    adds more noise than ``analytic_gaussian_sigma`` (≈ 30 % more at ε = 1,
    δ = 1e-5). Given for comparison with textbooks.

    Raises:
        ValueError: for ε >= 1, where the theorem does not hold.
    """
    epsilon = validate_positive("epsilon", epsilon)
    if epsilon >= 1.0:
        raise ValueError(
            f"Expected epsilon={epsilon!r} < 1: the classic Gaussian mechanism bound does not "
            "hold for ε >= 1; use analytic_gaussian_sigma"
        )
    delta = validate_delta(delta)
    sensitivity = validate_positive("sensitivity", sensitivity)
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
