"""Noise and batch sampling from the operating system's cryptographic generator (secure mode).

DP-SGD's guarantee assumes the adversary cannot predict the noise or the
Poisson sample. torch's generators (Mersenne Twister, Philox) are statistical
generators: their state can be recovered from outputs or guessed from a seed,
and then the noise can be subtracted. ``SecureRandom`` takes every random bit
from ``os.urandom`` (the kernel CSPRNG: ``getrandom(2)`` on Linux), keeps no
state, and has no seed.

Gaussian noise is also hardened against floating-point attacks (Mironov 2012;
Jin et al. 2022, arXiv:2112.05307, which attacks Opacus's Box-Muller noise by
recovering the uniforms behind an output and testing candidate gradients):
each value is the sum of 2n = 4 independent Gaussians of std σ/2, as proposed
by Holohan & Braghin 2021 (arXiv:2107.10138, §5.1) and used by Opacus's
``secure_mode``. The sum is exactly N(0, σ²); inverting it requires searching
2^(p(2n-1)) = 2^159 candidates for p = 53 mantissa bits, instead of 2^53.
See docs/secure_mode.md for what this does and does not protect against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import urandom

import numpy as np
import torch
from scipy import stats

__all__ = [
    "SecureRandom",
    "binomial_from_uniforms",
    "box_muller",
    "first_k_by_keys",
    "hardened_normal",
    "uniforms_from_words",
]

_WORD_BYTES = 8
_GAUSSIANS_PER_VALUE = 4  # 2n with n = 2 (Holohan & Braghin 2021, §5.1)
_CHUNK_VALUES = 1 << 20  # noise values drawn at once: bounds memory to ~64 MiB per chunk


def uniforms_from_words(words: np.ndarray) -> np.ndarray:
    """Uniforms on the open interval (0, 1) from random 64-bit words.

    Each word's top 52 bits x give (2x + 1)·2⁻⁵³: the midpoints of 2⁵² equal
    cells of [0, 1), all exactly representable in float64, never 0 or 1 (so
    ``log`` and inverse CDFs stay finite).

    Args:
        words: uint64 array of independent uniformly random words.

    Returns:
        float64 array of the same shape.
    """
    bits = words >> np.uint64(12)
    bits |= np.uint64(0x3FF0000000000000)  # the float64 1 + x·2⁻⁵²: no int-to-float pass
    u = bits.view(np.float64)
    u -= 1.0 - 2.0**-53  # exact by Sterbenz's lemma: both operands lie in [1/2, 2]
    return u


def box_muller(u: torch.Tensor) -> torch.Tensor:
    """Standard normals from uniforms in (0, 1) by the Box-Muller transform.

    The first half of ``u`` gives the radii, the second half the angles; each
    (radius, angle) pair gives two independent N(0, 1) values, r·cos θ and
    r·sin θ. With the 2⁻⁵³ grid of ``uniforms_from_words`` a value is at most
    √(106 ln 2) ≈ 8.57 in magnitude (the missing tail has mass 2⁻⁵³ per pair).

    Args:
        u: float64 tensor of even length.

    Returns:
        float64 tensor of the same length, on ``u``'s device.
    """
    half = u.numel() // 2
    radius = torch.sqrt(-2.0 * torch.log(u[:half]))
    angle = (2.0 * math.pi) * u[half:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])


def hardened_normal(u: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std²) values, each the sum of four independent N(0, std²/4) (float64).

    Holohan & Braghin 2021 (arXiv:2107.10138, §5.1): a sum of 2n independent
    Gaussians of variance σ²/(2n) is exactly N(0, σ²), and an output can no
    longer be traced back to the few uniforms that made it. n = 2 as in Opacus.

    Args:
        u: float64 uniforms in (0, 1), 4·m of them for m values.
        std: σ, the standard deviation of each value (>= 0).

    Returns:
        float64 tensor of m values on ``u``'s device.
    """
    parts = box_muller(u).view(_GAUSSIANS_PER_VALUE, -1)
    # (a + b + c + d) / 2 has variance 4/4 = 1; halving is exact in floating point
    return parts.sum(dim=0).mul_(0.5 * std)


def binomial_from_uniforms(u: np.ndarray, n: int, p: float) -> np.ndarray:
    """Binomial(n, p) draws by the inverse CDF of uniforms in (0, 1).

    Draw i is the smallest k with F(k) >= u[i], where F is the Binomial(n, p)
    CDF as scipy evaluates it in float64: exact except within about 1e-15 of
    each CDF value (tests check 1e-14 against rational arithmetic), so the law
    is within a total variation of order 1e-15 per support point of the exact
    one. That distance is independent of the data.

    Returns:
        int64 array, same shape as ``u``.
    """
    return stats.binom.ppf(u, n, p).astype(np.int64)


def first_k_by_keys(keys: np.ndarray, k: int) -> np.ndarray | None:
    """The indices of the k smallest keys, smallest first; None if a tie decides them.

    With i.i.d. keys the result is a uniformly random ordered k-subset of
    range(len(keys)): the keys' law is invariant under permuting the
    indices, and so is the event that no tie decides the answer, so
    conditional on that event every ordered k-subset is equally likely.
    A caller that gets None draws fresh keys.
    """
    n = keys.size
    if k == 0:
        return np.empty(0, dtype=np.int64)
    if k < n:
        part = np.argpartition(keys, k)  # part[k] holds the (k+1)-th smallest key
        chosen = part[:k]
        if keys[chosen].max() == keys[part[k]]:
            return None
    else:
        chosen = np.arange(n)
    chosen = chosen[np.argsort(keys[chosen], kind="stable")]
    ordered = keys[chosen]
    if np.any(ordered[1:] == ordered[:-1]):
        return None
    return chosen


def _validate_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"Expected {name}={value!r} to be an integer >= 0")
    return int(value)


def _words(count: int) -> np.ndarray:
    return np.frombuffer(urandom(count * _WORD_BYTES), dtype=np.uint64)


class SecureRandom:
    """Randomness from the OS's cryptographically secure generator; no seed, no state.

    Every call reads fresh bytes from ``os.urandom``. The kernel generator
    (ChaCha20 on Linux) is used directly rather than a user-space stream
    keyed from it: measured on the development machine it is faster than
    ``hashlib.shake_256`` keyed by fresh OS bytes (about 510 MB/s against
    420 MB/s) and leaves no key in the process's memory.

    There is nothing to save or restore: runs cannot be replayed and a
    resumed run continues with fresh randomness (``state_dict()`` records no
    generator state in secure mode). That is the point: a state that can be
    saved can be stolen.

    Example::

        rng = SecureRandom()
        noise = rng.normal((3, 4), 0.5, dtype=torch.float32, device="cpu")
        sizes = rng.binomial(60_000, 0.004, 10)   # Poisson logical batch sizes
        batch = rng.subset(60_000, sizes[0])      # which examples, in random order
    """

    def normal(
        self,
        shape: Sequence[int],
        std: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """i.i.d. N(0, std²) values, hardened against floating-point attacks.

        Each value is computed in float64 as the sum of four Box-Muller
        Gaussians of std/2 (``hardened_normal``), then cast to ``dtype``. The
        uniforms are drawn on the CPU and the arithmetic runs on ``device``.
        Costs 32 random bytes per value.

        Args:
            shape: the output's shape.
            std: standard deviation, in the output's units (>= 0; 0 gives zeros).
            dtype: a floating-point dtype.
            device: where the result lives.
        """
        dims = tuple(_validate_count("shape entry", d) for d in shape)
        std = float(std)
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"Expected std={std} to be finite and >= 0")
        if not dtype.is_floating_point:
            raise ValueError(f"Expected dtype={dtype} to be a floating-point dtype")
        out = torch.empty(dims, dtype=dtype, device=device)
        if std == 0.0:
            return out.zero_()
        flat = out.view(-1)
        for start in range(0, flat.numel(), _CHUNK_VALUES):
            m = min(_CHUNK_VALUES, flat.numel() - start)
            u = torch.from_numpy(uniforms_from_words(_words(_GAUSSIANS_PER_VALUE * m)))
            flat[start : start + m] = hardened_normal(u.to(out.device), std)
        return out

    def binomial(self, n: int, p: float, size: int) -> list[int]:
        """``size`` independent Binomial(n, p) draws (``binomial_from_uniforms``).

        Args:
            n: number of trials (the dataset size N for Poisson sampling).
            p: success probability in [0, 1] (the sample rate q).
            size: how many draws.
        """
        n = _validate_count("n", n)
        size = _validate_count("size", size)
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Expected p={p} to be in [0, 1]")
        u = uniforms_from_words(_words(size))
        return binomial_from_uniforms(u, n, p).tolist()

    def subset(self, n: int, k: int) -> list[int]:
        """A uniformly random k-subset of range(n) in uniformly random order.

        The law of ``torch.randperm(n)[:k]``: the k smallest of n random
        64-bit keys, in key order (``first_k_by_keys``); O(n) time and 8·n
        random bytes. Keys are redrawn in the rare case (probability below
        n²/2⁶⁵) that a tie would decide the answer.

        Args:
            n: population size (the dataset size N).
            k: subset size, 0 <= k <= n.
        """
        n = _validate_count("n", n)
        k = _validate_count("k", k)
        if k > n:
            raise ValueError(
                f"Expected k={k} <= n={n}: a subset cannot be larger than the population"
            )
        if k == 0:
            return []
        while True:
            chosen = first_k_by_keys(_words(n), k)
            if chosen is not None:
                return chosen.tolist()

    def __repr__(self) -> str:
        return "SecureRandom(os.urandom)"
