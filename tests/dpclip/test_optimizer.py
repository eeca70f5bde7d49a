"""DPOptimizer: noise once per step (invariant 2), logical-batch boundaries, empty batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from tests.dpclip.helpers import make_run, train_logical_batch


class ZeroGradientModel(nn.Module):
    """Every per-sample gradient is exactly zero, so the update is pure noise / L."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(400, 250)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 0.0


def _noise_run(k: int, b: int, sigma: float, C: float):
    model = ZeroGradientModel().double()
    x = torch.randn(64, 400, dtype=torch.float64)
    y = torch.randint(0, 250, (64,))
    engine = dpclip.PrivacyEngine()
    model, opt, crit, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=b),
        noise_multiplier=sigma,
        max_grad_norm=C,
        accumulation_steps=k,
        noise_generator=torch.Generator().manual_seed(7),
    )
    return model, opt, crit, x, y, engine


@pytest.mark.parametrize("k", [1, 4])
def test_update_noise_std_is_sigma_c_over_logical_batch(k):
    b, sigma, C = 8, 1.5, 0.7
    model, opt, crit, x, y, engine = _noise_run(k, b, sigma, C)
    w0 = model.fc.weight.detach().clone()
    deltas = []
    for step in range(2):
        before = model.fc.weight.detach().clone()
        for i in range(k):
            crit(model(x[i * b : (i + 1) * b]), y[i * b : (i + 1) * b]).backward()
            opt.step()
            opt.zero_grad()
            if i < k - 1:  # no noise inside the logical batch: skipped steps leave θ alone
                assert torch.equal(model.fc.weight, before)
        deltas.append((before - model.fc.weight.detach()).flatten())
    n = deltas[0].numel()  # 100 000 noise draws per step
    expected = sigma * C / (k * b)
    tol = 5 / math.sqrt(2 * n)  # 5 standard errors of a sample std
    for d in deltas:
        assert d.std().item() == pytest.approx(expected, rel=tol)
        assert abs(d.mean().item()) < 5 * expected / math.sqrt(n)
    if k > 1:  # clearly not sqrt(k)·σC/L (noise per micro-batch) nor σC/B (micro-batch scaling)
        assert deltas[0].std().item() < 0.6 * math.sqrt(k) * expected
    # fresh noise each optimizer step: the two draws are uncorrelated
    corr = torch.corrcoef(torch.stack(deltas))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(n)
    assert engine.steps == 2
    assert not torch.equal(model.fc.weight, w0)


def test_step_after_wrong_number_of_micro_batches_raises_and_keeps_state():
    run = make_run("mlp", batch_size=4, accumulation_steps=4, noise_multiplier=1.0)
    before = run.params()
    for i in range(2):
        run.criterion(run.model(run.x[i * 4 : (i + 1) * 4]), run.y[i * 4 : (i + 1) * 4]).backward()
    with pytest.raises(dpclip.LogicalBatchError, match=r"after 2 micro-batches.*has 4"):
        run.optimizer.step()
    assert run.optimizer.micro_batches_accumulated == 2
    assert run.engine.steps == 0
    assert all(torch.equal(before[n], p) for n, p in run.model.named_parameters())
    # the logical batch can still be completed correctly
    for i in range(2, 4):
        run.criterion(run.model(run.x[i * 4 : (i + 1) * 4]), run.y[i * 4 : (i + 1) * 4]).backward()
    run.optimizer.step()
    assert run.engine.steps == 1


def test_backward_past_the_logical_batch_raises_before_accumulating():
    run = make_run("mlp", batch_size=4, accumulation_steps=2)
    for i in range(2):
        run.criterion(run.model(run.x[i * 4 : (i + 1) * 4]), run.y[i * 4 : (i + 1) * 4]).backward()
    with pytest.raises(dpclip.LogicalBatchError, match=r"micro-batch 3 of a logical batch of 2"):
        run.criterion(run.model(run.x[8:12]), run.y[8:12]).backward()
    assert run.optimizer.micro_batches_accumulated == 2


def test_step_without_backward_raises():
    run = make_run("mlp")
    with pytest.raises(dpclip.LogicalBatchError, match="no backward"):
        run.optimizer.step()


def test_empty_logical_batch_is_a_noisy_accounted_step():
    k, b, sigma = 2, 4, 1.0
    run = make_run("mlp", batch_size=b, accumulation_steps=k, noise_multiplier=sigma)
    before = run.params()
    train_logical_batch(run, [(run.x[:0], run.y[:0])] * k, 1)
    assert run.engine.steps == 1
    assert all(not torch.equal(before[n], p) for n, p in run.model.named_parameters())


def test_empty_logical_batch_without_noise_changes_nothing_but_is_accounted():
    run = make_run("mlp", batch_size=4, accumulation_steps=2, noise_multiplier=0.0)
    before = run.params()
    train_logical_batch(run, [(run.x[:0], run.y[:0])] * 2, 2)
    assert run.engine.steps == 1
    assert all(torch.equal(before[n], p) for n, p in run.model.named_parameters())


def test_add_empty_micro_batch_for_models_that_cannot_run_empty():
    # nn.MultiheadAttention fails on an empty batch; the loop counts it instead.
    k, b = 3, 4
    run = make_run("transformer", batch_size=b, accumulation_steps=k)
    before = run.params()
    micro = [(run.x[:4], run.y[:4]), (run.x[:0], run.y[:0]), (run.x[4:9], run.y[4:9])]
    for xb, yb in micro:
        if len(yb) == 0:
            run.optimizer.add_empty_micro_batch()
        else:
            run.criterion(run.model(xb), yb).backward()
        run.optimizer.step()
    expected, _ = run.reference(before, run.x[:9], run.y[:9], run.optimizer.max_grad_norm, k * b)
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)


def test_zero_grad_never_clears_the_accumulated_sum():
    run = make_run("mlp", batch_size=4, accumulation_steps=2)
    before = run.params()
    micro = [(run.x[:4], run.y[:4]), (run.x[4:8], run.y[4:8])]
    for xb, yb in micro:
        run.optimizer.zero_grad()
        run.criterion(run.model(xb), yb).backward()
        run.optimizer.zero_grad(set_to_none=False)
    run.optimizer.step()
    expected, _ = run.reference(before, run.x[:8], run.y[:8], run.optimizer.max_grad_norm, 8)
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)


def test_lr_scheduler_and_state_dict_work_through_the_wrapper():
    run = make_run("mlp", batch_size=4, accumulation_steps=1)
    sched = torch.optim.lr_scheduler.StepLR(run.optimizer, step_size=1, gamma=0.5)
    train_logical_batch(run, [(run.x[:4], run.y[:4])], 2)
    sched.step()
    assert run.optimizer.param_groups[0]["lr"] == 0.5
    assert run.optimizer.state_dict()["param_groups"][0]["lr"] == 0.5


def test_private_gradient_is_sum_plus_noise_over_expected_batch():
    s = torch.full((3,), 6.0)
    assert torch.equal(
        dpclip.private_gradient(s, noise_std=0.0, expected_batch_size=3, generator=torch.Generator()),
        torch.full((3,), 2.0),
    )
    g1 = torch.Generator().manual_seed(0)
    noise = torch.normal(0.0, 2.0, size=(3,), generator=torch.Generator().manual_seed(0))
    out = dpclip.private_gradient(s, noise_std=2.0, expected_batch_size=3, generator=g1)
    torch.testing.assert_close(out, (s + noise) / 3)


def test_breaking_out_mid_logical_batch_never_merges_two_poisson_draws():
    run = make_run("mlp", n=64, batch_size=4, accumulation_steps=2, noise_multiplier=0.0)
    for xb, yb in run.loader:  # one micro-batch of a two-micro-batch logical batch
        run.criterion(run.model(xb), yb).backward()
        run.optimizer.step()  # a skip
        break
    xb, yb = next(iter(run.loader))  # a new pass: a new Poisson draw
    with pytest.raises(dpclip.LogicalBatchError, match="new pass"):
        run.criterion(run.model(xb), yb).backward()
    assert run.optimizer.micro_batches_accumulated == 1
    run.optimizer.step()  # the cut-short logical batch is applied as one accounted step
    assert run.engine.steps == 1 and run.optimizer.micro_batches_accumulated == 0


def test_second_pass_while_one_is_running_is_refused():
    run = make_run("mlp", n=96, batch_size=16, accumulation_steps=None, max_physical_batch_size=5)
    it = iter(run.loader)
    next(it)
    with pytest.raises(RuntimeError, match="second pass"):
        next(iter(run.loader))


def test_non_finite_micro_batch_counts_as_empty_so_boundaries_stay_aligned():
    run = make_run("mlp", batch_size=4, accumulation_steps=2)
    bad = run.x[:4].clone()
    bad[0, 0] = float("nan")
    before = run.params()
    with pytest.raises(dpclip.NonFiniteNormError, match="counts as empty|not accumulated"):
        run.criterion(run.model(bad), run.y[:4]).backward()
    assert run.optimizer.micro_batches_accumulated == 1
    run.criterion(run.model(run.x[4:8]), run.y[4:8]).backward()
    run.optimizer.step()
    expected, _ = run.reference(before, run.x[4:8], run.y[4:8], run.optimizer.max_grad_norm, 8)
    for name, p in run.model.named_parameters():
        assert torch.isfinite(p).all()
        torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)


def test_each_phase_of_a_step_is_labelled_for_the_profiler():
    # benchmarks/phase_profile.py reports time per phase from these ranges
    from torch.profiler import profile

    run = make_run("mlp", batch_size=4, accumulation_steps=2, noise_multiplier=1.0)
    micro = [(run.x[i * 4 : (i + 1) * 4], run.y[i * 4 : (i + 1) * 4]) for i in range(2)]
    train_logical_batch(run, micro, 2)  # the first micro-batch is audited; profile the next
    with profile() as prof:
        train_logical_batch(run, micro, 2)
    names = {e.key for e in prof.key_averages()}
    phases = {"backward", "norms", "clipped_sum", "noise", "optimizer_step"}
    assert {f"dpclip.{p}" for p in phases} <= names
    assert run.engine.steps == 2


def test_step_turns_the_accumulator_into_the_gradient_without_a_copy():
    run = make_run("mlp", batch_size=4, accumulation_steps=1, noise_multiplier=1.0)
    run.criterion(run.model(run.x[:4]), run.y[:4]).backward()
    accumulated = {p: t.data_ptr() for p, t in run.optimizer._accumulator.items()}
    assert set(accumulated) == set(run.model.parameters())
    grads = {}
    run.optimizer.original_optimizer.step = lambda: grads.update(
        {p: p.grad.data_ptr() for p in run.model.parameters()}
    )
    run.optimizer.step()
    assert grads == accumulated


def test_error_while_adding_into_the_accumulator_loses_the_logical_batch_loudly(monkeypatch):
    from dpclip.clipping.rules.linear import LinearRule

    run = make_run("mlp", batch_size=4, accumulation_steps=2)
    micro = [(run.x[i * 4 : (i + 1) * 4], run.y[i * 4 : (i + 1) * 4]) for i in range(2)]
    train_logical_batch(run, micro, 2)
    before = run.params()
    original = LinearRule.clipped_sum

    def half_then_fail(self, call, factors, out):
        original(self, call, factors, out)
        raise MemoryError("simulated")

    monkeypatch.setattr(LinearRule, "clipped_sum", half_then_fail)
    with pytest.raises(MemoryError):
        run.criterion(run.model(micro[0][0]), micro[0][1]).backward()
    monkeypatch.undo()
    run.criterion(run.model(micro[1][0]), micro[1][1]).backward()
    with pytest.raises(dpclip.LogicalBatchError, match="not applied"):
        run.optimizer.step()
    assert run.engine.steps == 1
    assert all(torch.equal(before[k], v) for k, v in run.params().items())
    train_logical_batch(run, micro, 2)  # the next logical batch trains normally
    assert run.engine.steps == 2


def test_failing_user_optimizer_step_is_not_recorded_and_not_retried_with_noise_twice():
    run = make_run("mlp", batch_size=4, accumulation_steps=1, noise_multiplier=1.0)
    run.criterion(run.model(run.x[:4]), run.y[:4]).backward()

    def broken():
        raise RuntimeError("user optimizer failed")

    step = run.optimizer.original_optimizer.step
    run.optimizer.original_optimizer.step = broken
    with pytest.raises(RuntimeError, match="user optimizer failed"):
        run.optimizer.step()
    assert run.engine.steps == 0
    assert run.optimizer.micro_batches_accumulated == 0 and not run.optimizer._accumulator
    run.optimizer.original_optimizer.step = step
    with pytest.raises(dpclip.LogicalBatchError, match="no backward"):
        run.optimizer.step()
