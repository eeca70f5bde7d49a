"""Gaussian-DP accountant: the central-limit approximation for DP-SGD (an estimate, not a bound).

T Poisson-subsampled Gaussian steps tend, as T → ∞ with q√T fixed, to
μ-GDP with μ = q·√(T·(e^{1/σ²} − 1)) (Bu, Dong, Long & Su 2020, "Deep
learning with Gaussian differential privacy", Thm. 5 / Cor. 5.4; Dong, Roth
& Su 2019, Thm. 3.5). Heterogeneous steps add their μ² terms. Steps with
q = 1 are plain Gaussian mechanisms, exactly 1/σ-GDP, and add 1/σ² each.
μ-GDP converts to (ε, δ) by the Gaussian trade-off curve (``gaussian_epsilon``).

For few steps or large q the limit is not reached and ε can be *under*-reported
(Gopi et al. 2021, Fig. 1): use it for intuition, never as the guarantee.
"""

from __future__ import annotations

import math

from accounting.accountant import Accountant, increments
from accounting.gaussian import gaussian_epsilon

__all__ = ["GdpAccountant", "poisson_mu_squared"]


def poisson_mu_squared(sample_rate: float, noise_multiplier: float, steps: int) -> float:
    """μ² contributed by ``steps`` Poisson-subsampled Gaussian steps (CLT limit; exact at q = 1)."""
    if noise_multiplier == 0.0:
        return math.inf
    if sample_rate == 1.0:
        return steps / noise_multiplier**2
    inv_var = noise_multiplier**-2
    if inv_var > 700.0:  # e^{1/σ²} overflows: no useful privacy left
        return math.inf
    return steps * sample_rate**2 * math.expm1(inv_var)


class GdpAccountant(Accountant):
    """μ-GDP by the central limit theorem (Bu et al. 2020); an approximation."""

    name = "gdp"
    approximate = True
    error_bound = (
        "approximation, not a bound (central limit theorem): can under-report ε "
        "for few steps or large sample rates; never use it as the guarantee"
    )

    def _epsilons(self, entries: list, delta: float, checkpoints: list[int]) -> list[float]:
        mu_squared, out = 0.0, []
        for piece in increments(entries, checkpoints):
            if piece is None:
                finite = math.isfinite(mu_squared)
                out.append(gaussian_epsilon(delta, math.sqrt(mu_squared)) if finite else math.inf)
            else:
                event, count = piece
                mu_squared += poisson_mu_squared(event.sample_rate, event.noise_multiplier, count)
        return out
