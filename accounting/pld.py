"""Privacy-loss-distribution accountant: adapter over dp-accounting's ``PLDAccountant``."""

from __future__ import annotations

import functools
import math

from dp_accounting.pld import common
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.pld import privacy_loss_mechanism as plm
from scipy.fft import next_fast_len

from accounting.accountant import Accountant, check_grid, increments
from accounting.events import Event, IndependentPoissonGaussian, PoissonGaussian

__all__ = ["PldAccountant"]

#: Width of the privacy-loss grid; dp-accounting's default.
VALUE_DISCRETIZATION_INTERVAL = 1e-4
#: dp-accounting's defaults for the noise tails its PLDs drop and its compositions truncate.
LOG_MASS_TRUNCATION_BOUND = -50.0
TAIL_MASS_TRUNCATION = 1e-15
_ADVICE = "use method='rdp' (an upper bound at any σ and ε)"


class PldAccountant(Accountant):
    """Connect-the-dots PLD composition (Doroshenko et al. 2022), pessimistic discretisation."""

    name = "pld"
    supported = (PoissonGaussian, IndependentPoissonGaussian)
    error_bound = (
        "upper bound on ε (pessimistic discretisation); exceeds the true ε by at most "
        f"about steps × {VALUE_DISCRETIZATION_INTERVAL} in the worst case, far less in practice"
    )

    def _epsilons(self, entries: list, delta: float, checkpoints: list[int]) -> list[float]:
        # Each distinct event's PLD is built once; the running composition takes
        # each increment (self-composed by FFT) instead of starting again.
        base: dict[Event, pld_lib.PrivacyLossDistribution] = {}
        running, out = None, []
        for piece in increments(entries, checkpoints):
            if piece is None:
                out.append(running.get_epsilon_for_delta(delta))
                continue
            event, count = piece
            if event not in base:
                check_grid("pld", _event_points(event), f"one step of {event!r} (σ too small)", _ADVICE)
                base[event] = _event_pld(event)
            check_grid("pld", _composed_points(base[event], count), f"{count} steps of {event!r}", _ADVICE)
            step = base[event].self_compose(count)
            if running is not None:
                check_grid("pld", _points(running) + _points(step), "this composition", _ADVICE)
            running = step if running is None else running.compose(step)
        return out


def _losses(event: PoissonGaussian | IndependentPoissonGaussian) -> list[plm.MonotonePrivacyLoss]:
    """The privacy losses (remove, add) that ``_event_pld`` discretises."""
    out = []
    for adjacency in (plm.AdjacencyType.REMOVE, plm.AdjacencyType.ADD):
        if isinstance(event, IndependentPoissonGaussian):
            sensitivities, probs = event.sensitivity_distribution()
            out.append(plm.MixtureGaussianPrivacyLoss(
                event.noise_multiplier, sensitivities, probs,
                log_mass_truncation_bound=LOG_MASS_TRUNCATION_BOUND, adjacency_type=adjacency,
            ))
        else:
            out.append(plm.GaussianPrivacyLoss(
                event.noise_multiplier, sampling_prob=event.sample_rate,
                log_mass_truncation_bound=LOG_MASS_TRUNCATION_BOUND, adjacency_type=adjacency,
            ))
    return out


def _event_points(event: PoissonGaussian | IndependentPoissonGaussian) -> float:
    """Points of the event's larger PMF, from the loss range the connect-the-dots grid spans
    (dp-accounting's own bounds; microseconds, while building it takes ~200 bytes a point)."""
    spans = []
    for loss in _losses(event):
        bounds = loss.connect_dots_bounds()
        spans.append((bounds.epsilon_upper - bounds.epsilon_lower) / VALUE_DISCRETIZATION_INTERVAL + 1)
    return max(spans) if all(math.isfinite(s) for s in spans) else math.inf


def _pmfs(pld: pld_lib.PrivacyLossDistribution) -> list:
    # dp-accounting keeps the two PMFs private; their sizes decide its FFT lengths.
    return [pld._pmf_remove, pld._pmf_add]  # noqa: SLF001


def _points(pld: pld_lib.PrivacyLossDistribution) -> int:
    return max(pmf.size for pmf in _pmfs(pld))


def _composed_points(pld: pld_lib.PrivacyLossDistribution, count: int) -> float:
    """FFT length of ``pld.self_compose(count)``, as dp-accounting's ``self_convolve``
    sizes it (Chernoff bounds on the composed loss), before it allocates."""
    sizes = []
    for pmf in _pmfs(pld):
        probs = getattr(pmf, "_probs", None)
        if probs is None:  # a sparse PMF: at most size·count distinct losses
            sizes.append(pmf.size * count)
            continue
        lower, upper = common.compute_self_convolve_bounds(probs, count, TAIL_MASS_TRUNCATION)
        sizes.append(next_fast_len(max(upper - lower + 1, len(probs))))
    return max(sizes)


@functools.lru_cache(maxsize=16)  # events are immutable; PLDs are never mutated
def _event_pld(event: PoissonGaussian | IndependentPoissonGaussian) -> pld_lib.PrivacyLossDistribution:
    """dp-accounting's PLD for one event, as its ``PLDAccountant`` builds it."""
    if isinstance(event, IndependentPoissonGaussian):
        sensitivities, probs = event.sensitivity_distribution()
        return pld_lib.from_mixture_gaussian_mechanism(
            standard_deviation=event.noise_multiplier,
            sensitivities=sensitivities,
            sampling_probs=probs,
            value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL,
            log_mass_truncation_bound=LOG_MASS_TRUNCATION_BOUND,
        )
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=event.noise_multiplier,
        sampling_prob=event.sample_rate,
        value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL,
        log_mass_truncation_bound=LOG_MASS_TRUNCATION_BOUND,
    )
