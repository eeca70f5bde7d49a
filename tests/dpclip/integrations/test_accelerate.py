"""dpclip in an accelerate loop as its users write it: ``accelerator.prepare`` of the
private model, optimizer and loader, ``with accelerator.accumulate(model)``,
``accelerator.backward(loss)`` (which divides the loss by k), a step every micro-batch,
checkpoints by ``accelerator.save_state`` with the engine registered.

References: dpclip's own plain loop with the same generators, a one-example-at-a-time
clipped update with plain autograd, and dp-accounting."""

from __future__ import annotations

import dp_accounting
import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from tests.dpclip.integrations.reference import clipped_update

pytestmark = pytest.mark.filterwarnings("ignore")

N, B, K, C, LR = 96, 6, 4, 0.5, 0.5


def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N,), generator=gen)


def private(sigma: float, *, sample_seed: int = 1, noise_seed: int | None = 2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    engine = dpclip.PrivacyEngine(accountant="rdp")
    x, y = data()
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=B), noise_multiplier=sigma, max_grad_norm=C,
        accumulation_steps=K, sample_generator=torch.Generator().manual_seed(sample_seed),
        noise_generator=None if noise_seed is None else torch.Generator().manual_seed(noise_seed),
    )
    return engine, model, optimizer, criterion, loader


def accelerate_loop(sigma: float, steps: int | None = None, accumulation: int = K):
    engine, model, optimizer, criterion, loader = private(sigma)
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    seen = []
    for x, y in loader:
        with accelerator.accumulate(model):
            seen.append((x, y))
            loss = criterion(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if steps is not None and engine.steps == steps:
            break
    return engine, model, seen


def plain_loop(sigma: float, steps: int | None = None):
    engine, model, optimizer, criterion, loader = private(sigma)
    for x, y in loader:
        criterion(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if steps is not None and engine.steps == steps:
            break
    return engine, model


def test_one_step_equals_the_plain_loop_and_the_per_example_reference():
    _, start, *_ = private(0.0)
    start = [p.detach().clone() for p in start.parameters()]
    engine, model, seen = accelerate_loop(0.0, steps=1)
    assert engine.steps == 1 and len(seen) == K
    _, by_hand = plain_loop(0.0, steps=1)
    for p, q in zip(model.parameters(), by_hand.parameters()):
        assert torch.equal(p, q)
    _, reference_model, *_ = private(0.0)
    reference = clipped_update(reference_model, seen, C, K * B)  # Σ_i min(1, C/‖g_i‖) g_i / (k·B)
    for p, p0, r in zip(model.parameters(), start, reference):
        torch.testing.assert_close((p0 - p.detach()) / LR, r, rtol=1e-9, atol=1e-14)


def test_a_noisy_pass_is_the_plain_loops_and_its_epsilon_is_dp_accountings():
    engine, model, _ = accelerate_loop(1.0)
    plain, by_hand = plain_loop(1.0)
    assert engine.steps == plain.steps == N // (K * B)
    for p, q in zip(model.parameters(), by_hand.parameters()):
        assert torch.equal(p, q)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(K * B / N, dp_accounting.GaussianDpEvent(1.0)), engine.steps
    )
    expected = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) == pytest.approx(expected, rel=1e-6)


def test_an_accelerator_accumulating_other_than_k_is_refused_before_anything_is_added():
    engine, model, optimizer, criterion, loader = private(1.0)
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    x, y = next(iter(loader))
    with accelerator.accumulate(model):
        with pytest.raises(TypeError, match=r"divided by 2, but the logical batch has k = 4 .*Accelerator"):
            accelerator.backward(criterion(model(x), y))
    assert optimizer.optimizer.micro_batches_accumulated == 0


def test_a_loader_prepared_before_make_private_is_refused_naming_the_order():
    model = nn.Sequential(nn.Linear(5, 3)).double()
    x, y = data()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(TensorDataset(x, y), batch_size=B))
    with pytest.raises(ValueError, match="call make_private with the loader you built, then prepare"):
        dpclip.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=C, accumulation_steps=K,
        )


def test_resume_from_accelerate_save_state_mid_pass_is_bit_exact(tmp_path):
    def start():
        engine, model, optimizer, criterion, loader = private(1.0, noise_seed=None)
        accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        accelerator.register_for_checkpointing(engine)  # the privacy state rides along
        return engine, model, optimizer, criterion, loader, accelerator

    def train(engine, model, optimizer, criterion, loader, accelerator, until=None):
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(criterion(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
            if until is not None and engine.steps == until:
                accelerator.save_state(str(tmp_path))
                until = None

    full = start()
    train(*full, until=2)
    assert full[0].steps == N // (K * B) > 2
    resumed = start()
    resumed[-1].load_state(str(tmp_path))
    assert resumed[0].steps == 2
    train(*resumed)
    assert resumed[0].state_dict() == full[0].state_dict()
    for p, q in zip(full[1].parameters(), resumed[1].parameters()):
        assert torch.equal(p, q)
