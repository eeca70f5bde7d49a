"""Property tests over random small models, k, B, loop styles, empty micro-batches and
resume points: the σ = 0 update equals the torch.func reference, the ledger equals the
steps taken, and resume (into a fresh engine seeded like the first) is bit-exact."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from accounting import PoissonGaussian
from tests.dpclip.models import reference_update

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEATURES, CLASSES, N = 5, 3, 24


def _model(widths: list[int], norm: bool) -> nn.Module:
    layers: list[nn.Module] = []
    width = FEATURES
    for w in widths:
        layers += [nn.Linear(width, w), nn.Tanh()]
        if norm:
            layers.append(nn.LayerNorm(w))
        width = w
    layers.append(nn.Linear(width, CLASSES))
    return nn.Sequential(*layers).double()


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, FEATURES, generator=gen, dtype=torch.float64), torch.randint(0, CLASSES, (N,), generator=gen)


def _private(model, x, y, *, b, k, sigma, poisson=True, seed=0):
    engine = dpclip.PrivacyEngine(accountant="rdp")
    out = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        criterion=nn.CrossEntropyLoss(), data_loader=DataLoader(TensorDataset(x, y), batch_size=b),
        noise_multiplier=sigma, max_grad_norm=0.3, accumulation_steps=k, poisson_sampling=poisson,
        noise_generator=torch.Generator().manual_seed(seed + 1),
        sample_generator=torch.Generator().manual_seed(seed + 2),
    )
    return (engine, *out)


def _micro_batch(model, opt, crit, xb, yb):
    if len(yb) == 0:
        opt.add_empty_micro_batch()
    else:
        crit(model(xb), yb).backward()


@SETTINGS
@given(
    widths=st.lists(st.integers(1, 6), min_size=0, max_size=2),
    norm=st.booleans(),
    k=st.integers(1, 3),
    b=st.integers(1, 4),
    sizes=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    style=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_sigma_zero_update_equals_the_per_example_reference(widths, norm, k, b, sizes, style, seed):
    torch.manual_seed(seed)
    model = _model(widths, norm)
    reference = copy.deepcopy(model)
    x, y = _data(seed)
    engine, model, opt, crit, _ = _private(model, x, y, b=b, k=k, sigma=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sizes = sizes[:k]  # k micro-batches, some possibly empty, of any size
    start, micro = 0, []
    for size in sizes:
        micro.append((x[start:start + size], y[start:start + size]))
        start += size
    for xb, yb in micro:
        _micro_batch(model, opt, crit, xb, yb)
        if style == 1:
            opt.step()
            opt.zero_grad()
    if style == 2:
        opt.step()
    assert engine.steps == 1
    used = sum(sizes)
    if used == 0:
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), before[n])  # nothing to learn from, σ = 0
        return
    expected, _ = reference_update(reference, before, x[:used], y[:used], 0.3, k * b)
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), expected[n], rtol=1e-9, atol=1e-12)


@SETTINGS
@given(
    k=st.integers(1, 3),
    b=st.integers(1, 4),
    steps=st.integers(1, 6),
    style=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_the_ledger_holds_exactly_the_steps_taken(k, b, steps, style, seed):
    x, y = _data(seed)
    engine, model, opt, crit, loader = _private(_model([4], False), x, y, b=b, k=k, sigma=1.0, seed=seed)
    taken = 0
    while taken < steps:
        for i, (xb, yb) in enumerate(loader):
            _micro_batch(model, opt, crit, xb, yb)
            if style == 1:
                taken += opt.step() is None and opt.micro_batches_accumulated == 0
                opt.zero_grad()
            elif (i + 1) % k == 0:
                opt.step()
                opt.zero_grad()
                taken += 1
            if taken == steps:
                break
    assert engine.steps == steps
    assert engine.ledger.entries == ((PoissonGaussian(k * b / N, 1.0), steps),)


@SETTINGS
@given(
    k=st.integers(1, 3),
    total=st.integers(2, 8),
    resume_fraction=st.floats(0.1, 0.9),
    style=st.sampled_from([1, 2]),
    poisson=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_resume_at_any_step_is_bit_exact(k, total, resume_fraction, style, poisson, seed):
    x, y = _data(seed)
    save_at = max(1, min(total - 1, round(total * resume_fraction)))

    def train(engine, model, opt, crit, loader, until, state_at=None):
        saved = None
        while engine.steps < until:
            for i, (xb, yb) in enumerate(loader):
                _micro_batch(model, opt, crit, xb, yb)
                before = engine.steps
                if style == 1 or (i + 1) % k == 0 or i + 1 == len(loader):
                    opt.step()
                    opt.zero_grad()
                if engine.steps > before and engine.steps == state_at:
                    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
                             engine.state_dict())
                if engine.steps == until:
                    break
        return saved

    torch.manual_seed(seed)
    init = _model([4], False).state_dict()

    def fresh():
        model = _model([4], False)
        model.load_state_dict(init)
        return _private(model, x, y, b=2, k=k, sigma=1.0, poisson=poisson, seed=seed)

    full = fresh()
    train(*full, until=total)
    first = fresh()
    model_state, opt_state, engine_state = train(*first, until=save_at, state_at=save_at)
    second = fresh()
    second[1].load_state_dict(model_state)
    second[2].load_state_dict(opt_state)
    second[0].load_state_dict(engine_state)
    train(*second, until=total)
    for (n, p), q in zip(full[1].named_parameters(), second[1].parameters()):
        assert torch.equal(p, q), n
    assert second[0].ledger.entries == full[0].ledger.entries
