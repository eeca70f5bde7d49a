"""Privacy-random-variable accountant: adapter over Microsoft's prv-accountant."""

from __future__ import annotations

import prv_accountant

from accounting.accountant import Accountant

__all__ = ["PrvAccountant", "EPS_ERROR", "DELTA_ERROR_FRACTION"]

#: Absolute error allowed in ε (Gopi et al. 2021, Thm. 5.5); Opacus's choice.
EPS_ERROR = 0.01
#: Error allowed in δ, as a fraction of the target δ.
DELTA_ERROR_FRACTION = 1e-3


class PrvAccountant(Accountant):
    """Numerical composition of privacy random variables (Gopi, Lee & Wutschitz 2021).

    Reports the certified upper end of prv-accountant's (lower, estimate, upper)
    interval, so the returned ε is never optimistic within the stated error.
    """

    name = "prv"
    error_bound = (
        f"upper bound on ε; the true ε lies within {EPS_ERROR} below it "
        f"(eps_error={EPS_ERROR}, delta_error=δ·{DELTA_ERROR_FRACTION})"
    )

    def _epsilon(self, delta: float) -> float:
        events = [event for event, _ in self._entries]
        counts = [count for _, count in self._entries]
        prvs = [
            prv_accountant.PoissonSubsampledGaussianMechanism(
                sampling_probability=e.sample_rate, noise_multiplier=e.noise_multiplier
            )
            for e in events
        ]
        acc = prv_accountant.PRVAccountant(
            prvs=prvs,
            max_self_compositions=counts,
            eps_error=EPS_ERROR,
            delta_error=delta * DELTA_ERROR_FRACTION,
        )
        _, _, upper = acc.compute_epsilon(delta=delta, num_self_compositions=counts)
        return upper
