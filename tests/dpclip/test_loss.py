"""Per-example losses (``dpclip.loss``): each example's loss is what the criterion gives
for that example alone, with the user's reduction."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpclip
from dpclip.loss import per_example_losses

B, T, V = 6, 7, 5


def _labels(gen: torch.Generator, ignore: int = -100) -> torch.Tensor:
    """[B, T] class indices with padded tails of ``ignore`` (example 0 keeps all T, example
    1 has a single label)."""
    labels = torch.randint(0, V, (B, T), generator=gen)
    lengths = torch.tensor([T, 1, 2, 3, 5, 6])
    return labels.masked_fill(torch.arange(T) >= lengths[:, None], ignore)


def _alone(criterion: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B]: the criterion, with its own reduction, on each example alone: the reference."""
    return torch.stack([criterion(inputs[i:i + 1], targets[i:i + 1]) for i in range(B)])


CASES = {
    "ignore_index": lambda: nn.CrossEntropyLoss(),
    "weight": lambda: nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)),
    "weight, smoothing, ignore 0": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64), ignore_index=0, label_smoothing=0.1),
    "nll": lambda: nn.NLLLoss(ignore_index=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_token_loss_is_each_example_alone(case):
    # torch's "mean" over class indices divides by the (weighted) count of the targets it
    # does not ignore; averaging each example's T positions instead scaled a padded
    # sequence's gradient by its share of labelled tokens (6.8e-1 off unclipped, GPT-NeoX)
    gen = torch.Generator().manual_seed(0)
    criterion = CASES[case]()
    logits = torch.randn(B, V, T, generator=gen, dtype=torch.float64)
    labels = _labels(gen, criterion.ignore_index)
    inputs = logits.log_softmax(dim=1) if case == "nll" else logits
    got = per_example_losses(criterion, inputs, labels)
    alone = _alone(criterion, inputs, labels)
    torch.testing.assert_close(got, alone, rtol=1e-12, atol=0)
    assert criterion.reduction == "mean"


def test_segmentation_targets_and_keyword_target():
    gen = torch.Generator().manual_seed(1)
    criterion = nn.CrossEntropyLoss(ignore_index=255)
    logits = torch.randn(B, V, 3, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (B, 3, 4), generator=gen)
    labels[:, 0] = 255
    alone = _alone(criterion, logits, labels)
    torch.testing.assert_close(per_example_losses(criterion, logits, target=labels), alone, rtol=1e-12, atol=0)


def test_other_token_losses_average_the_positions():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(B, V, T, generator=gen, dtype=torch.float64)
    probabilities = torch.rand(B, V, T, generator=gen, dtype=torch.float64).softmax(dim=1)
    for criterion, target in ((nn.CrossEntropyLoss(), probabilities), (nn.MSELoss(), probabilities)):
        alone = _alone(criterion, logits, target)
        torch.testing.assert_close(per_example_losses(criterion, logits, target), alone, rtol=1e-12, atol=0)
    summed = nn.CrossEntropyLoss(reduction="sum")
    labels = _labels(gen)
    alone = _alone(summed, logits, labels)
    torch.testing.assert_close(per_example_losses(summed, logits, labels), alone, rtol=1e-12, atol=0)


def test_an_example_with_every_target_ignored_has_loss_zero_not_nan():
    logits = torch.randn(B, V, T, dtype=torch.float64, requires_grad=True)
    labels = torch.full((B, T), -100)
    labels[0, :2] = 1
    losses = per_example_losses(nn.CrossEntropyLoss(), logits, labels)
    assert torch.isfinite(losses).all() and (losses[1:] == 0).all() and losses[0] > 0
    losses.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1:] == 0).all()


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids))).transpose(1, 2)  # [B, V, T]


def test_a_padded_language_model_step_is_the_mean_of_each_sequences_own_loss_gradient():
    # end to end, nothing clipped (C large), σ 0: the update is (1/B) Σ_i ∇ℓ_i with ℓ_i the
    # criterion on sequence i alone, from an unwrapped copy of the model
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = _TinyLM().double()
    reference = _TinyLM().double()
    reference.load_state_dict(model.state_dict())
    ids, labels = torch.randint(0, V, (B, T), generator=gen), _labels(gen)
    dataset = torch.utils.data.TensorDataset(ids, labels)
    criterion = nn.CrossEntropyLoss()
    model, optimizer, private, loader = dpclip.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=criterion,
        data_loader=torch.utils.data.DataLoader(dataset, batch_size=B), noise_multiplier=0.0,
        max_grad_norm=1e6, poisson_sampling=False,
    )
    (x, y), = list(loader)
    private(model(x), y).backward()
    optimizer.step()
    params = list(reference.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for i in range(B):
        i_ids, i_labels = x[i:i + 1], y[i:i + 1]
        grads = torch.autograd.grad(criterion(reference(i_ids), i_labels), params)
        for e, g in zip(expected, grads):
            e += g / B
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-14)


class _Focal(nn.CrossEntropyLoss):
    """A subclass with its own forward, averaging over every position as it likes."""

    def forward(self, logits, labels):
        losses = F.cross_entropy(logits, labels, reduction="none", ignore_index=self.ignore_index)
        losses = (1 - torch.exp(-losses)) ** 2 * losses
        return losses if self.reduction == "none" else losses.mean()


class _TokenCrossEntropy(nn.CrossEntropyLoss):
    """The usual thin subclass: logits [B, T, V] transposed for torch's [B, V, T]."""

    def forward(self, logits, labels):
        return super().forward(logits.transpose(1, 2), labels)


@pytest.mark.parametrize("subclass, shape, seed", [(_Focal, (B, V, T), 4), (_TokenCrossEntropy, (B, T, V), 5)])
def test_a_criterion_subclass_with_its_own_forward_is_each_example_alone(subclass, shape, seed):
    # a focal loss of one's own averages over positions, the usual thin subclass (logits
    # transposed for torch) over the labelled tokens: told apart by one call on one example
    gen = torch.Generator().manual_seed(seed)
    criterion = subclass()
    logits = torch.randn(*shape, generator=gen, dtype=torch.float64)
    labels = _labels(gen)
    alone = _alone(criterion, logits, labels)
    for _ in range(2):  # (the second from what the first told)
        torch.testing.assert_close(per_example_losses(criterion, logits, labels), alone, rtol=1e-12, atol=0)


class _ShiftedCrossEntropy(nn.CrossEntropyLoss):
    """A causal LM's loss that shifts inside: position t predicts label t + 1, so its
    per-position losses ([B, T - 1]) no longer line up with the labels ([B, T])."""

    def forward(self, logits, labels):
        return super().forward(logits[:, :-1].transpose(1, 2), labels[:, 1:])


@pytest.mark.parametrize("weight", [None, torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)])
def test_a_criterion_that_shifts_inside_is_each_example_alone(weight):
    # the labelled tokens could not be counted from the outside, and a padded sequence's
    # loss was averaged over all T - 1 positions: example 0 of a tiny model 2/5 of its
    # own loss, the update 0.44 off, silently
    gen = torch.Generator().manual_seed(6)
    criterion = _ShiftedCrossEntropy(weight=weight)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = _labels(gen)
    # (example 1 keeps no label after the shift: loss 0, where torch's own mean is 0/0)
    expected = _alone(criterion, logits, labels).nan_to_num(0.0)
    got = per_example_losses(criterion, logits, labels)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert got.requires_grad
    full = torch.randint(0, V, (B, T), generator=gen)  # no padding: every position counts
    torch.testing.assert_close(
        per_example_losses(criterion, logits, full), _alone(criterion, logits, full), rtol=1e-12, atol=0
    )


def test_kl_divergence_with_batchmean_is_each_example_alone_and_trains():
    # torch's recommended reduction for KL (distillation): "batchmean", the sum over an
    # example's entries averaged over the batch; one example alone is its sum
    gen = torch.Generator().manual_seed(0)
    log_p = torch.randn(B, T, V, generator=gen, dtype=torch.float64).log_softmax(-1)
    target = torch.randn(B, T, V, generator=gen, dtype=torch.float64).softmax(-1)
    criterion = nn.KLDivLoss(reduction="batchmean")
    losses = per_example_losses(criterion, log_p, target)
    torch.testing.assert_close(losses, _alone(criterion, log_p, target), rtol=1e-12, atol=0)
    assert criterion.reduction == "batchmean"

    torch.manual_seed(0)
    x = torch.randn(4 * B, 3, generator=gen, dtype=torch.float64)
    soft = torch.randn(4 * B, V, generator=gen, dtype=torch.float64).softmax(-1)
    model = nn.Sequential(nn.Linear(3, V), nn.LogSoftmax(-1)).double()
    plain = nn.Sequential(nn.Linear(3, V), nn.LogSoftmax(-1)).double()
    plain.load_state_dict(model.state_dict())
    C = 0.05
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, dp_criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=criterion,
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, soft), batch_size=B),
        noise_multiplier=0.0, max_grad_norm=C, accumulation_steps=4, poisson_sampling=False,
    )
    expected = {n: torch.zeros_like(p) for n, p in plain.named_parameters()}
    for i in range(4 * B):  # one example at a time: its KL, clipped to C, summed, over L = 4B
        plain.zero_grad()
        criterion(plain(x[i:i + 1]), soft[i:i + 1]).backward()
        grads = {n: p.grad for n, p in plain.named_parameters()}
        factor = min(1.0, C / float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))))
        for n, g in grads.items():
            expected[n] += factor * g / (4 * B)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reported = []
    for xb, sb in loader:
        loss = dp_criterion(model(xb), sb)
        reported.append(loss.item())
        loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), expected[n], rtol=1e-10, atol=1e-13, msg=n)
    with torch.no_grad():  # what the criterion reports: its own reduction, batchmean
        torch.testing.assert_close(reported[0], float(criterion(plain(x[:B]), soft[:B])), rtol=1e-12, atol=0)
