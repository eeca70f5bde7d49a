"""Ordinary user actions that would break the privacy promise are refused loudly, before
any state changes, or made to work: a second backward() on one forward, frozen and
unfrozen parameters, gradients from outside dpclip, half precision, a non-finite
micro-batch skipped by the loop."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.func import functional_call, grad, vmap

import dpclip
from tests.dpclip.helpers import make_run, train_logical_batch
from tests.dpclip.models import MLP, TinyTransformer


def _micro(run, i, b=4):
    return run.x[i * b : (i + 1) * b], run.y[i * b : (i + 1) * b]


def _clipped_update(model, params, x, y, C, L, loss_fn=None, fixed=None):
    """Σ_i min(1, C/‖g_i‖) g_i / L over the parameters in ``params`` only (torch.func);
    ``fixed``: values of the other parameters (not differentiated)."""
    loss_fn = loss_fn or (lambda out, yi: F.cross_entropy(out, yi))
    fixed = fixed or {}

    def loss(p, xi, yi):
        out = functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    f = torch.clamp(C / norms, max=1.0)
    return {k: torch.einsum("i,i...->...", f, v) / L for k, v in g.items()}


def _assert_unchanged(run, before):
    assert all(torch.equal(before[k], v) for k, v in run.params().items())


# --- item 2: one backward() per forward -------------------------------------------------


@pytest.mark.parametrize("how", ["same_loss", "retain_graph", "criterion_twice", "two_losses_first"])
@pytest.mark.parametrize("position", [0, 1])  # the audited first micro-batch, and a later one
def test_second_backward_on_one_forward_is_refused_before_counting(how, position):
    run = make_run("mlp", batch_size=4, accumulation_steps=3)
    before = run.params()
    for i in range(position):
        run.criterion(run.model(_micro(run, i)[0]), _micro(run, i)[1]).backward()
    xb, yb = _micro(run, position)
    out = run.model(xb)
    loss = run.criterion(out, yb)
    other = run.criterion(out, yb)  # made before the first backward()
    loss.backward(retain_graph=True) if how == "retain_graph" else loss.backward()
    again = {"criterion_twice": run.criterion(out, yb), "two_losses_first": other}.get(how, loss)
    with pytest.raises(RuntimeError, match=r"one backward\(\) per forward.*loss_a \+ loss_b"):
        again.backward()
    assert run.optimizer.micro_batches_accumulated == position + 1
    for i in range(position + 1, 3):  # the logical batch completes as the sampler drew it
        run.criterion(run.model(_micro(run, i)[0]), _micro(run, i)[1]).backward()
    run.optimizer.step()
    expected = _clipped_update(
        run.reference_model, before, run.x[:12], run.y[:12], run.optimizer.max_grad_norm, 12
    )
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"create_graph": True}, "create_graph"),
        ({"inputs": "params"}, "inputs"),
        ({"gradient": torch.tensor(2.0)}, "gradient"),
    ],
)
def test_backward_arguments_that_change_the_gradient_are_refused(kwargs, match):
    run = make_run("mlp", batch_size=4, accumulation_steps=2)
    if kwargs.get("inputs") == "params":
        kwargs = {"inputs": list(run.model.parameters())}
    loss = run.criterion(run.model(run.x[:4]), run.y[:4])
    with pytest.raises(ValueError, match=match):
        loss.backward(**kwargs)
    assert run.optimizer.micro_batches_accumulated == 0
    loss.backward(retain_graph=False)  # refused arguments did not use the forward up
    assert run.optimizer.micro_batches_accumulated == 1


# --- item 9: parameters frozen after make_private ---------------------------------------


class ScaleShift(nn.Module):
    """Bare parameters: clipped through the recorded graph (no layer rule)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n) + 0.1 * torch.randn(n))
        self.shift = nn.Parameter(0.1 * torch.randn(n))

    def forward(self, x):
        return x * self.scale + self.shift


class GraphMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.ss = ScaleShift(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ss(self.fc1(x))))


@pytest.mark.parametrize(
    "freeze",
    [
        ["net.0.weight", "net.0.bias"],  # a whole rule layer
        ["net.0.weight"],  # one parameter of a rule layer
        ["ss.scale"],  # one parameter of a graph-path module
        ["ss.scale", "ss.shift"],
    ],
)
@pytest.mark.parametrize("when", ["before_first_backward", "after_a_step"])
def test_frozen_parameter_gets_no_noise_no_update_and_no_share_of_the_norm(freeze, when):
    torch.manual_seed(0)
    model = (MLP() if freeze[0].startswith("net") else GraphMLP()).double()
    run = make_run("mlp", batch_size=4, accumulation_steps=2, model=model, max_grad_norm=0.3)
    micro = [_micro(run, i) for i in range(4)]
    if when == "after_a_step":
        train_logical_batch(run, micro[:2], 2)
    frozen = {n: p for n, p in run.model.named_parameters() if n in freeze}
    for p in frozen.values():
        p.requires_grad_(False)
    before = run.params()
    trainable = {n: before[n] for n, p in run.model.named_parameters() if p.requires_grad}
    fixed = {n: before[n] for n in frozen}
    train_logical_batch(run, micro[2:], 1)
    expected = _clipped_update(
        run.reference_model, trainable, run.x[8:16], run.y[8:16], 0.3, 8, fixed=fixed
    )
    for name, p in run.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]) and p.grad is None
        else:
            torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)


def test_frozen_attention_projection_is_left_out():
    torch.manual_seed(0)
    model = TinyTransformer().double()
    run = make_run("transformer", batch_size=4, accumulation_steps=1, model=model, max_grad_norm=0.3)
    frozen = "layer.self_attn.in_proj_weight"
    dict(run.model.named_parameters())[frozen].requires_grad_(False)
    before = run.params()
    trainable = {n: v for n, v in before.items() if n != frozen}
    train_logical_batch(run, [_micro(run, 0)], 1)
    expected = _clipped_update(
        run.reference_model, trainable, run.x[:4], run.y[:4], 0.3, 4, fixed={frozen: before[frozen]}
    )
    for name, p in run.model.named_parameters():
        if name == frozen:
            assert torch.equal(p, before[name]) and p.grad is None
        else:
            torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)


def test_frozen_parameter_gets_no_noise():
    run = make_run("mlp", batch_size=4, accumulation_steps=1, noise_multiplier=1.0)
    frozen = run.model.net[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    train_logical_batch(run, [_micro(run, 0)], 1)
    assert torch.equal(frozen, before) and frozen.grad is None
    assert not torch.equal(run.model.net[2].weight, run.reference_model.net[2].weight)


def test_unfreezing_a_parameter_frozen_at_make_private_is_refused():
    torch.manual_seed(0)
    model = MLP().double()
    model.net[0].requires_grad_(False)
    x, y = torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 3, (16,))
    model, optimizer, criterion, _ = dpclip.PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
        criterion=nn.CrossEntropyLoss(),
        data_loader=torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=4
        ),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    criterion(model(x[:4]), y[:4]).backward()
    optimizer.step()
    model.net[0].weight.requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"'net.0.weight'.*frozen when the model was made private"):
        criterion(model(x[4:8]), y[4:8]).backward()
    assert optimizer.micro_batches_accumulated == 0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def _made_private(model, x, y, *, batch_size=4, accumulation_steps=1, max_grad_norm=1.0):
    """make_private on fixed batches (σ 0): (model, optimizer, criterion, iterator of batches)."""
    model, optimizer, criterion, loader = dpclip.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
        criterion=nn.CrossEntropyLoss(),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size),
        noise_multiplier=0.0, max_grad_norm=max_grad_norm, poisson_sampling=False,
        accumulation_steps=accumulation_steps,
    )
    return model, optimizer, criterion, iter(loader)


class _Growing(nn.Module):
    """A model whose forward also uses whatever ``extra`` is attached to it later."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 3)

    def forward(self, x):
        out = self.body(x)
        extra = getattr(self, "extra", None)
        if isinstance(extra, nn.Module):
            out = out + extra(x)
        elif extra is not None:
            out = out * extra
        return out


@pytest.mark.parametrize("how", ["module built before make_private", "new module", "new parameter"])
def test_a_trainable_parameter_added_after_make_private_is_refused(how):
    # a parameter that joins after make_private, also in a module built before it
    torch.manual_seed(0)
    prebuilt = nn.Linear(6, 3)
    model, optimizer, criterion, batches = _made_private(
        _Growing(), torch.randn(16, 6), torch.randint(0, 3, (16,)), accumulation_steps=2)
    xb, yb = next(batches)
    criterion(model(xb), yb).backward()
    inner = model._module if hasattr(model, "_module") else model
    if how == "module built before make_private":
        inner.extra = prebuilt
    elif how == "new module":
        inner.extra = nn.Linear(6, 3)
    else:
        inner.extra = nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match=r"'extra.*requires grad but was frozen when the model was made private \(or added or replaced since"):
        xb, yb = next(batches)
        criterion(model(xb), yb).backward()
    assert optimizer.micro_batches_accumulated == 1


# --- item 10: gradients from outside dpclip ---------------------------------------------


@pytest.mark.parametrize("zero_grad", ["none", "set_to_none", "zeros"])
def test_plain_backward_beside_the_private_loss_is_refused_at_step(zero_grad):
    run = make_run("mlp", batch_size=4, accumulation_steps=1, noise_multiplier=1.0)
    train_logical_batch(run, [_micro(run, 0)], 1)  # dpclip's own p.grad from a step
    if zero_grad == "set_to_none":
        run.optimizer.zero_grad()
    elif zero_grad == "zeros":
        run.optimizer.zero_grad(set_to_none=False)
    xb, yb = _micro(run, 1)
    out = run.model(xb)
    run.criterion(out, yb).backward()
    out2 = run.model(xb)
    out2.pow(2).mean().backward()  # an auxiliary loss, outside dpclip
    before = run.params()
    with pytest.raises(RuntimeError, match=r"'net.0.weight'.*written outside dpclip.*public_gradient"):
        run.optimizer.step()
    assert run.engine.steps == 1 and run.optimizer.micro_batches_accumulated == 1
    _assert_unchanged(run, before)


@pytest.mark.parametrize("zero_grad", ["never", "zeros"])
def test_dpclip_own_gradient_left_in_place_is_not_an_outside_gradient(zero_grad):
    run = make_run("mlp", batch_size=4, accumulation_steps=1)
    for i in range(3):
        run.criterion(run.model(_micro(run, i)[0]), _micro(run, i)[1]).backward()
        run.optimizer.step()
        if zero_grad == "zeros":
            run.optimizer.zero_grad(set_to_none=False)
    assert run.engine.steps == 3


def test_per_example_auxiliary_loss_added_to_the_private_loss():
    run = make_run("mlp", batch_size=4, accumulation_steps=2, max_grad_norm=0.3)
    before = run.params()
    for i in range(2):
        xb, yb = _micro(run, i)
        out = run.model(xb)
        loss = run.criterion(out, yb) + 0.1 * out.pow(2).sum(dim=1)  # DPLoss + tensor [B]
        loss = loss + run.criterion(out, (yb + 1) % 3)  # DPLoss + DPLoss of the same forward
        assert isinstance(loss, dpclip.DPLoss)
        loss.backward()
    run.optimizer.step()

    def loss_fn(out, yi):
        return F.cross_entropy(out, yi) + 0.1 * out.pow(2).sum() + F.cross_entropy(out, (yi + 1) % 3)

    expected = _clipped_update(run.reference_model, before, run.x[:8], run.y[:8], 0.3, 8, loss_fn)
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)


class WeightedCrossEntropy(nn.Module):
    """Sample weights the README's way: the criterion takes them, and honours reduction."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, out: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(out, y, reduction="none") * w
        return losses if self.reduction == "none" else losses.mean()


def test_sample_weights_through_the_criterion_equal_the_reference():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 10, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    w = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)
    model = MLP().double()
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=WeightedCrossEntropy(),
        data_loader=DataLoader(TensorDataset(x, y, w), batch_size=4), noise_multiplier=0.0, max_grad_norm=0.3,
        accumulation_steps=2, poisson_sampling=False,
    )
    for xb, yb, wb in loader:
        criterion(model(xb), yb, wb).backward()
        if optimizer.step() is not None or engine.steps:
            break
    assert engine.steps == 1
    expected = {n: torch.zeros_like(p) for n, p in before.items()}
    for i in range(8):  # one example at a time, its loss times its weight
        part = _clipped_update(reference, before, x[i : i + 1], y[i : i + 1], 0.3, 8,
                               lambda out, yi, wi=w[i]: F.cross_entropy(out, yi) * wi)
        for n in expected:
            expected[n] += part[n]
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)


@pytest.mark.parametrize("weight", [torch.tensor(2.0), torch.ones(4), torch.ones(4, 1)])
def test_multiplying_the_private_loss_is_refused_with_the_sample_weight_recipe(weight):
    # (a [B] weight normalised over the batch, w / w.sum(), mixes the examples unseen)
    run = make_run("mlp", batch_size=4, accumulation_steps=2)
    xb, yb = _micro(run, 0)
    loss = run.criterion(run.model(xb), yb)
    with pytest.raises(TypeError, match=r"is not scaled.*Sample weights go into the criterion"):
        loss * weight.to(run.x.dtype)
    loss.backward()  # nothing was consumed
    assert run.optimizer.micro_batches_accumulated == 1


def test_adding_a_non_per_example_term_to_a_private_loss_is_refused():
    run = make_run("mlp", batch_size=4, accumulation_steps=2)
    out = run.model(run.x[:4])
    loss = run.criterion(out, run.y[:4])
    with pytest.raises(ValueError, match=r"shape \[4\].*public_gradient"):
        loss + out.pow(2).mean()
    other = run.criterion(run.model(run.x[4:8]), run.y[4:8])  # another forward
    with pytest.raises(ValueError, match="same forward"):
        loss + other


@pytest.mark.parametrize("style", [1, 2])
def test_public_gradient_is_added_unclipped_and_unnoised(style):
    run = make_run("mlp", batch_size=4, accumulation_steps=2, max_grad_norm=0.3)
    before = run.params()
    w = run.model.net[0].weight
    for i in range(2):
        xb, yb = _micro(run, i)
        run.criterion(run.model(xb), yb).backward()
        if i == 0:
            with run.optimizer.public_gradient():
                (0.5 * w.pow(2).sum()).backward()  # data-independent: gradient w
        if style == 1:
            run.optimizer.step()
            run.optimizer.zero_grad()
    if style == 2:
        run.optimizer.step()
    expected = _clipped_update(run.reference_model, before, run.x[:8], run.y[:8], 0.3, 8)
    expected["net.0.weight"] = expected["net.0.weight"] + before["net.0.weight"]
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)
    assert run.engine.steps == 1


def test_trainable_module_outside_the_private_model_is_refused():
    run = make_run("mlp", batch_size=4, accumulation_steps=2)
    head = nn.Linear(3, 3).double()
    with pytest.raises(RuntimeError, match=r"not a parameter of the private model.*make_private"):
        run.criterion(head(run.model(run.x[:4])), run.y[:4]).backward()
    assert run.optimizer.micro_batches_accumulated == 0
    head.requires_grad_(False)  # frozen: a fixed function of the output, fine
    run.criterion(head(run.model(run.x[:4])), run.y[:4]).backward()
    assert run.optimizer.micro_batches_accumulated == 1


def test_param_group_added_to_the_original_optimizer_is_refused_at_step():
    run = make_run("mlp", batch_size=4, accumulation_steps=1, noise_multiplier=1.0)
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    run.optimizer.original_optimizer.add_param_group({"params": [extra]})
    run.criterion(run.model(run.x[:4]), run.y[:4]).backward()
    before = run.params()
    with pytest.raises(RuntimeError, match=r"param_groups.*not covered by per-example clipping"):
        run.optimizer.step()
    assert run.engine.steps == 0 and torch.equal(extra, torch.zeros(3, dtype=torch.float64))
    _assert_unchanged(run, before)


# --- item 11: half precision clips to C -------------------------------------------------


class HalfModel(nn.Module):
    """Every rule family: Embedding, Linear (3-d), LayerNorm, Conv1d, MultiheadAttention,
    and a bare parameter (graph path)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.ss = ScaleShift(16)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.ss(self.norm(h)).mean(dim=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_half_precision_clipped_contribution_stays_within_max_grad_norm(dtype, clipping):
    # What one example adds to the clipped sum, measured in float64 by the test: its norm
    # is the sensitivity, and must not exceed C beyond float32 rounding.
    torch.manual_seed(0)
    model = HalfModel().to(dtype)
    C = 1e-3  # far below every gradient norm: every example is clipped
    clipper = dpclip.PerSampleClipper(model, C, clipping)
    tokens = torch.randint(0, 20, (12, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))
    worst = 0.0
    for i in range(12):
        losses = F.cross_entropy(model(tokens[i : i + 1]).float(), y[i : i + 1], reduction="none")
        s = clipper.clipped_sum(losses)
        norm = torch.sqrt(sum(v.double().pow(2).sum() for v in s.values())).item()
        worst = max(worst, norm / C)
    assert worst <= 1 + 1e-5


def test_half_precision_accumulator_and_update_keep_float32():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    run = make_run("mlp", batch_size=4, accumulation_steps=2, model=model, dtype=torch.bfloat16,
                   max_grad_norm=0.01)
    xb, yb = _micro(run, 0)
    run.criterion(run.model(xb), yb).backward()
    assert all(s.dtype == torch.float32 for s in run.optimizer._accumulator.values())
    run.criterion(run.model(_micro(run, 1)[0]), _micro(run, 1)[1]).backward()
    run.optimizer.step()
    assert all(p.grad.dtype == torch.bfloat16 for p in run.model.parameters())


# --- item 15: a non-finite micro-batch can be skipped -----------------------------------


@pytest.mark.parametrize("style", [1, 2])
@pytest.mark.parametrize("skip", ["continue", "step_as_usual"])
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_loop_carries_on_after_a_non_finite_micro_batch(style, skip, bad):
    k = 3
    run = make_run("mlp", n=64, batch_size=4, accumulation_steps=k, max_grad_norm=0.3)
    xs = [_micro(run, i) for i in range(2 * k)]
    poisoned = xs[bad][0].clone()
    poisoned[0, 0] = float("nan")
    xs[bad] = (poisoned, xs[bad][1])
    starts, after = [run.params()], []
    run.optimizer.step_callbacks.append(lambda: after.append(run.params()))
    for i, (xb, yb) in enumerate(xs):
        try:
            run.criterion(run.model(xb), yb).backward()
        except dpclip.NonFiniteNormError:
            if skip == "continue":
                continue
        if style == 1 or (i + 1) % k == 0:
            run.optimizer.step()
            run.optimizer.zero_grad()
    assert run.engine.steps == 2 and run.optimizer.micro_batches_accumulated == 0
    good = [i for i in range(k) if i != bad]
    x1 = torch.cat([xs[i][0] for i in good])
    y1 = torch.cat([xs[i][1] for i in good])
    expected = _clipped_update(run.reference_model, starts[0], x1, y1, 0.3, 4 * k)
    for name in expected:
        torch.testing.assert_close(starts[0][name] - after[0][name], expected[name], atol=1e-9, rtol=0)
    x2, y2 = run.x[4 * k : 8 * k], run.y[4 * k : 8 * k]
    expected = _clipped_update(run.reference_model, after[0], x2, y2, 0.3, 4 * k)
    for name in expected:
        torch.testing.assert_close(after[0][name] - after[1][name], expected[name], atol=1e-9, rtol=0)


class _Wrapped(nn.Module):
    """A wrapper around an inner model (as users wrap Hugging Face models)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))

    def forward(self, ids):
        return self.inner(ids)


@pytest.mark.parametrize("when", ["first micro-batch", "after a step"])
def test_a_loss_from_a_submodule_called_directly_is_refused(when):
    # the embedding is recorded by operation, only inside the model's own forward: a loss
    # from model.inner(x) had no record of it, refused with a message about tied weights on
    # the first micro-batch and, after that, its gradient silently left out of the update
    torch.manual_seed(0)
    model, optimizer, criterion, batches = _made_private(
        _Wrapped(), torch.randint(0, 10, (16, 3)), torch.randint(0, 3, (16,)))
    if when == "after a step":
        xb, yb = next(batches)
        criterion(model(xb), yb).backward()
        optimizer.step()
        optimizer.zero_grad()
    inner = model._module.inner if hasattr(model, "_module") else model.inner
    xb, yb = next(batches)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"did not go through the model made private as model\(x\)"):
        criterion(inner(xb), yb).backward()
    assert optimizer.micro_batches_accumulated == 0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_a_layer_inserted_into_a_sequential_after_make_private_is_refused():
    # nn.Sequential.insert writes the module list directly (no registration hook fires)
    import copy

    torch.manual_seed(0)
    model, optimizer, criterion, batches = _made_private(
        nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(16, 6), torch.randint(0, 3, (16,)))
    xb, yb = next(batches)
    criterion(model(xb), yb).backward()
    optimizer.step()
    inner = model._module if hasattr(model, "_module") else model
    inner.insert(1, copy.deepcopy(inner[0]))
    xb, yb = next(batches)
    with pytest.raises(RuntimeError, match=r"'1.weight' requires grad but was frozen"):
        criterion(model(xb), yb).backward()


class _Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize("how", ["head on no_grad features", "head(backbone(x))", "model.forward(x)"])
def test_submodules_called_alone_without_lookups_train_exactly(how):
    # only lookups (embeddings) are recorded inside the model's own call alone: a linear
    # probe's head on features, or the layers called one by one, record by their modules
    from tests.dpclip.models import reference_update

    torch.manual_seed(0)
    model = _Probe().double()
    if how == "head on no_grad features":
        model.backbone.requires_grad_(False)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    _, optimizer, criterion, batches = _made_private(model, x, y, batch_size=8, max_grad_norm=0.5)
    xb, yb = next(batches)
    if how == "head on no_grad features":
        with torch.no_grad():
            features = model.backbone(xb)
        out = model.head(features)
    elif how == "head(backbone(x))":
        out = model.head(model.backbone(xb))
    else:
        out = model.forward(xb)
    criterion(out, yb).backward()
    optimizer.step()
    expected, _ = reference_update(model, initial, xb, yb, 0.5, 8)  # (frozen ones as they are)
    for n, p in model.named_parameters():
        if n in initial:
            torch.testing.assert_close(initial[n] - p.detach(), expected[n], rtol=1e-10, atol=1e-14)


def test_two_views_of_each_example_concatenated_along_the_batch_are_refused():
    # SimCLR's torch.cat([x, flip(x)]): each example had two rows of the loss, each clipped
    # to C, so it moved the update by up to 2C while ε was computed for C
    run = make_run("mlp", poisson_sampling=False)
    xb, yb = next(iter(run.loader))
    before = run.params()
    with pytest.raises(RuntimeError, match=rf"the loss has {2 * len(yb)} per-example values but the DP data "
                       rf"loader handed out {len(yb)} examples.*two augmented views.*Nothing was added"):
        run.criterion(run.model(torch.cat([xb, xb.flip(-1)])), torch.cat([yb, yb])).backward()
    _assert_unchanged(run, before)
    assert run.optimizer.micro_batches_accumulated == 0
    run.criterion(run.model(xb), yb).backward()  # one row per example: taken
    assert run.optimizer.micro_batches_accumulated == 1


class ViewsInside(nn.Module):
    """An augmentation inside the model: two views of each example along the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(torch.cat([x, x.flip(-1)]))


def test_two_views_concatenated_inside_the_model_are_refused():
    # every layer saw 2B rows, as many as the loss: only the loader's count tells
    run = make_run("mlp", poisson_sampling=False, model=ViewsInside().double(), max_grad_norm=1.0)
    xb, yb = next(iter(run.loader))
    before = run.params()
    with pytest.raises(RuntimeError, match=rf"the loss has {2 * len(yb)} per-example values.*in the loop or in "
                       r"the model"):
        run.criterion(run.model(xb), torch.cat([yb, yb])).backward()
    _assert_unchanged(run, before)


def test_a_refused_micro_batch_counted_empty_is_not_warned_of():
    # the refusal says to count it with add_empty_micro_batch(): doing so warned each time
    run = make_run("mlp", poisson_sampling=False)
    xb, yb = next(iter(run.loader))
    with pytest.raises(RuntimeError, match="per-example values but the DP data loader"):
        run.criterion(run.model(torch.cat([xb, xb])), torch.cat([yb, yb])).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.optimizer.add_empty_micro_batch()
    assert run.optimizer.micro_batches_accumulated == 1


def test_fewer_loss_rows_than_handed_out_are_warned_of():
    # a collate that drops examples is fine; a skipped micro-batch is not: said, not refused
    run = make_run("mlp", poisson_sampling=False)
    xb, yb = next(iter(run.loader))
    with pytest.warns(UserWarning, match=rf"the loss has {len(yb) - 1} per-example values but the DP data loader "
                      rf"handed out {len(yb)}.*add_empty_micro_batch"):
        run.criterion(run.model(xb[1:]), yb[1:]).backward()
    assert run.optimizer.micro_batches_accumulated == 1


def test_an_empty_micro_batch_skipped_without_counting_it_is_refused():
    # `continue` past an empty Poisson micro-batch shifted every later logical batch: steps
    # took examples of two of the sampler's draws, against the accountant's assumption
    run = make_run("mlp", batch_size=2, accumulation_steps=2)
    skipped = False
    for xb, yb in run.loader:
        if len(yb) == 0:
            skipped = True
            continue
        if skipped:
            break
        train_logical_batch(run, [(xb, yb)], style=1)
    assert skipped
    before = run.params()
    with pytest.raises(dpclip.LogicalBatchError, match=r"handed out an empty micro-batch.*add_empty_micro_batch"):
        run.criterion(run.model(xb), yb).backward()
    _assert_unchanged(run, before)


def test_an_opacus_batch_memory_manager_around_the_dp_loader_is_refused_with_the_fix():
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    run = make_run("mlp", poisson_sampling=False)
    with pytest.raises(RuntimeError, match=r"needs no BatchMemoryManager.*Iterate that loader directly"):
        with BatchMemoryManager(data_loader=run.loader, max_physical_batch_size=2, optimizer=run.optimizer) as loader:
            for xb, yb in loader:
                run.criterion(run.model(xb), yb).backward()
    assert run.optimizer.micro_batches_accumulated == 0


def test_a_state_taken_after_breaking_out_of_the_loader_says_it_resumes_at_a_new_pass():
    # (the resumed run then takes a new pass, not the rest of the one the loop left: silently
    # not the uninterrupted run, which a user saving after `break` expected)
    run = make_run("mlp", batch_size=8, accumulation_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for xb, yb in run.loader:
            train_logical_batch(run, [(xb, yb)], style=1)
            if run.engine.steps == 1:
                inside = run.engine.state_dict()  # inside the loop: no warning
                break
    with pytest.warns(UserWarning, match=r"after the loop broke out of the DP loader's pass.*resumes with a new "
                      r"pass.*inside the loop"):
        after = run.engine.state_dict()
    assert inside["rng"]["sampling"]["in_pass"] and not after["rng"]["sampling"]["in_pass"]
