"""Secure mode's randomness: laws of SecureRandom's draws, the floating-point hardening, refusals.

Statistical tests replace ``os.urandom`` with a seeded byte stream (the draws
are then reproducible) and derive tolerances from the sample size; references
are closed forms (normal CDF and moments, binomial pmf by exact integer
arithmetic), never the code under test.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip
import dpclip.secure as secure
from dpclip.optimizer import private_gradient
from dpclip.secure import SecureRandom


@pytest.fixture
def seeded_bytes(monkeypatch):
    """os.urandom replaced by a seeded stream; returns the list of byte counts requested."""
    rng = np.random.default_rng(20240613)
    requests: list[int] = []

    def fake_urandom(count: int) -> bytes:
        requests.append(count)
        return rng.bytes(count)

    monkeypatch.setattr(secure, "urandom", fake_urandom)
    return requests


def _binomial_pmf(n: int, p: float) -> list[Fraction]:
    q = Fraction(p)
    return [math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(n + 1)]


# normal


def test_uniforms_are_the_midpoints_of_2_to_the_52_cells():
    words = np.array([0, 2**64 - 1, 2**12 - 1, 2**12, 2**63], dtype=np.uint64)
    expected = [Fraction(2 * (int(w) >> 12) + 1, 2**53) for w in words]
    assert [Fraction(float(u)) for u in secure.uniforms_from_words(words)] == expected


def test_normal_mean_variance_and_ks_against_closed_forms(seeded_bytes):
    std, m = 2.5, 200_000
    z = SecureRandom().normal((m,), std, dtype=torch.float64).numpy()
    assert abs(z.mean()) < 5 * std / math.sqrt(m)
    assert abs(z.var() / std**2 - 1) < 5 * math.sqrt(2 / m)
    # fourth moment 3σ⁴ (a sum of the wrong shape, e.g. uniform parts, is off)
    assert abs(np.mean(z**4) / std**4 - 3) < 5 * math.sqrt(96 / m)
    assert stats.kstest(z / std, "norm").pvalue > 1e-3


def test_hardened_normal_variance_is_exactly_std_squared(seeded_bytes):
    # 4·10⁶ values: relative standard error of the variance √(2/m) ≈ 7e-4, so a
    # sum of 3 or 5 parts (variance 0.75 or 1.25) or a missing 1/2 fails by hundreds of SEs
    m = 4_000_000
    z = SecureRandom().normal((m,), 1.0, dtype=torch.float64)
    assert abs(float(z.square().mean()) - 1.0) < 5 * math.sqrt(2 / m)


def _on_grid_fraction(z: torch.Tensor) -> float:
    """The Box-Muller support attack (Jin et al. 2022, arXiv:2112.05307, for float64).

    If values k and k + m/2 came from one Box-Muller pair, u1 = exp(-(z0² + z1²)/2)
    is one of the uniforms (2x + 1)·2⁻⁵³. For large radii (u1 < e⁻⁷) float64
    recovers u1 to within 1/16 of a grid cell, so the offset from the grid tells
    whether the pair is raw Box-Muller output (offset ≈ 0) or not (offset uniform).
    """
    half = z.numel() // 2
    r2 = z[:half] ** 2 + z[half:] ** 2
    u1 = torch.exp(-r2[r2 > 14.0] / 2)
    assert u1.numel() > 100
    x = (u1 * 2.0**53 - 1) / 2
    return float(((x - torch.round(x)).abs() < 0.05).double().mean())


def test_support_attack_finds_raw_box_muller_but_not_the_hardened_sum(seeded_bytes):
    m = 1 << 18
    words = np.frombuffer(secure.urandom(8 * m), np.uint64)
    u = torch.from_numpy(secure.uniforms_from_words(words))
    # control: the detector recognises every large-radius pair of raw Box-Muller output
    assert _on_grid_fraction(secure.box_muller(u)) == 1.0
    # hardened: offsets uniform, so about 10% fall within 0.05 by chance (n > 100, SE < 0.03)
    assert _on_grid_fraction(SecureRandom().normal((m,), 1.0, dtype=torch.float64)) < 0.3


def test_normal_shape_dtype_device_and_chunks(seeded_bytes, monkeypatch):
    rng = SecureRandom()
    z = rng.normal((3, 4, 5), 1.0, dtype=torch.float32, device="cpu")
    assert z.shape == (3, 4, 5) and z.dtype == torch.float32 and z.device.type == "cpu"
    assert seeded_bytes == [4 * 8 * 60]  # four Gaussians of 8 bytes each per value
    assert rng.normal((0, 7), 1.0).shape == (0, 7)
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    assert torch.equal(rng.normal((2, 2), 0.0, dtype=torch.float64), zeros)
    monkeypatch.setattr(secure, "_CHUNK_VALUES", 7)
    seeded_bytes.clear()
    z = rng.normal((5, 5), 1.0, dtype=torch.float64)
    assert seeded_bytes == [4 * 8 * 7] * 3 + [4 * 8 * 4]
    assert torch.unique(z).numel() == 25  # every chunk filled, none repeated


def test_normal_draws_fresh_os_randomness_each_call():
    rng = SecureRandom()
    a, b = rng.normal((1000,), 1.0), rng.normal((1000,), 1.0)
    assert not torch.equal(a, b)
    assert not torch.equal(a, SecureRandom().normal((1000,), 1.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": (3, -1), "std": 1.0}, "shape entry=-1"),
        ({"shape": (3,), "std": -1.0}, "std=-1.0"),
        ({"shape": (3,), "std": math.nan}, "std=nan"),
        ({"shape": (3,), "std": 1.0, "dtype": torch.int64}, "dtype=torch.int64"),
    ],
)
def test_normal_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SecureRandom().normal(**kwargs)


# binomial


def test_binomial_small_n_matches_exact_pmf_by_chi_square(seeded_bytes):
    n, p, size = 10, 0.3, 20_000
    draws = SecureRandom().binomial(n, p, size)
    assert seeded_bytes == [8 * size]
    observed = np.bincount(draws, minlength=n + 1)
    expected = np.array([float(f) for f in _binomial_pmf(n, p)]) * size
    # pool the sparse upper tail so every cell expects at least 5
    cut = int(np.nonzero(expected >= 5)[0].max())
    obs = np.append(observed[:cut], observed[cut:].sum())
    exp = np.append(expected[:cut], expected[cut:].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_binomial_inverse_cdf_switches_at_the_exact_cdf():
    # the law is exact up to where scipy's float64 CDF rounds: check 1e-14 each side
    # of every exact CDF value F(k) = P(X <= k), computed in rational arithmetic
    n, p = 12, 0.37
    cdf = list(itertools.accumulate(_binomial_pmf(n, p)))
    for k in range(n):
        below, above = float(cdf[k]) - 1e-14, float(cdf[k]) + 1e-14
        assert secure.binomial_from_uniforms(np.array([below, above]), n, p).tolist() == [k, k + 1]


def test_binomial_large_n_mean_and_variance(seeded_bytes):
    n, p, size = 1_000_000, 0.01, 20_000
    x = np.array(SecureRandom().binomial(n, p, size), dtype=np.float64)
    mean, var = n * p, n * p * (1 - p)
    assert abs(x.mean() - mean) < 5 * math.sqrt(var / size)
    assert abs(x.var() / var - 1) < 5 * math.sqrt(2 / size)


def test_binomial_edges():
    rng = SecureRandom()
    assert rng.binomial(7, 0.0, 5) == [0] * 5
    assert rng.binomial(7, 1.0, 5) == [7] * 5
    assert rng.binomial(0, 0.5, 3) == [0] * 3
    assert rng.binomial(7, 0.5, 0) == []


@pytest.mark.parametrize(
    "n, p, size, message",
    [(-1, 0.5, 3, "n=-1"), (2.5, 0.5, 3, "n=2.5"), (True, 0.5, 3, "n=True"),
     (10, 1.5, 3, "p=1.5"), (10, math.nan, 3, "p=nan"), (10, 0.5, -2, "size=-2")],
)
def test_binomial_refuses_bad_arguments(n, p, size, message):
    with pytest.raises(ValueError, match=message):
        SecureRandom().binomial(n, p, size)


# subset


def test_subset_distinct_in_range_with_inclusion_frequency_k_over_n(seeded_bytes):
    n, k, draws = 20, 5, 4000
    rng = SecureRandom()
    counts = np.zeros(n)
    for _ in range(draws):
        s = rng.subset(n, k)
        assert len(s) == k and len(set(s)) == k and all(0 <= i < n for i in s)
        counts[s] += 1
    q = k / n
    assert np.all(np.abs(counts - draws * q) < 5 * math.sqrt(draws * q * (1 - q)))


def test_subset_order_is_uniform_over_ordered_triples(seeded_bytes):
    n, k, draws = 4, 3, 12_000
    rng = SecureRandom()
    cells = {t: i for i, t in enumerate(itertools.permutations(range(n), k))}
    observed = np.zeros(len(cells))
    for _ in range(draws):
        observed[cells[tuple(rng.subset(n, k))]] += 1
    assert stats.chisquare(observed).pvalue > 1e-3  # 24 equally likely ordered triples


def test_subset_edges():
    rng = SecureRandom()
    assert rng.subset(10, 0) == []
    assert rng.subset(0, 0) == []
    assert sorted(rng.subset(50, 50)) == list(range(50))


def test_ties_that_decide_the_subset_are_redrawn(monkeypatch):
    tie_inside = np.array([5, 1, 1, 9], dtype=np.uint64)
    tie_at_the_cut = np.array([5, 1, 3, 3], dtype=np.uint64)
    assert secure.first_k_by_keys(tie_inside, 2) is None
    assert secure.first_k_by_keys(tie_at_the_cut, 2) is None
    assert secure.first_k_by_keys(tie_inside, 4) is None
    assert secure.first_k_by_keys(np.array([9, 5, 5, 1], dtype=np.uint64), 1).tolist() == [3]
    assert secure.first_k_by_keys(np.array([5, 1, 3, 9], dtype=np.uint64), 2).tolist() == [1, 2]
    streams = iter([tie_at_the_cut, np.array([5, 1, 3, 9], dtype=np.uint64)])
    monkeypatch.setattr(secure, "urandom", lambda count: next(streams).tobytes())
    assert SecureRandom().subset(4, 2) == [1, 2]


@pytest.mark.parametrize("n, k, message", [(3, 4, "k=4 <= n=3"), (3, -1, "k=-1"), (-3, 0, "n=-3")])
def test_subset_refuses_bad_arguments(n, k, message):
    with pytest.raises(ValueError, match=message):
        SecureRandom().subset(n, k)


# private_gradient with the secure source


def test_private_gradient_secure_noise_std_is_sigma_c_over_l(seeded_bytes):
    sigma, C, L, m = 1.3, 0.7, 16.0, 200_000
    s = torch.linspace(-1, 1, m)
    out = private_gradient(
        s.clone(), noise_std=sigma * C, expected_batch_size=L, generator=SecureRandom()
    )
    assert out.dtype == torch.float32
    noise = (out - s / L).double()
    target = sigma * C / L
    assert abs(float(noise.mean())) < 5 * target / math.sqrt(m)
    assert abs(float(noise.std()) / target - 1) < 5 * math.sqrt(1 / (2 * m))


def test_private_gradient_secure_in_place_and_without_noise(seeded_bytes):
    s = torch.tensor([3.0, -6.0])
    assert torch.equal(
        private_gradient(s, noise_std=0.0, expected_batch_size=3, generator=SecureRandom()),
        torch.tensor([1.0, -2.0]),
    )
    out = private_gradient(
        s, noise_std=1.0, expected_batch_size=3, generator=SecureRandom(), inplace=True
    )
    assert out is s and not torch.equal(s, torch.tensor([3.0, -6.0]))


def test_private_gradient_refuses_another_generator_before_touching_the_sum():
    s = torch.ones(3)
    with pytest.raises(ValueError, match="Expected generator to be a torch.Generator or a "
                       "dpclip.secure.SecureRandom, got Generator"):
        private_gradient(s, noise_std=1.0, expected_batch_size=2,
                         generator=np.random.default_rng(0), inplace=True)
    assert torch.equal(s, torch.ones(3))


def _secure_run(**kwargs):
    torch.manual_seed(0)
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = nn.Linear(6, 3).double()
    engine = dpclip.PrivacyEngine(accountant="rdp", secure_mode=True)
    out = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(), data_loader=DataLoader(TensorDataset(x, y), batch_size=5),
        noise_multiplier=1.0, max_grad_norm=1.0, accumulation_steps=2, **kwargs,
    )
    return (engine, *out)


def test_secure_engine_draws_noise_and_batches_from_the_os():
    engine, model, opt, crit, loader = _secure_run()
    assert isinstance(opt.generator, SecureRandom)
    assert isinstance(engine._batch_sampler.generator, SecureRandom)
    for xb, yb in loader:
        crit(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        if engine.steps == 2:
            break
    state = engine.state_dict()
    assert state["secure_mode"] is True and state["rng"]["noise"] is None
    resumed, model2, opt2, crit2, loader2 = _secure_run()
    resumed.load_state_dict(state)  # fresh randomness: nothing to replay
    assert resumed.steps == 2
    total = sum(1 for _ in loader2)
    assert total == 4 * 2  # a fresh pass: N // L = 4 logical batches of k = 2


def test_secure_engine_refuses_what_would_not_be_secure():
    with pytest.raises(ValueError, match="leave noise_generator out"):
        _secure_run(noise_generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="dpclip's own Poisson sampler"):
        _secure_run(poisson_sampling=False)
    engine, *_ = _secure_run()
    insecure = dpclip.PrivacyEngine(accountant="rdp")
    model = nn.Linear(6, 3).double()
    insecure.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(torch.randn(40, 6).double(), torch.randint(0, 3, (40,))), batch_size=5),
        noise_multiplier=1.0, max_grad_norm=1.0, accumulation_steps=2,
    )
    with pytest.raises(ValueError, match="secure_mode"):
        insecure.load_state_dict(engine.state_dict())
