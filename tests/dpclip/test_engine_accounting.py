"""The engine records the privacy event of the sampling that actually happened."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset

import accounting as acc
import dpclip
from tests.dpclip.models import MLP, make_data, reference_update

N, SEED = 60, 7


def _setup(accountant="pld", **loader_kwargs):
    gen = torch.Generator().manual_seed(0)
    x, y = make_data("mlp", N, gen, torch.float64)
    torch.manual_seed(0)
    model = MLP().double()
    reference_model = MLP().double()
    reference_model.load_state_dict(model.state_dict())
    dataset = TensorDataset(x, y)
    loader = DPDataLoader(dataset, sample_rate=0.1, generator=torch.Generator().manual_seed(SEED))
    engine = dpclip.PrivacyEngine(accountant=accountant)
    kwargs = dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        criterion=nn.CrossEntropyLoss(),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        noise_generator=torch.Generator().manual_seed(1),
    )
    kwargs.update(loader_kwargs)
    return engine, kwargs, reference_model, x, y


def test_opacus_dp_data_loader_accumulated_is_an_exact_mixture():
    engine, kwargs, reference_model, x, y = _setup()
    model, opt, crit, loader = engine.make_private(accumulation_steps=3, **kwargs)
    # The user's own sampler draws the micro-batches: the same seed gives the same batches.
    replica = UniformWithReplacementSampler(
        num_samples=N, sample_rate=0.1, generator=torch.Generator().manual_seed(SEED)
    )
    expected_batches = list(replica)
    assert len(loader) == len(expected_batches) == 10
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen, first_three = [], []
    for i, (xb, yb) in enumerate(loader):
        seen.append(len(yb))
        if i < 3:
            first_three.append((xb, yb))
        crit(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        if i == 2:  # the first logical batch: 3 independent draws, divided by L = 3·q·N
            x3 = torch.cat([b[0] for b in first_three])
            y3 = torch.cat([b[1] for b in first_three])
            expected, _ = reference_update(reference_model, initial, x3, y3, 0.5, 3 * 0.1 * N)
            for name, p in model.named_parameters():
                torch.testing.assert_close(initial[name] - p.detach(), expected[name], atol=1e-12, rtol=0)
    assert seen == [len(b) for b in expected_batches]
    # 10 draws at k = 3: three logical batches of 3 and a last one of 1.
    assert engine.ledger.entries == (
        (acc.IndependentPoissonGaussian(0.1, 0.0, 3), 3),
        (acc.PoissonGaussian(0.1, 0.0), 1),
    )
    assert engine.plan.logical_batch_size == pytest.approx(18.0)
    assert engine.plan.sampling is dpclip.sampling.Sampling.INDEPENDENT_POISSON


def test_mixture_needs_an_accountant_that_can_account_it_and_says_which():
    engine, kwargs, *_ = _setup(accountant="prv")
    hooks_before = sum(len(m._forward_hooks) for m in kwargs["module"].modules())
    with pytest.raises(ValueError, match=r"accountant='prv'.*IndependentPoissonGaussian.*'pld'"):
        engine.make_private(accumulation_steps=2, **kwargs)
    assert sum(len(m._forward_hooks) for m in kwargs["module"].modules()) == hooks_before
    assert engine.optimizer is None


@pytest.mark.parametrize("batching", [dict(accumulation_steps=1), dict(max_physical_batch_size=4)])
def test_opacus_dp_data_loader_as_one_poisson_draw_per_step(batching):
    engine, kwargs, *_ = _setup(accountant="rdp")
    model, opt, crit, loader = engine.make_private(**batching, **kwargs)
    for xb, yb in loader:
        crit(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    assert engine.ledger.entries == ((acc.PoissonGaussian(0.1, 0.0), 10),)
    assert engine.plan.logical_batch_size == pytest.approx(6.0)


def test_opacus_dp_data_loader_refuses_poisson_sampling_false():
    engine, kwargs, *_ = _setup()
    with pytest.raises(ValueError, match="DPDataLoader"):
        engine.make_private(accumulation_steps=2, poisson_sampling=False, **kwargs)


def test_make_private_with_epsilon_calibrates_for_the_mixture(monkeypatch):
    calls = []

    def fake_calibrate(**kwargs):
        calls.append(kwargs)
        return 1.25

    monkeypatch.setattr(acc, "calibrate_noise", fake_calibrate)
    engine, kwargs, *_ = _setup()
    kwargs.pop("noise_multiplier")
    engine.make_private_with_epsilon(
        accumulation_steps=3, target_epsilon=2.0, target_delta=1e-5, epochs=2, **kwargs
    )
    assert len(calls) == 1
    assert calls[0]["micro_batches"] == 3  # k independent draws per step: the mixture
    assert calls[0]["sample_rate"] == 0.1  # each draw's rate, not k·q
    assert calls[0]["steps"] == 2 * 4  # 10 draws per epoch in groups of 3 (the last short)
    assert calls[0]["method"] == "pld"
    assert engine.noise_multiplier == 1.25


def test_shuffled_batches_record_shuffled_steps_and_offer_the_sound_bound():
    gen = torch.Generator().manual_seed(0)
    x, y = make_data("mlp", 64, gen, torch.float64)
    model = MLP().double()
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, opt, crit, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        accumulation_steps=2,
        poisson_sampling=False,
    )
    for _ in range(3):
        for xb, yb in loader:
            crit(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
    # one new use of the worst example at each epoch's first step, none in the other three
    epoch = ((acc.CountedShuffledGaussian(16 / 64, 2.0, 1), 1), (acc.CountedShuffledGaussian(16 / 64, 2.0, 0), 3))
    assert engine.ledger.entries == epoch * 3
    with pytest.warns(acc.SamplingAssumptionWarning):
        assumed = engine.get_epsilon(1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sound = engine.get_epsilon(1e-5, no_amplification=True)
    # Three epochs, each example once per epoch: three Gaussian mechanisms at σ = 2.
    three_gaussians = acc.Ledger()
    three_gaussians.record(acc.PoissonGaussian(1.0, 2.0), 3)
    assert sound == pytest.approx(three_gaussians.epsilon(1e-5, "rdp"))
    assert sound > assumed


def _worst_uses(batches_per_step):
    """Independent count: max over examples of Σ over steps of (times in that step)²."""
    totals = {}
    for step in batches_per_step:
        counts = {}
        for i in step:
            counts[i] = counts.get(i, 0) + 1
        for i, m in counts.items():
            totals[i] = totals.get(i, 0) + m * m
    return max(totals.values())


def _gaussians(n, sigma):
    ledger = acc.Ledger()
    ledger.record(acc.PoissonGaussian(1.0, sigma), n)
    return ledger.epsilon(1e-5, "rdp")


def _shuffled_run(sampler_of, n=100, batch_size=30, k=1, drop_last=False):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(3)
    x, y = make_data("mlp", n, gen, torch.float64)
    dataset = TensorDataset(x, y, torch.arange(n))
    model = MLP().double()
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, opt, crit, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(dataset, batch_size=batch_size, sampler=sampler_of(dataset), drop_last=drop_last),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, accumulation_steps=k,
    )
    return engine, model, opt, crit, loader


def _train(model, opt, crit, loader, steps=None):
    """Loop style 1 over one pass (or ``steps`` optimizer steps of it); the examples of each step."""
    seen, current = [], []
    for xb, yb, ib in loader:
        crit(model(xb), yb).backward()
        current += ib.tolist()
        if opt.step() is not None or opt.micro_batches_accumulated == 0:
            seen.append(current)
            current = []
            if steps is not None and len(seen) == steps:
                break
    return seen


def test_shuffled_with_drop_last_counts_the_examples_uses():
    engine, model, opt, crit, loader = _shuffled_run(torch.utils.data.RandomSampler, drop_last=True)
    seen = []
    for _ in range(10):
        seen += _train(model, opt, crit, loader)
    assert engine.steps == 30
    worst = _worst_uses(seen)
    assert engine.get_epsilon(1e-5, no_amplification=True) == pytest.approx(_gaussians(worst, 1.0))


def test_passes_cut_short_count_every_use():
    # Four passes of 2 of 4 steps each: 8 steps, which a per-epoch count calls 2 epochs, but
    # reshuffled passes reuse examples; the bound counts the uses that happened.
    engine, model, opt, crit, loader = _shuffled_run(torch.utils.data.RandomSampler, n=40, batch_size=10)
    seen = []
    for _ in range(4):
        seen += _train(model, opt, crit, loader, steps=2)
    assert engine.steps == 8
    worst = _worst_uses(seen)
    assert worst > 2  # 20 of 40 examples per pass: some example is in three or four passes
    assert engine.get_epsilon(1e-5, no_amplification=True) == pytest.approx(_gaussians(worst, 1.0))


@pytest.mark.parametrize(
    "sampler_of",
    [
        lambda d: torch.utils.data.RandomSampler(d, num_samples=2 * len(d)),
        lambda d: torch.utils.data.SubsetRandomSampler([0, 1, 2, 3, 0, 0, 5, 6, 7, 8] * 3),
    ],
    ids=["random-2N", "subset-with-repeats"],
)
def test_samplers_that_repeat_examples_within_a_pass_are_counted(sampler_of):
    engine, model, opt, crit, loader = _shuffled_run(sampler_of, n=40, batch_size=10, k=2)
    seen = _train(model, opt, crit, loader)
    worst = _worst_uses(seen)
    epochs = -(-engine.steps // engine.plan.steps_per_epoch)
    assert worst > epochs  # what counting one use per epoch would have claimed
    assert engine.get_epsilon(1e-5, no_amplification=True) == pytest.approx(_gaussians(worst, 1.0))


def test_shuffled_refuses_a_loader_that_samples_with_replacement():
    x, y = make_data("mlp", 40, torch.Generator().manual_seed(0), torch.float64)
    dataset = TensorDataset(x, y)
    model = MLP().double()
    with pytest.raises(ValueError, match="with replacement"):
        dpclip.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(dataset, batch_size=8,
                                   sampler=torch.utils.data.RandomSampler(dataset, replacement=True)),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
        )


def _poisson_run(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = make_data("mlp", N, gen, torch.float64)
    torch.manual_seed(seed)
    model = MLP().double()
    own = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True, generator=gen)
    engine = dpclip.PrivacyEngine(accountant="prv")
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(), data_loader=own, noise_multiplier=1.0,
        max_grad_norm=1.0, accumulation_steps=2, sample_generator=torch.Generator().manual_seed(3),
        noise_generator=torch.Generator().manual_seed(4),
    )
    return engine, model, optimizer, criterion, loader, own


def _train_steps(model, optimizer, criterion, batches, steps):
    it = iter(batches)
    for _ in range(steps):
        for _ in range(2):
            xb, yb = next(it)
            criterion(model(xb), yb).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_steps_on_batches_the_returned_loader_did_not_draw_are_flagged_in_warning_and_report():
    # a user's loop over their own DataLoader (default poisson_sampling=True): the ledger
    # records Poisson steps at q that no Poisson sampler drew, so ε would understate the loss
    engine, model, optimizer, criterion, loader, own = _poisson_run()
    with pytest.warns(UserWarning, match="did not hand out"):
        _train_steps(model, optimizer, criterion, own, 2)
    assert engine.steps == 2 and engine.foreign_steps == 2
    report = engine.report(delta=1e-5)
    assert any("2 of 2 steps" in w and "none is a bound for this run" in w for w in report.warnings)
    state = engine.state_dict()
    assert state["foreign_steps"] == 2
    assert any("2 of 2 steps" in w for w in dpclip.report.make_report(state, 1e-5).warnings)
    # a resumed run keeps the count
    engine2, *_ = _poisson_run()
    engine2.load_state_dict(state)
    assert engine2.foreign_steps == 2


def test_steps_on_the_returned_loader_are_not_flagged():
    engine, model, optimizer, criterion, loader, _ = _poisson_run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_steps(model, optimizer, criterion, loader, 2)
    assert engine.steps == 2 and engine.foreign_steps == 0
    assert "foreign_steps" not in engine.state_dict()
    assert not any("hand out" in w for w in engine.report(delta=1e-5).warnings)


def test_a_saved_foreign_step_count_is_checked():
    engine, model, optimizer, criterion, loader, own = _poisson_run()
    with pytest.warns(UserWarning, match="did not hand out"):
        _train_steps(model, optimizer, criterion, own, 1)
    state = engine.state_dict()
    for bad in (-1, 2, True, "1"):
        engine2, *_ = _poisson_run()
        with pytest.raises(ValueError, match="foreign_steps"):
            engine2.load_state_dict({**state, "foreign_steps": bad})
    with pytest.raises(ValueError, match="foreign_steps"):
        dpclip.report.make_report({**state, "foreign_steps": -1}, 1e-5)
