"""Forwards with gradients on that no backward uses (evaluation without torch.no_grad()):
their records are dropped, so memory stays bounded, and a loss that did use a dropped
forward is refused instead of under-clipped."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from dpclip import PerSampleClipper
from dpclip.compare import allocated_bytes
from tests.dpclip.helpers import make_run, train_logical_batch
from tests.dpclip.models import MLP, TinyTransformer, make_data, reference_update


@pytest.mark.parametrize("model_type", [MLP, TinyTransformer])
def test_forwards_without_backward_keep_the_records_of_one_forward(model_type):
    torch.manual_seed(0)
    model = model_type().double().eval()
    clipper = PerSampleClipper(model, 1.0)
    kind = "mlp" if model_type is MLP else "transformer"
    x, _ = make_data(kind, 8, torch.Generator().manual_seed(0))
    # the records (and the graph they point into) of the first forward: what it leaves allocated
    _, first = allocated_bytes(lambda: model(x))
    per_forward = len(clipper.recorder.calls)
    assert first > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, more = allocated_bytes(lambda: [model(x) for _ in range(50)])
    assert len(clipper.recorder.calls) == per_forward
    # each forward's records replace the last's: 50 more leave no more allocated
    assert more <= 0.05 * first, (more, first)
    dropped = [w for w in caught if "torch.no_grad()" in str(w.message)]
    assert len(dropped) == 1, [str(w.message) for w in caught]


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_train_step_after_grad_mode_evaluation_is_exact(kind):
    run = make_run(kind, batch_size=4, accumulation_steps=2)
    before = run.params()
    evaluation = run.x[32:40]
    run.model.eval()
    with pytest.warns(UserWarning, match="torch.no_grad"):
        for _ in range(50):
            run.model(evaluation)
    run.model.train()
    micro = [(run.x[:4], run.y[:4]), (run.x[4:8], run.y[4:8])]
    train_logical_batch(run, micro, style=2)
    C = run.optimizer.max_grad_norm
    expected, norms = run.reference(before, run.x[:8], run.y[:8], C, 8)
    assert (norms > C).any() and (norms < C).any()
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)


def test_loss_over_two_forwards_is_refused_not_under_clipped():
    # Siamese style: each example's loss uses its row of two forwards. Starting the second
    # forward drops the first's records; the next backward's audit sees the gradient they
    # carried and refuses, before anything is accumulated.
    run = make_run("mlp", batch_size=4, accumulation_steps=1)
    before = run.params()
    x1, x2, y = run.x[:4], run.x[4:8], run.y[:4]
    with pytest.warns(UserWarning, match="torch.no_grad"):
        loss = run.criterion(run.model(x1) + run.model(x2), y)
    with pytest.raises(RuntimeError, match="several forwards of the model"):
        loss.backward()
    assert run.optimizer.micro_batches_accumulated == 0
    assert run.params().keys() == before.keys()
    for name, value in run.params().items():
        assert torch.equal(value, before[name])
    # training goes on: the next (single-forward) micro-batch is exact
    train_logical_batch(run, [(x1, y)], style=2)
    expected, _ = run.reference(before, x1, y, run.optimizer.max_grad_norm, 4)
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], atol=1e-9, rtol=0)


def test_an_evaluation_between_a_forward_and_its_backward_is_named():
    # a forward with gradients on (an evaluation without torch.no_grad()) between the
    # training forward and its backward drops the training forward's records: the refusal
    # said the forward "was already used by a backward()", which none was (new-user trial)
    run = make_run("mlp", batch_size=4, accumulation_steps=1)
    loss = run.criterion(run.model(run.x[:4]), run.y[:4])
    with pytest.warns(UserWarning, match="torch.no_grad"):
        run.model(run.x[4:8])
    with pytest.raises(RuntimeError, match="another forward of the model with gradients enabled started"):
        loss.backward()
    assert run.optimizer.micro_batches_accumulated == 0


def test_a_loss_whose_records_were_dropped_is_named_after_a_later_backward():
    # forwards run ahead, then backward newest first: the older loss's forward was dropped
    # when the next began, and after the newer backward its refusal had said the forward "was
    # already used by a backward()" (new-user trial)
    run = make_run("mlp", batch_size=4, accumulation_steps=2)
    older = run.criterion(run.model(run.x[:4]), run.y[:4])
    with pytest.warns(UserWarning, match="torch.no_grad"):
        newer = run.criterion(run.model(run.x[4:8]), run.y[4:8])
    newer.backward()
    with pytest.raises(RuntimeError, match="this loss's forward pass is no longer recorded"):
        older.backward()
    assert run.optimizer.micro_batches_accumulated == 1


def test_forwards_that_record_nothing_keep_the_pending_records():
    # A forward under torch.no_grad() or with other parameters (torch.func) between a
    # training forward and its backward is not a new training forward: nothing is dropped.
    torch.manual_seed(0)
    model = MLP().double()
    clipper = PerSampleClipper(model, 1.0)
    x, y = make_data("mlp", 6, torch.Generator().manual_seed(0))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = F.cross_entropy(model(x), y, reduction="none")
        with torch.no_grad():
            model(x)
        torch.func.functional_call(model, params, (x,))
        got = clipper.clipped_sum(losses)
    expected, _ = reference_update(model, params, x, y, 1.0, 1.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[p], expected[name], atol=1e-10, rtol=0)


class _Checkpointed(torch.nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(6, 6)  # (reentrant checkpointing needs an input that requires grad)
        self.inner = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.inner, self.pre(x), use_reentrant=self.reentrant)


def _checkpointed_run(reentrant: bool):
    import dpclip

    torch.manual_seed(0)
    model = _Checkpointed(reentrant).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    dataset = torch.utils.data.TensorDataset(x, y)
    initial = {k: v.clone() for k, v in model.named_parameters()}
    private, optimizer, criterion, loader = dpclip.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        criterion=torch.nn.CrossEntropyLoss(), data_loader=torch.utils.data.DataLoader(dataset, batch_size=4),
        noise_multiplier=0.0, max_grad_norm=0.1, poisson_sampling=False, accumulation_steps=2,
    )
    return model, private, optimizer, criterion, loader, initial


def test_gradient_checkpointing_trains_as_without_and_warns_of_no_dropped_forward():
    # non-reentrant checkpointing runs the block's forward again inside dpclip's backward:
    # those records were left for the next forward to drop, with a warning that the model
    # ran twice without a backward (the user's loop had not)
    model, private, optimizer, criterion, loader, initial = _checkpointed_run(reentrant=False)
    batches = list(loader)[:2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for xb, yb in batches:
            criterion(private(xb), yb).backward()
        optimizer.step()
    assert not [w for w in caught if "dropped" in str(w.message)], [str(w.message) for w in caught]
    plain = _Checkpointed(reentrant=False).double()
    plain.forward = lambda x: plain.inner(plain.pre(x))  # (torch.func's reference: no checkpoint)
    x = torch.cat([xb for xb, _ in batches])
    y = torch.cat([yb for _, yb in batches])
    expected, _ = reference_update(plain, initial, x, y, 0.1, 8)
    for name, p in model.named_parameters():
        torch.testing.assert_close(initial[name] - p.detach(), expected[name], rtol=1e-10, atol=1e-14)


def test_reentrant_gradient_checkpointing_is_refused_naming_the_fix():
    _, private, optimizer, criterion, loader, _ = _checkpointed_run(reentrant=True)
    xb, yb = next(iter(loader))
    with pytest.raises(RuntimeError, match="use_reentrant=True cannot run under dpclip.*use_reentrant=False"):
        criterion(private(xb), yb).backward()
    assert optimizer.micro_batches_accumulated == 0


class _CheckpointedEncoder(torch.nn.Module):
    """nn.TransformerEncoderLayer (its nn.MultiheadAttention) under non-reentrant
    checkpointing, as a user builds a memory-saving transformer from torch's layers, on
    an input that requires grad (an embedding's, here a linear layer's)."""

    def __init__(self, checkpointed: bool = True) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(8, 8)
        self.layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(8, 3)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(self.layer, h, use_reentrant=False)
        else:
            h = self.layer(h)
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_checkpointed_multihead_attention_trains_as_without(memory):
    # dpclip sees nn.MultiheadAttention's projections by running torch's attention function
    # with a recording linear; the forward that checkpointing runs again inside dpclip's
    # backward took torch's own path, whose saved tensors differ, and torch refused it
    # (CheckpointError: "Recomputed values ... have different metadata")
    import dpclip

    torch.manual_seed(0)
    model = _CheckpointedEncoder().double()
    x, y = torch.randn(8, 5, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    initial = {k: v.clone() for k, v in model.named_parameters()}
    private, optimizer, criterion, loader = dpclip.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        criterion=torch.nn.CrossEntropyLoss(),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4),
        noise_multiplier=0.0, max_grad_norm=2.7, poisson_sampling=False, accumulation_steps=2, memory=memory,
    )
    for xb, yb in loader:
        criterion(private(xb), yb).backward()
    optimizer.step()
    plain = _CheckpointedEncoder(checkpointed=False).double()
    expected, norms = reference_update(plain, initial, x, y, 2.7, 8)
    assert (norms > 2.7).any() and (norms < 2.7).any()
    for name, p in model.named_parameters():
        torch.testing.assert_close(initial[name] - p.detach(), expected[name], rtol=1e-10, atol=1e-14)


class _CheckpointedReuse(torch.nn.Module):
    """Linear layers inside checkpointed regions: one block run in two regions (its
    weights shared, ALBERT-like), a layer run twice in one region, and a layer on the
    region's input (a leaf that needs no gradient)."""

    def __init__(self, checkpointed: bool = True) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(6, 6)
        self.block = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6))
        self.twice = torch.nn.Linear(6, 6)
        self.first = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)
        self.checkpointed = checkpointed

    def _region(self, fn, *args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False) if self.checkpointed else fn(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._region(lambda v: torch.tanh(self.first(v)), x) + self.pre(x)
        h = self._region(self.block, h)
        h = self._region(self.block, 2 * h)
        h = self._region(lambda v: self.twice(torch.tanh(self.twice(v))), h)
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("memory", ["fast", "low", "auto"])
def test_checkpointed_regions_give_each_call_its_own_input(memory):
    # the backward re-runs the regions in the opposite order, and a layer run twice in a
    # region twice: each call's norm and share of the sum must stay its own
    import dpclip

    torch.manual_seed(0)
    model = _CheckpointedReuse().double()
    x, y = torch.randn(8, 5, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    initial = {k: v.clone() for k, v in model.named_parameters()}
    plain = _CheckpointedReuse(checkpointed=False).double()
    _, norms = reference_update(plain, initial, x, y, 1.0, 1.0)
    C = float(norms.median())
    expected, _ = reference_update(plain, initial, x, y, C, 8)
    private, optimizer, crit, loader = dpclip.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=torch.nn.CrossEntropyLoss(),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4),
        noise_multiplier=0.0, max_grad_norm=C, poisson_sampling=False, accumulation_steps=2, memory=memory,
    )
    for xb, yb in loader:
        crit(private(xb), yb).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(initial[name] - p.detach(), expected[name], rtol=1e-10, atol=1e-14)

