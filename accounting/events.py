"""Immutable descriptions of the randomised mechanisms a training run applied.

An event says *what happened* in one optimizer step; accountants (``rdp``,
``prv``, ``pld``, ``gdp``) turn a sequence of events into (ε, δ). Events never change
meaning: a new kind of mechanism gets a new event class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "CountedShuffledGaussian",
    "Event",
    "IndependentPoissonGaussian",
    "PoissonGaussian",
    "ShuffledGaussian",
    "validate_int",
    "validate_noise_multiplier",
    "validate_positive",
    "validate_sample_rate",
]


def validate_int(name: str, value: int, minimum: int = 1) -> int:
    """Return ``value``, or raise ``ValueError`` naming ``name`` unless an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected {name}={value!r} to be an int >= {minimum}")
    return value


def validate_positive(name: str, value: float) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming ``name`` unless finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value < math.inf):
        raise ValueError(f"Expected {name}={value!r} to be a finite number > 0")
    return float(value)


def validate_sample_rate(sample_rate: float) -> float:
    """Return ``sample_rate`` as a float, or raise ``ValueError`` unless 0 < q <= 1."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
        raise ValueError(f"Expected sample_rate to be a number, got {sample_rate!r}")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"Expected 0 < sample_rate={sample_rate} <= 1")
    return float(sample_rate)


def validate_noise_multiplier(noise_multiplier: float) -> float:
    """Return ``noise_multiplier`` as a float, or raise ``ValueError`` unless finite and >= 0."""
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)):
        raise ValueError(f"Expected noise_multiplier to be a number, got {noise_multiplier!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0.0):
        raise ValueError(f"Expected noise_multiplier={noise_multiplier} to be finite and >= 0")
    return float(noise_multiplier)


@dataclass(frozen=True, slots=True)
class PoissonGaussian:
    """One step of the Poisson-subsampled Gaussian mechanism (DP-SGD step).

    Every example joins the logical batch independently with probability
    ``sample_rate``; the sum of the clipped per-example gradients (each of L2
    norm at most C) gets Gaussian noise of std ``noise_multiplier · C``.

    Attributes:
        sample_rate: q, probability that one example is in the logical batch
            (unitless, 0 < q <= 1). For dpclip: expected logical batch / N.
        noise_multiplier: σ, noise std divided by the clipping bound C
            (unitless, >= 0). σ = 0 means no privacy (ε = ∞).

    A Poisson draw at rate q split afterwards into k micro-batches is this very
    event: the split does not change which examples meet the noise.
    """

    sample_rate: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        validate_sample_rate(self.sample_rate)
        validate_noise_multiplier(self.noise_multiplier)


@dataclass(frozen=True, slots=True)
class IndependentPoissonGaussian:
    """k independent Poisson micro-batches at rate q each, summed under one noise draw.

    What a user gets by accumulating k micro-batches from an Opacus
    ``DPDataLoader`` (each drawn independently at q) before one noisy step.
    An example lands in Binomial(k, q) of the micro-batches, so its
    contribution to the sum has sensitivity j·C with probability
    C(k, j) q^j (1 - q)^(k - j): a mixture of Gaussians (Choquette-Choo et al.
    2023, arXiv:2310.15526), which only the PLD accountant composes exactly.
    Recording it as one Poisson step at k·q (what Opacus does) under-counts ε.

    Attributes:
        sample_rate: q, each micro-batch's per-example inclusion probability (0 < q <= 1).
        noise_multiplier: σ, noise std divided by the clipping bound C (>= 0).
        micro_batches: k >= 1, micro-batches summed before the noise.
    """

    sample_rate: float
    noise_multiplier: float
    micro_batches: int

    def __post_init__(self) -> None:
        validate_sample_rate(self.sample_rate)
        validate_noise_multiplier(self.noise_multiplier)
        validate_int("micro_batches", self.micro_batches)

    def sensitivity_distribution(self) -> tuple[list[float], list[float]]:
        """(sensitivities 0..k in units of C, their Binomial(k, q) probabilities)."""
        k, q = self.micro_batches, self.sample_rate
        return (
            [float(j) for j in range(k + 1)],
            [math.comb(k, j) * q**j * (1.0 - q) ** (k - j) for j in range(k + 1)],
        )


@dataclass(frozen=True, slots=True)
class ShuffledGaussian:
    """One step over shuffled fixed-size batches (a pass over a permutation), Gaussian noise.

    What a plain shuffled ``DataLoader`` gives (dpclip's ``poisson_sampling=False``).
    No amplification-by-sampling theorem covers this scheme: the ε usually
    quoted for it is the Poisson one at q = batch / N, which is *not* a
    guarantee (Chua et al. 2024, arXiv:2403.17673, show shuffling can be much
    worse). ``Ledger.epsilon`` reports that figure with a warning, or with
    ``no_amplification=True`` a sound bound: every example is in at most one
    batch per epoch, so each epoch costs one Gaussian mechanism of
    sensitivity C (as TF Privacy's ``compute_dp_sgd_privacy_statement``).

    Attributes:
        sample_rate: batch size / N (unitless, 0 < q <= 1), for the Poisson figure.
        noise_multiplier: σ, noise std divided by the clipping bound C (>= 0).
        steps_per_epoch: optimizer steps in one pass over the loader (>= 1); the
            bound counts ceil(steps / steps_per_epoch) epochs per ledger run,
            which assumes each run of steps starts with a fresh pass.
    """

    sample_rate: float
    noise_multiplier: float
    steps_per_epoch: int

    def __post_init__(self) -> None:
        validate_sample_rate(self.sample_rate)
        validate_noise_multiplier(self.noise_multiplier)
        validate_int("steps_per_epoch", self.steps_per_epoch)


@dataclass(frozen=True, slots=True)
class CountedShuffledGaussian:
    """One step over batches that are not Poisson draws, with the examples' uses counted.

    What dpclip records for ``poisson_sampling=False``. As for
    ``ShuffledGaussian``, no amplification by sampling is guaranteed; the sound
    bound counts what really happened to each example instead of assuming
    one use per epoch, so it stays a bound when a pass is cut short, resumed
    mid-epoch, or repeats examples (``RandomSampler(num_samples=2N)``).

    An example i that appears m_{i,s} times in step s's batch adds m_{i,s}·C to
    that step's sum: a Gaussian mechanism with μ = m_{i,s}/σ. Gaussian
    mechanisms compose by adding μ² (Dong, Roth & Su 2019, Cor. 3.3), so i's
    loss over the run is that of W_i = Σ_s m_{i,s}² Gaussian mechanisms at σ,
    and the run's is that of the worst example, W = max_i W_i. ``added_uses`` is
    how much this step raised W; a run's events sum to its W.

    Attributes:
        sample_rate: batch size / N (unitless, 0 < q <= 1), for the Poisson figure
            (not a guarantee).
        noise_multiplier: σ, noise std divided by the clipping bound C (>= 0).
        added_uses: the increase of W = max_i Σ_s m_{i,s}² that this step caused
            (int >= 0; 0 when no example reached the running maximum).
    """

    sample_rate: float
    noise_multiplier: float
    added_uses: int

    def __post_init__(self) -> None:
        validate_sample_rate(self.sample_rate)
        validate_noise_multiplier(self.noise_multiplier)
        validate_int("added_uses", self.added_uses, minimum=0)


#: Any event a ledger records.
Event = PoissonGaussian | IndependentPoissonGaussian | ShuffledGaussian | CountedShuffledGaussian
