"""PrivacyEngine end to end: invariants 1 and 3, loop styles, Opacus parity."""

from __future__ import annotations

import copy
import warnings

import dp_accounting
import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine as OpacusEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from accounting import PoissonGaussian
from tests.dpclip.helpers import make_run, train_logical_batch
from tests.dpclip.models import MLP, TinyTransformer


def _micro_batches(run, k, b, offset=0):
    return [
        (run.x[offset + i * b : offset + (i + 1) * b], run.y[offset + i * b : offset + (i + 1) * b])
        for i in range(k)
    ]


def _assert_update_matches(run, before, micro, logical, atol, rtol=0.0):
    x = torch.cat([m[0] for m in micro])
    y = torch.cat([m[1] for m in micro])
    C = run.optimizer.max_grad_norm
    expected, norms = run.reference(before, x, y, C, logical)
    assert (norms > C).any() and (norms < C).any(), "clipping must bind for some examples only"
    worst = 0.0
    for name, p in run.model.named_parameters():
        delta = before[name] - p.detach()  # SGD lr=1: the applied gradient
        # rtol is relative to the tensor's scale, so near-zero entries don't demand more;
        # the update is read back as a difference of parameters, rounded at their scale
        scale = expected[name].abs().max().item()
        readback = torch.finfo(p.dtype).eps * before[name].abs().max().item()
        torch.testing.assert_close(
            delta, expected[name], atol=atol + rtol * scale + readback, rtol=rtol
        )
        worst = max(worst, (delta - expected[name]).abs().max().item())
    return worst


@pytest.mark.parametrize("clipping", dpclip.STRATEGIES)
@pytest.mark.parametrize("kind", ["mlp", "embedding", "cnn", "transformer", "conv1d", "attention"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("style", [1, 2])
def test_accumulated_update_equals_large_batch_clipped_mean(kind, k, style, clipping):
    # Invariant 1: k micro-batches, σ = 0 -> Σ clipped per-sample grads over the union / (k·B),
    # whichever way the per-sample norms are computed.
    b = 4
    run = make_run(kind, batch_size=b, accumulation_steps=k, clipping=clipping)
    before = run.params()
    micro = _micro_batches(run, k, b)
    train_logical_batch(run, micro, style)
    _assert_update_matches(run, before, micro, k * b, atol=1e-9)
    assert run.engine.steps == 1


@pytest.mark.parametrize("clipping", dpclip.STRATEGIES)
@pytest.mark.parametrize("kind", ["cnn", "transformer", "attention"])
def test_float32_update_matches_reference(kind, clipping):
    run = make_run(kind, batch_size=4, accumulation_steps=2, dtype=torch.float32, clipping=clipping)
    before = run.params()
    micro = _micro_batches(run, 2, 4)
    train_logical_batch(run, micro, 2)
    _assert_update_matches(run, before, micro, 8, atol=0.0, rtol=1e-5)


def test_unequal_and_empty_micro_batches_divide_by_expected_logical_batch():
    run = make_run("mlp", batch_size=4, accumulation_steps=3)
    before = run.params()
    micro = [(run.x[:7], run.y[:7]), (run.x[7:7], run.y[7:7]), (run.x[7:12], run.y[7:12])]
    train_logical_batch(run, micro, 1)
    _assert_update_matches(run, before, micro, 12, atol=1e-9)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_user_optimizer_applies_the_private_gradient(optimizer):
    run = make_run("mlp", batch_size=4, accumulation_steps=2, optimizer=optimizer)
    before = run.params()
    micro = _micro_batches(run, 2, 4)
    x, y = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])
    expected, _ = run.reference(before, x, y, run.optimizer.max_grad_norm, 8)
    # The same optimizer, fed the reference gradient directly.
    ref_params = [nn.Parameter(before[n].clone()) for n, _ in run.model.named_parameters()]
    group = run.optimizer.param_groups[0]
    ref_opt = type(run.optimizer.original_optimizer)(
        ref_params, lr=group["lr"], weight_decay=group["weight_decay"]
    )
    for p, (n, _) in zip(ref_params, run.model.named_parameters()):
        p.grad = expected[n]
    ref_opt.step()
    train_logical_batch(run, micro, 2)
    for p, (_, q) in zip(ref_params, run.model.named_parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), atol=1e-9, rtol=0)


def test_model_trains_in_place():
    model = TinyTransformer().double()
    ids = [id(p) for p in model.parameters()]
    run = make_run("transformer", model=model)
    assert run.model is model
    assert [id(p) for p in run.model.parameters()] == ids
    before = run.params()
    train_logical_batch(run, _micro_batches(run, 2, 4), 2)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_accountant_records_one_logical_step_per_optimizer_step():
    # Invariant 3: one entry per optimizer step at q = L/N, never per micro-batch.
    n, b, k, sigma = 64, 4, 4, 1.3
    run = make_run("mlp", n=n, batch_size=b, accumulation_steps=k, noise_multiplier=sigma)
    steps = 0
    for i, (xb, yb) in enumerate(run.loader):
        run.criterion(run.model(xb), yb).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
        steps += (i + 1) % k == 0
        assert run.engine.steps == steps
    assert steps == n // (k * b) == len(run.loader) // k
    assert run.engine.ledger.entries == ((PoissonGaussian(k * b / n, sigma), steps),)


@pytest.mark.parametrize("method", ["rdp", "prv"])
def test_epsilon_matches_dp_accounting(method):
    q, sigma, steps = 0.125, 1.0, 40
    engine = dpclip.PrivacyEngine(accountant=method)
    engine.ledger.record(PoissonGaussian(q, sigma), steps)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    if method == "rdp":
        oracle = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    else:  # PRV against the independent PLD computation
        oracle = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(1e-5)
    assert engine.get_epsilon(1e-5) == pytest.approx(oracle, rel=0.01)


def test_engine_epsilon_after_training_matches_dp_accounting():
    run = make_run("mlp", n=64, batch_size=4, accumulation_steps=2, noise_multiplier=1.0)
    for xb, yb in run.loader:
        run.criterion(run.model(xb), yb).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
    event = dp_accounting.PoissonSampledDpEvent(8 / 64, dp_accounting.GaussianDpEvent(1.0))
    oracle = dp_accounting.rdp.RdpAccountant().compose(event, 8).get_epsilon(1e-5)
    assert run.engine.get_epsilon(1e-5) == pytest.approx(oracle, rel=1e-3)


def test_max_physical_batch_size_migration_from_batch_memory_manager():
    # The loader's batch is the logical batch; micro-batches of at most M; one step each.
    n, logical, m = 96, 16, 5
    run = make_run("mlp", n=n, batch_size=logical, accumulation_steps=None, max_physical_batch_size=m)
    expected_micro = len(run.loader)
    seen, micro, steps = 0, [], 0
    before = run.params()
    for xb, yb in run.loader:
        assert len(xb) <= m
        seen += 1
        micro.append((xb, yb))
        run.criterion(run.model(xb), yb).backward()
        stepped = run.engine.steps
        run.optimizer.step()
        run.optimizer.zero_grad()
        if run.engine.steps > stepped:
            steps += 1
            if sum(len(t[0]) for t in micro) > 1:
                x, y = torch.cat([t[0] for t in micro]), torch.cat([t[1] for t in micro])
                expected, _ = run.reference(before, x, y, run.optimizer.max_grad_norm, logical)
                for name, p in run.model.named_parameters():
                    torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)
            micro, before = [], run.params()
        else:
            assert all(torch.equal(before[nm], p) for nm, p in run.model.named_parameters())
    assert seen == expected_micro
    assert steps == n // logical
    assert run.engine.ledger.entries == ((PoissonGaussian(logical / n, 0.0), steps),)


@pytest.mark.parametrize("style", [1, 2])
def test_shuffled_batches_grouped_with_a_short_last_group(style):
    # 13 batches of 8 (N=100), k=4: groups of 4, 4, 4 and a last logical batch of 1.
    n, b, k = 100, 8, 4
    run = make_run("mlp", n=n, batch_size=b, accumulation_steps=k, poisson_sampling=False)
    assert len(run.loader) == 13
    for i, (xb, yb) in enumerate(run.loader):
        run.criterion(run.model(xb), yb).backward()
        if style == 1 or (i + 1) % k == 0 or i + 1 == len(run.loader):
            run.optimizer.step()
            run.optimizer.zero_grad()
    assert run.engine.steps == 4
    assert run.engine.plan.sample_rate == pytest.approx(32 / 100)
    with pytest.warns(UserWarning, match="Poisson"):
        run.engine.get_epsilon(1e-5)


def test_shuffled_batches_without_the_last_step_raise_at_next_backward():
    run = make_run("mlp", n=100, batch_size=8, accumulation_steps=4, poisson_sampling=False)
    batches = list(run.loader)
    for i, (xb, yb) in enumerate(batches):
        run.criterion(run.model(xb), yb).backward()
        if (i + 1) % 4 == 0:
            run.optimizer.step()
    with pytest.raises(dpclip.LogicalBatchError, match=r"micro-batch 2 of a logical batch of 1"):
        run.criterion(run.model(batches[0][0]), batches[0][1]).backward()
    assert run.optimizer.micro_batches_accumulated == 1  # the short group is kept, not dropped
    run.optimizer.step()
    assert run.engine.steps == 4


def test_make_private_twice_on_the_same_objects_is_refused():
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(32, 10).double(), torch.zeros(32).long()), batch_size=4)
    kwargs = dict(criterion=nn.CrossEntropyLoss(), data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    engine = dpclip.PrivacyEngine()
    engine.make_private(module=model, optimizer=opt, **kwargs)
    hooks = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="already made private"):
        dpclip.PrivacyEngine().make_private(module=model, optimizer=opt, **kwargs)
    with pytest.raises(RuntimeError, match="already made private"):
        dpclip.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kwargs
        )
    other = MLP().double()
    with pytest.raises(RuntimeError, match="already made a model private"):
        engine.make_private(module=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1), **kwargs)
    assert hooks == {name: len(m._forward_hooks) for name, m in model.named_modules()}


def _fresh():
    model = MLP().double()
    loader = DataLoader(TensorDataset(torch.randn(32, 10).double(), torch.zeros(32).long()), batch_size=4)
    return dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=float("inf")), "max_grad_norm"),
        (dict(accumulation_steps=0), "accumulation_steps"),
        (dict(accumulation_steps=2.0), "accumulation_steps"),
        (dict(accumulation_steps=2, max_physical_batch_size=2), "not both"),
        (dict(max_physical_batch_size=0), "max_physical_batch_size"),
        (dict(accumulation_steps=9), "exceeds the dataset size"),
        (dict(criterion=lambda a, b: a.sum()), "criterion"),
        (dict(poisson_sampling="yes"), "poisson_sampling"),
        (dict(noise_generator=0), "noise_generator"),
        (dict(module=nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4))), "GroupNorm"),
        # a frozen pretrained body's BatchNorm: the fix for it, and every one named
        (dict(module=nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4).requires_grad_(False), nn.Linear(4, 4),
                                   nn.BatchNorm1d(4))), r"FrozenBatchNorm2d.*All 2 of them: '1'.*'3'"),
        # a weight computed from parameters without the batch: refused up front, naming the
        # undo (with out_features == B it was silently taken for per-example rows)
        (dict(module=nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(10, 4)), nn.Linear(4, 2))),
         r"module '0' \(ParametrizedLinear\) has a parametrization of 'weight' \(_WeightNorm\).*"
         r"remove_parametrizations\(module, 'weight'\)"),
        (dict(module=nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(10, 4)), nn.Linear(4, 2))),
         r"_SpectralNorm"),
        (dict(module=nn.Sequential(nn.utils.weight_norm(nn.Linear(10, 4)), nn.Linear(4, 2))),
         r"WeightNorm on 'weight'.*nn.utils.remove_weight_norm\(module\)"),
        (dict(module=nn.Sequential(nn.utils.spectral_norm(nn.Linear(10, 4)), nn.Linear(4, 2))),
         r"SpectralNorm on 'weight'.*nn.utils.remove_spectral_norm\(module\)"),
        (dict(module=nn.MultiheadAttention(4, 2)), "batch_first=False"),
        (dict(module=nn.LSTM(4, 4, batch_first=True)), "DPLSTM"),
        # (it crashed in the first backward with a SparseCPU error from the norm)
        (dict(module=nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))), "sparse=True"),
        (dict(optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)), "not a parameter of module"),
        (dict(clipping="fastest"), "clipping"),
        (dict(clipping={"no.such.layer": "ghost"}), "no.such.layer"),
    ],
)
def test_bad_input_is_refused_before_any_state_changes(change, match):
    kwargs = {**_fresh(), **change}
    engine = dpclip.PrivacyEngine()
    with pytest.raises(ValueError, match=match):
        engine.make_private(**kwargs)
    assert all(not m._forward_hooks for m in kwargs["module"].modules())
    assert engine.optimizer is None and engine.steps == 0
    if "module" in change:
        return  # the refused module itself cannot be made private
    # The objects were not claimed: a correct call on the same ones still works.
    defaults = _fresh()
    good = {k: v for k, v in kwargs.items() if k not in change or k in defaults}
    good.update({k: defaults[k] for k in change if k in defaults and k != "optimizer"})
    if "optimizer" in change:
        good["optimizer"] = torch.optim.SGD(good["module"].parameters(), lr=0.1)
    dpclip.PrivacyEngine().make_private(**good)


def test_engine_arguments_are_checked():
    with pytest.raises(ValueError, match="accountant"):
        dpclip.PrivacyEngine(accountant="moments")
    with pytest.raises(ValueError, match="Expected secure_mode to be True or False, got 'no'"):
        dpclip.PrivacyEngine(secure_mode="no")


def test_a_failure_after_hooks_are_added_undoes_make_private(monkeypatch):
    # The last thing make_private does is size the budget: make it fail there.
    kwargs = {**_fresh(), "max_epsilon": 5.0, "target_delta": 1e-5}
    engine = dpclip.PrivacyEngine(accountant="rdp")

    def broken(*args, **kw):
        raise MemoryError("out of memory while sizing the budget")

    with monkeypatch.context() as m:
        m.setattr(dpclip.budget.PrivacyBudget, "steps_allowed", broken)
        with pytest.raises(MemoryError):
            engine.make_private(**kwargs)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in kwargs["module"].modules())
    assert engine.optimizer is None and engine.plan is None
    engine.make_private(**kwargs)  # neither the engine nor the module nor the optimizer is claimed
    assert engine.steps_remaining > 0


def test_data_parallel_is_refused_before_anything_changes():
    kwargs = _fresh()
    with pytest.raises(ValueError, match="DataParallel module: its replicas are rebuilt"):
        dpclip.PrivacyEngine().make_private(**{**kwargs, "module": nn.DataParallel(kwargs["module"])})
    assert all(not m._forward_hooks for m in kwargs["module"].modules())


def test_a_ddp_module_in_a_one_process_group_trains_as_the_plain_module(tmp_path):
    import torch.distributed as dist

    def one_step(wrap):
        torch.manual_seed(0)
        kwargs = _fresh()
        module = wrap(kwargs["module"])
        engine = dpclip.PrivacyEngine()
        model, opt, crit, loader = engine.make_private(
            **{**kwargs, "module": module, "optimizer": torch.optim.SGD(module.parameters(), lr=0.1)},
            accumulation_steps=2, sample_generator=torch.Generator().manual_seed(1),
            noise_generator=torch.Generator().manual_seed(2),
        )
        assert model is module
        for i, (x, y) in enumerate(loader):
            crit(model(x), y).backward()
            if i % 2:
                opt.step()
                opt.zero_grad()
                break
        return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = one_step(nn.parallel.DistributedDataParallel)
    finally:
        dist.destroy_process_group()
    plain = one_step(lambda m: m)
    assert set(ddp) == set(plain)
    for n, p in plain.items():
        assert torch.equal(ddp[n], p), n


def test_make_private_with_epsilon_meets_the_target():
    kwargs = _fresh()
    kwargs.pop("noise_multiplier")
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, opt, crit, loader = engine.make_private_with_epsilon(
        **kwargs, target_epsilon=3.0, target_delta=1e-5, epochs=2, accumulation_steps=2
    )
    for _ in range(2):
        for xb, yb in loader:
            crit(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
    assert engine.steps == 2 * (32 // 8)
    eps = engine.get_epsilon(1e-5)
    assert 3.0 * 0.99 <= eps <= 3.0
    # the calibrated σ is minimal: 1 % less noise overshoots the target
    event = dp_accounting.PoissonSampledDpEvent(8 / 32, dp_accounting.GaussianDpEvent(0.99 * opt.noise_multiplier))
    assert dp_accounting.rdp.RdpAccountant().compose(event, engine.steps).get_epsilon(1e-5) > 3.0


# --- Opacus as the independent reference ----------------------------------------------


def _union(run, k, b):
    micro = _micro_batches(run, k, b)
    return micro, torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])


def test_opacus_hooks_with_batch_memory_manager_gives_the_same_update():
    k, b = 4, 4
    run = make_run("mlp", batch_size=b, accumulation_steps=k)
    micro, x, y = _union(run, k, b)
    C = run.optimizer.max_grad_norm
    before = run.params()

    model = copy.deepcopy(run.reference_model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = OpacusEngine().make_private(
            module=model,
            optimizer=opt,
            data_loader=DataLoader(TensorDataset(x, y), batch_size=k * b),
            noise_multiplier=0.0,
            max_grad_norm=C,
            poisson_sampling=False,
        )
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=b, optimizer=opt) as mem:
        for xb, yb in mem:
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
    opacus_delta = {n: before[n] - p.detach() for n, p in model._module.named_parameters()}

    train_logical_batch(run, micro, 1)
    for name, p in run.model.named_parameters():
        # Opacus clips with C / (‖g‖ + 1e-6): agreement to ~1e-6 relative.
        torch.testing.assert_close(before[name] - p.detach(), opacus_delta[name], atol=1e-6, rtol=0)


def test_opacus_ghost_with_plain_accumulation_uses_only_the_last_micro_batch():
    # The bug dpclip fixes (DESIGN.md §1): documented against the torch.func reference.
    k, b = 2, 8
    run = make_run("mlp", n=64, batch_size=b, accumulation_steps=k)
    micro, x, y = _union(run, k, b)
    C = run.optimizer.max_grad_norm
    before = run.params()
    full, _ = run.reference(before, x, y, C, k * b)
    last, _ = run.reference(before, micro[-1][0], micro[-1][1], C, b)

    model = copy.deepcopy(run.reference_model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, criterion, _ = OpacusEngine().make_private(
            module=model,
            optimizer=opt,
            criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(TensorDataset(run.x, run.y), batch_size=b),
            noise_multiplier=0.0,
            max_grad_norm=C,
            poisson_sampling=False,
            grad_sample_mode="ghost",
        )
    for xb, yb in micro:
        criterion(model(xb), yb).backward()
    opt.step()
    delta = {n: before[n] - p.detach() for n, p in model._module.named_parameters()}
    gap_full = max((delta[n] - full[n]).abs().max().item() for n in delta)
    gap_last = max((delta[n] - last[n]).abs().max().item() for n in delta)
    assert gap_last < 1e-6  # Opacus: the last micro-batch's clipped mean over B
    assert gap_full > 1e-3  # ... not the clipped mean over the logical batch

    train_logical_batch(run, micro, 2)  # dpclip on the same micro-batches
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), full[name], atol=1e-9, rtol=0)


class _BatchStatistics(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc(nn.functional.batch_norm(x, None, None, training=True))


@pytest.mark.parametrize("check", [True, False])
def test_make_private_probes_independence_unless_told_not_to(check):
    kwargs = {**_fresh(), "module": _BatchStatistics().double()}
    kwargs["optimizer"] = torch.optim.SGD(kwargs["module"].parameters(), lr=0.1)
    model, opt, crit, loader = dpclip.PrivacyEngine().make_private(**kwargs, check_independence=check)
    x, y = torch.randn(4, 10, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    if check:
        with pytest.raises(dpclip.ExamplesMixedError, match="mixes examples"):
            model(x)
    else:
        crit(model(x), y).backward()  # the user said the model is per-example
        assert opt.micro_batches_accumulated == 1


def test_a_loader_with_a_distributed_sampler_is_drawn_from_the_whole_dataset():
    kwargs = _fresh()
    dataset = kwargs["data_loader"].dataset
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=1)  # a shard of 16
    engine = dpclip.PrivacyEngine()
    *_, loader = engine.make_private(
        **{**kwargs, "data_loader": DataLoader(dataset, batch_size=4, sampler=sampler)}, accumulation_steps=2,
    )
    assert engine.plan.dataset_size == len(dataset) == 32 and engine.plan.sample_rate == 8 / 32
    drawn = {i for batch in loader.batch_sampler for i in batch}
    assert drawn - set(sampler) and drawn <= set(range(32))  # not only the shard's examples


def test_a_ddp_with_a_static_graph_is_refused_before_anything_changes(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        kwargs = _fresh()
        ddp = nn.parallel.DistributedDataParallel(kwargs["module"], static_graph=True)
        with pytest.raises(ValueError, match="static_graph=True"):
            dpclip.PrivacyEngine().make_private(**{**kwargs, "module": ddp})
        assert all(not m._forward_hooks for m in kwargs["module"].modules())
    finally:
        dist.destroy_process_group()


def _save_and_load(model: nn.Module) -> nn.Module:
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("case", ["transformer", "gpt2"])
def test_a_private_model_saves_whole_and_loads_as_the_plain_module(case):
    # torch.save(model) pickles a module with its hooks: dpclip's were closures ("Can't
    # pickle local object 'Recorder._call_hook.<locals>.hook'"), where Opacus's
    # GradSampleModule saves. They pickle as hooks that do nothing: the loaded model
    # computes what the trained one does, trains as a plain module, and can be made
    # private again
    torch.manual_seed(0)
    if case == "gpt2":
        pytest.importorskip("transformers")
        from tests.dpclip.hf_models import CASES

        hf = CASES["gpt2"]
        model, criterion = hf.build(8), hf.criterion()
        inputs, y = hf.batch(16, 8, torch.Generator().manual_seed(0))
    else:
        model, criterion = TinyTransformer(), nn.CrossEntropyLoss()
        inputs, y = (torch.randint(1, 20, (16, 6)),), torch.randint(0, 3, (16,))

    def private(m):
        return dpclip.PrivacyEngine().make_private(
            module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), criterion=criterion,
            data_loader=DataLoader(TensorDataset(*inputs, y), batch_size=4), noise_multiplier=1.0,
            max_grad_norm=1.0, accumulation_steps=2,
        )

    trained, optimizer, crit, loader = private(model)
    for *xb, yb in loader:
        crit(trained(*xb), yb).backward()
        optimizer.step()
        optimizer.zero_grad()
    loaded = _save_and_load(trained)
    trained.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), trained(*inputs), rtol=0, atol=0)
    loaded.train()
    criterion(loaded(*inputs), y).backward()  # a plain module: its own gradient, in .grad
    assert all(p.grad is not None for p in loaded.parameters() if p.requires_grad)
    loaded.zero_grad()
    again, optimizer, crit, loader = private(loaded)
    inert = [h for m in again.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
             if type(h).__name__ == "_Inert"]
    assert not inert  # (the loaded model's no-op hooks do not pile up)
    before = [p.detach().clone() for p in again.parameters()]
    for *xb, yb in loader:
        crit(again(*xb), yb).backward()
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, again.parameters()))
