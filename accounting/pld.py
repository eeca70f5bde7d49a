"""Privacy-loss-distribution accountant: adapter over dp-accounting's ``PLDAccountant``."""

from __future__ import annotations

from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant as _GooglePld

from accounting.accountant import Accountant
from accounting.events import IndependentPoissonGaussian, PoissonGaussian
from accounting.rdp import to_dp_event

__all__ = ["PldAccountant"]

#: Width of the privacy-loss grid; dp-accounting's default.
VALUE_DISCRETIZATION_INTERVAL = 1e-4


class PldAccountant(Accountant):
    """Connect-the-dots PLD composition (Doroshenko et al. 2022), pessimistic discretisation."""

    name = "pld"
    supported = (PoissonGaussian, IndependentPoissonGaussian)
    error_bound = (
        "upper bound on ε (pessimistic discretisation); exceeds the true ε by at most "
        f"about steps × {VALUE_DISCRETIZATION_INTERVAL} in the worst case, far less in practice"
    )

    def _epsilon(self, delta: float) -> float:
        acc = _GooglePld(value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL)
        for event, count in self._entries:
            acc.compose(_to_dp_event(event), count)
        return acc.get_epsilon(delta)


def _to_dp_event(event: PoissonGaussian | IndependentPoissonGaussian) -> dp_event.DpEvent:
    if isinstance(event, IndependentPoissonGaussian):
        sensitivities, probs = event.sensitivity_distribution()
        return dp_event.MixtureOfGaussiansDpEvent(event.noise_multiplier, sensitivities, probs)
    return to_dp_event(event)
