"""Independent references: Google's dp-accounting called directly, not through accounting/."""

from __future__ import annotations

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as pld_lib


def rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return dp_accounting.rdp.RdpAccountant().compose(event, steps).get_epsilon(delta)


def pld_epsilon(q: float, sigma: float, steps: int, delta: float, pessimistic: bool = True) -> float:
    """dp-accounting's PLD ε: an upper bound (pessimistic) or a lower bound (optimistic)
    on the true ε, each within its discretisation."""
    pld = pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma,
        sampling_prob=q,
        value_discretization_interval=1e-4,
        pessimistic_estimate=pessimistic,
    )
    return pld.self_compose(steps).get_epsilon_for_delta(delta)
