"""Privacy-random-variable accountant: adapter over Microsoft's prv-accountant."""

from __future__ import annotations

import math
import warnings

import prv_accountant
from dp_accounting.rdp import RdpAccountant as _GoogleRdp
from prv_accountant import composers
from prv_accountant.accountant import compute_safe_domain_size
from scipy.fft import next_fast_len

from accounting.accountant import Accountant, check_grid, increments
from accounting.events import PoissonGaussian
from accounting.rdp import quiet_rdp_warnings, to_dp_event

__all__ = ["DELTA_ERROR_FRACTION", "EPS_ERROR", "EPS_ERROR_MAX", "EPS_ERROR_RELATIVE", "PrvAccountant", "eps_error"]

#: Least absolute error allowed in ε (Gopi et al. 2021, Thm. 5.5); Opacus's choice.
EPS_ERROR = 0.01
#: Error allowed in ε relative to the RDP bound, when that is larger than EPS_ERROR.
EPS_ERROR_RELATIVE = 1e-3
#: Largest ε error, whatever the RDP bound.
EPS_ERROR_MAX = 0.1
#: Error allowed in δ, as a fraction of the target δ.
DELTA_ERROR_FRACTION = 1e-3


def eps_error(rdp_epsilon: float) -> float:
    """The ε error budget: max(EPS_ERROR, EPS_ERROR_RELATIVE · ε_RDP), at most EPS_ERROR_MAX.

    The PRV mesh is eps_error / √(T/2 · ln(12/δ_error)) wide (Gopi et al.
    2021, Thm. 5.5), so a fixed 0.01 costs millions of grid points at 10⁵
    steps; 0.1 % of the RDP bound keeps the relative error tiny at large ε.
    """
    return min(max(EPS_ERROR, EPS_ERROR_RELATIVE * rdp_epsilon), EPS_ERROR_MAX)


class PrvAccountant(Accountant):
    """Numerical composition of privacy random variables (Gopi, Lee & Wutschitz 2021).

    Reports the certified upper end of prv-accountant's (lower, estimate, upper)
    interval, so the returned ε is never optimistic within the stated error.
    """

    name = "prv"
    error_bound = (
        "upper bound on ε; the true ε lies at most 2·e below it, with e = "
        f"min(max({EPS_ERROR}, {EPS_ERROR_RELATIVE}·ε_RDP), {EPS_ERROR_MAX}) and "
        f"delta_error = δ·{DELTA_ERROR_FRACTION}"
    )

    def _epsilons(self, entries: list, delta: float, checkpoints: list[int]) -> list[float]:
        # Composition order does not change ε: one PRV per distinct event, counted.
        distinct = list(dict.fromkeys(event for event, _ in entries))
        totals = [sum(c for e, c in entries if e == event) for event in distinct]
        prefixes, counts = [], [0] * len(distinct)
        for piece in increments(entries, checkpoints):
            if piece is None:
                prefixes.append(list(counts))
            else:
                counts[distinct.index(piece[0])] += piece[1]
        delta_error = delta * DELTA_ERROR_FRACTION
        rdp_epsilon = _rdp_epsilon(entries, delta)
        error = eps_error(rdp_epsilon)
        prvs = [
            prv_accountant.PoissonSubsampledGaussianMechanism(
                sampling_probability=e.sample_rate, noise_multiplier=e.noise_multiplier
            )
            for e in distinct
        ]
        what = f"{sum(totals)} steps whose RDP bound is ε = {rdp_epsilon:.4g}"
        try:
            composer = _discretise(prvs, totals, error, delta_error, what)
        except RuntimeError as e:  # prv-accountant's own consistency check
            raise ValueError(
                f"prv-accountant cannot discretise this composition ({e}); it happens when ε is "
                f"far beyond DP-SGD practice (RDP bound here: {rdp_epsilon:.4g}): "
                "use method='pld'"
            ) from None
        out = []
        for prefix in prefixes:
            used = [(sc, n) for sc, n in zip(composer.self_composers, prefix) if n > 0]
            parts = [sc.compute_composition([n]) for sc, n in used]
            composed = composers.ConvolutionTree(parts).compute_composition([1] * len(parts))
            _, _, upper = composed.compute_epsilon(delta, delta_error, error)
            # ε >= 0 by definition: at large δ (about 0.3 and above) prv-accountant's
            # interval reaches below 0
            out.append(max(0.0, upper))
        return out


def _rdp_epsilon(entries: list[tuple[PoissonGaussian, int]], delta: float) -> float:
    acc = _GoogleRdp()
    with quiet_rdp_warnings():
        for event, count in entries:
            acc.compose(to_dp_event(event), count)
        return acc.get_epsilon(delta)


def _discretise(
    prvs: list, max_counts: list[int], error: float, delta_error: float, what: str
) -> composers.Heterogeneous:
    """prv-accountant's own discretisation, on a grid whose size FFTs fast.

    The domain half-width is prv-accountant's safe size L (its Remark 5.6),
    widened to the next 5-smooth grid size: an FFT of a size with a large
    prime factor is ~10× slower, and a wider domain only adds safety. The
    size is checked against ``MAX_GRID_POINTS`` before anything is allocated
    (``what`` describes the composition in the error).
    """
    half_width = compute_safe_domain_size(prvs, max_counts, eps_error=error, delta_error=delta_error)
    mesh = error / math.sqrt(sum(max_counts) / 2 * math.log(12 / delta_error))
    check_grid(
        "prv", 2 * half_width / mesh, what,
        "its grid grows with ε and with √steps: use method='pld' (whose grid grows with ε only) "
        "or 'rdp' (an upper bound at any ε)",
    )
    # Domain.create_aligned makes 2·ceil(L/mesh) + 2 points for a half-width L.
    size = next_fast_len(2 * math.ceil(half_width / mesh) + 2, real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    half_width = ((size - 2) // 2 - 0.5) * mesh
    with warnings.catch_warnings():
        # eps_max is our safe domain size, not an assumption about ε.
        warnings.filterwarnings("ignore", message="Assuming that true epsilon")
        acc = prv_accountant.PRVAccountant(
            prvs=prvs,
            max_self_compositions=max_counts,
            eps_error=error,
            delta_error=delta_error,
            eps_max=half_width,
        )
    return acc.composer
