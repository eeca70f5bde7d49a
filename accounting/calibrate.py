"""Calibration: the noise a privacy target needs, and the steps a budget allows.

Both invert ε(σ, T), which decreases in σ and increases in T, by bisection.
"""

from __future__ import annotations

import math
import warnings

from accounting.accountant import OutOfRangeError, UnsupportedEventError, validate_delta
from accounting.events import (
    Event,
    IndependentPoissonGaussian,
    PoissonGaussian,
    validate_int,
    validate_noise_multiplier,
    validate_positive,
    validate_sample_rate,
)
from accounting.ledger import Ledger
from accounting.registry import ACCOUNTANTS, make_accountant

__all__ = ["calibrate_noise", "epsilon_for", "max_steps", "steps_for_epochs"]

#: Largest σ tried before a target is declared out of reach.
MAX_NOISE_MULTIPLIER = 1e4
#: Largest target ε calibrated. Past ε ≈ 100 a run keeps no meaningful privacy, and the
#: bisection evaluates ε at σ down to half the answer, where the PRV and PLD grids grow
#: with ε (measured: ~3 s an evaluation near ε = 230 over 10³ steps, 10⁹ asks for terabytes).
MAX_TARGET_EPSILON = 100.0
#: Most steps ``max_steps`` searches.
MAX_STEPS = 10**9
#: Most steps it evaluates with PRV, whose grid (memory) grows with the step count.
MAX_PRV_STEPS = 10**6


def step_event(sample_rate: float, noise_multiplier: float, micro_batches: int = 1) -> Event:
    """One DP-SGD step: a Poisson draw at ``sample_rate`` (``micro_batches`` = 1), or
    ``micro_batches`` independent Poisson draws at ``sample_rate`` each under one noise."""
    if micro_batches == 1:
        return PoissonGaussian(sample_rate, noise_multiplier)
    return IndependentPoissonGaussian(sample_rate, noise_multiplier, micro_batches)


def steps_for_epochs(epochs: float, sample_rate: float, micro_batches: int = 1) -> int:
    """Optimizer steps in ``epochs`` passes: epochs / (micro_batches · q), rounded up."""
    epochs = validate_positive("epochs", epochs)
    return max(1, math.ceil(round(epochs / (micro_batches * sample_rate), 9)))


def epsilon_for(
    noise_multiplier: float,
    *,
    delta: float,
    sample_rate: float,
    steps: int,
    method: str = "prv",
    micro_batches: int = 1,
) -> float:
    """ε after ``steps`` DP-SGD steps at (sample_rate, noise_multiplier), by ``method``."""
    ledger = Ledger()
    ledger.record(step_event(sample_rate, noise_multiplier, micro_batches), steps)
    return ledger.epsilon(delta, method)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int | None = None,
    method: str = "prv",
    rtol: float = 1e-3,
    *,
    epochs: float | None = None,
    micro_batches: int = 1,
) -> float:
    """Noise multiplier σ (noise std ÷ max_grad_norm) such that the run is
    (``target_epsilon``, ``delta``)-DP under accountant ``method``.

    Args:
        target_epsilon: ε > 0.
        delta: δ, 0 < δ < 1.
        sample_rate: q per Poisson draw (logical batch / N for dpclip's sampler).
        steps: optimizer steps; or instead
        epochs: passes over the data, i.e. ``steps_for_epochs(epochs, q, k)`` steps.
        method: accountant name ("prv", "rdp", "pld", "gdp").
        rtol: relative tolerance on σ.
        micro_batches: k > 1 for k independent Poisson micro-batches per step
            (``IndependentPoissonGaussian``, accountable by "pld" only).

    ε is decreasing in σ, so a bracket [lo, hi] with ε(lo) > target >= ε(hi) is
    bisected until (hi - lo) <= rtol · hi. The returned σ is ``hi``: always on the
    safe side (ε(σ) <= target_epsilon) and at most ``rtol`` (relative) above the
    exact minimum.

    A σ below the answer whose ε the accountant cannot evaluate at bounded
    cost (``OutOfRangeError``) counts as missing the target: the returned σ
    is always one whose ε was evaluated.

    Raises:
        ValueError: bad arguments, a target_epsilon above ``MAX_TARGET_EPSILON``
            (100), or no σ <= 1e4 reaches the target.
    """
    target_epsilon = validate_positive("target_epsilon", target_epsilon)
    if target_epsilon > MAX_TARGET_EPSILON:
        raise ValueError(
            f"Expected target_epsilon={target_epsilon:g} <= {MAX_TARGET_EPSILON:g}: calibration "
            f"supports 0 < target_epsilon <= {MAX_TARGET_EPSILON:g} (beyond it a run keeps no "
            "meaningful privacy, and the accountants' grids grow with ε)"
        )
    delta = validate_delta(delta)
    sample_rate = validate_sample_rate(sample_rate)
    micro_batches = validate_int("micro_batches", micro_batches)
    if (steps is None) == (epochs is None):
        raise ValueError("pass exactly one of steps and epochs")
    steps = validate_int("steps", steps) if epochs is None else steps_for_epochs(epochs, sample_rate, micro_batches)
    if not (0.0 < rtol < 1.0):
        raise ValueError(f"Expected 0 < rtol={rtol!r} < 1")
    accountant = make_accountant(method)  # validates the name before any work
    _refuse_approximation(method, "calibration")
    if not accountant.supports(step_event(sample_rate, 1.0, micro_batches)):
        accountant.compose(step_event(sample_rate, 1.0, micro_batches))  # raises, naming who can

    def eps(sigma: float) -> float:
        return epsilon_for(
            sigma, delta=delta, sample_rate=sample_rate, steps=steps, method=method,
            micro_batches=micro_batches,
        )

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
        try:
            misses = eps(mid) > target_epsilon
        except OutOfRangeError:  # ε(mid) too large to evaluate: mid is below the answer
            misses = True
        if misses:
            lo = mid
        else:
            hi = mid
    return hi


#: Factors around the GDP estimate tried first by ``max_steps``.
_AROUND = (0.5, 0.7, 0.85, 0.95, 1.05, 1.15, 1.3, 1.6, 2.0)


def _gdp_guess(target_epsilon: float, delta: float, event: Event, spent: Ledger | None) -> int | None:
    """``max_steps`` under the GDP approximation (microseconds), or None where GDP cannot say."""
    try:
        return _max_steps(target_epsilon, delta, event.sample_rate, event.noise_multiplier, "gdp",
                         micro_batches=getattr(event, "micro_batches", 1), spent=spent)
    except (UnsupportedEventError, ValueError):
        return None


def max_steps(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    noise_multiplier: float,
    method: str = "prv",
    *,
    micro_batches: int = 1,
    spent: Ledger | None = None,
) -> int:
    """The most further steps whose total ε stays within ``target_epsilon``.

    Args:
        target_epsilon, delta: the budget.
        sample_rate, noise_multiplier, micro_batches: the step to repeat, as
            for ``calibrate_noise``.
        method: accountant name.
        spent: what the run has already recorded (default: nothing).

    Returns:
        T >= 0 with ε(spent + T steps) <= target_epsilon < ε(spent + T + 1 steps):
        bracketed ×16 at a time, then narrowed ninefold per round, each round
        one ``epsilon_curve`` (so PRV discretises once per round, not per count).

    Raises:
        ValueError: bad arguments, an approximate accountant ("gdp": a budget
            needs a bound), or more steps than the accountant can evaluate
            (10⁹; 10⁶ for "prv", whose grid grows with the step count).
    """
    _refuse_approximation(method, "a budget")
    return _max_steps(target_epsilon, delta, sample_rate, noise_multiplier, method,
                      micro_batches=micro_batches, spent=spent)


def _refuse_approximation(method: str, what: str) -> None:
    cls = ACCOUNTANTS.get(method)
    if cls is not None and cls.approximate:
        raise ValueError(
            f"accountant {method!r} is an approximation, not a bound: {what} needs one of "
            f"{sorted(m for m, c in ACCOUNTANTS.items() if not c.approximate)}"
        )


def _max_steps(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    noise_multiplier: float,
    method: str,
    *,
    micro_batches: int = 1,
    spent: Ledger | None = None,
) -> int:
    target_epsilon = validate_positive("target_epsilon", target_epsilon)
    delta = validate_delta(delta)
    event = step_event(
        validate_sample_rate(sample_rate),
        validate_noise_multiplier(noise_multiplier),
        validate_int("micro_batches", micro_batches),
    )
    make_accountant(method).compose(event)  # validates the method and that it accounts event
    if spent is not None and not isinstance(spent, Ledger):
        raise ValueError(f"Expected spent to be a Ledger, got {type(spent)}")

    base = spent.steps if spent is not None else 0

    def epsilons(counts: list[int]) -> list[float]:
        # One ledger, one curve: the accountant's set-up is shared by all the counts.
        trial = Ledger()
        if spent is not None:
            trial.merge(spent)
        trial.record(event, counts[-1])
        return [e for _, e in trial.epsilon_curve(delta, method, steps=[base + t for t in counts])]

    def first_failure(counts: list[int]) -> tuple[int | None, int | None]:
        """(largest count that fits before the first that does not, that first failing count)."""
        fit = None
        for t, eps in zip(counts, epsilons(counts)):
            if eps > target_epsilon:
                return fit, t
            fit = t
        return fit, None

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lo, hi = first_failure([1])
        if hi is not None:  # not even one more step fits
            found = 0
        else:
            lo = 1
            guess = _gdp_guess(target_epsilon, delta, event, spent) if method != "gdp" else None
            limit = MAX_PRV_STEPS if method == "prv" else MAX_STEPS
            if guess and guess > limit:
                raise ValueError(
                    f"the budget target_epsilon={target_epsilon} allows about {guess:.2g} steps, more "
                    f"than accountant {method!r} evaluates ({limit:.0e}); use pld or rdp"
                )
            if guess:  # the CLT estimate is close: bracket around it first
                fit, hi = first_failure(sorted({max(1, round(guess * f)) for f in _AROUND}))
                lo = fit if fit is not None else lo
            while hi is None:  # bracket: ×16 per round
                if lo * 16 > limit:
                    raise ValueError(
                        f"the budget target_epsilon={target_epsilon} allows more than "
                        f"{lo:.0e} steps at noise_multiplier={noise_multiplier}, past what accountant "
                        f"{method!r} evaluates ({limit:.0e})"
                    )
                fit, hi = first_failure([lo * 2**i for i in range(1, 5)])
                lo = fit if fit is not None else lo
            while hi - lo > 1:  # fits(lo) and not fits(hi): 9 sub-intervals per round
                n = min(8, hi - lo - 1)
                counts = sorted({lo + round((hi - lo) * (i + 1) / (n + 1)) for i in range(n)} - {lo, hi})
                fit, fail = first_failure(counts)
                lo = fit if fit is not None else lo
                hi = fail if fail is not None else hi
            # Curve points share one grid; confirm the answer with a fresh evaluation.
            while lo > 0 and epsilons([lo])[0] > target_epsilon:
                lo -= 1
            found = lo
    for message in {str(w.message): w for w in caught}.values():
        warnings.warn(message.message, message.category, stacklevel=2)
    return found
