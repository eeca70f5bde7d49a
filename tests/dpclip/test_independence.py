"""The independence probe (DESIGN §4.8): a model or criterion that mixes examples
is refused before anything is accumulated; a per-example one is never refused."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from dpclip import PerSampleClipper
from dpclip.independence import ExamplesMixedError
from tests.dpclip.models import CLASSES, MLP, MODELS, SEQ, VOCAB, TinyTransformer, make_data


class FunctionalBatchNorm(nn.Module):
    """Batch statistics without a BatchNorm module: no type check sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 16)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(F.batch_norm(self.fc(x), None, None, training=True)))


class SequenceFirstAttention(nn.Module):
    """Goes sequence-first, then hands [T, B, E] to attention built with batch_first=True
    and pools over dim 1: it attends and averages across the batch. The shapes agree with
    the loss's only when T == B, and then every shape check passes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).transpose(0, 1)  # [T, B, E]
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a.mean(dim=1))


class PrototypeLoss(nn.Module):
    """Prototypical-network loss: each example's distances to class means of the batch."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(y, CLASSES).to(z.dtype)
        prototypes = onehot.T @ z / onehot.sum(0).clamp(min=1).unsqueeze(1)
        losses = F.cross_entropy(-torch.cdist(z, prototypes), y, reduction="none")
        return {"none": losses, "sum": losses.sum(), "mean": losses.mean()}[self.reduction]


class BatchMaxScaled(nn.Module):
    """A per-example normalisation written over the batch: x / x.abs().max(). Replacing
    example 0 by another example moves nothing unless example 0 holds the maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x / x.abs().max())


class BroadcastTarget(nn.MSELoss):
    """The regression slip: predictions [B, 1] against a target [B], which MSELoss
    broadcasts to [B, B] (torch only warns): example i's loss is over every target."""

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().forward(out[:, :1], y.to(out.dtype))


#: (model, criterion, data kind): each mixes examples in its own way; B = SEQ so that the
#: sequence-first model's shapes pass
MIXING = {
    "functional_batch_norm": (FunctionalBatchNorm, nn.CrossEntropyLoss, "mlp"),
    "sequence_first": (SequenceFirstAttention, nn.CrossEntropyLoss, "transformer"),
    "batch_loss": (MLP, PrototypeLoss, "mlp"),
    "batch_max": (BatchMaxScaled, nn.CrossEntropyLoss, "mlp"),
    "broadcast_target": (MLP, BroadcastTarget, "mlp"),
}


def _private(model, criterion, kind, *, n=4 * SEQ, batch_size=SEQ):
    x, y = make_data(kind, n, torch.Generator().manual_seed(0), torch.float64)
    engine = dpclip.PrivacyEngine(accountant="rdp")
    return engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        criterion=criterion,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(1),
    )


def _per_example(losses: torch.Tensor) -> torch.Tensor:
    return losses.mean(dim=1) if losses.dim() > 1 else losses  # (BroadcastTarget's [B, B])


def _counting_calls(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("case", list(MIXING))
def test_mixing_is_refused_before_anything_is_accumulated(case):
    make_model, make_criterion, kind = MIXING[case]
    torch.manual_seed(0)
    model, optimizer, criterion, loader = _private(make_model().double(), make_criterion(), kind)
    before = copy.deepcopy(model.state_dict())
    x, y = next(iter(loader))
    subject = f"model ({make_model.__name__})"
    if case in ("batch_loss", "broadcast_target"):
        subject = f"criterion ({make_criterion.__name__})"
    with pytest.raises(ExamplesMixedError, match=re.escape(f"the {subject} mixes examples")) as err:
        criterion(model(x), y).backward()
    message = str(err.value)
    for words in ("example 0", "bounds nothing", "batch statistics", "check_independence=False"):
        assert words in message
    assert optimizer.micro_batches_accumulated == 0
    assert optimizer.clipper.recorder.calls == []
    with pytest.raises(dpclip.LogicalBatchError, match="no backward"):
        optimizer.step()  # nothing to apply
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("case", [*MIXING, "per_example"])
def test_what_the_probe_refuses_leaks_one_example_into_the_others_gradients(case):
    # Why refusing is right: with the check off, changing example 0 moves the clipped sum of
    # examples 1..B-1, which per-example clipping assumes it cannot (the control does not).
    make_model, make_criterion, kind = MIXING.get(case, (MLP, nn.CrossEntropyLoss, "mlp"))
    torch.manual_seed(0)
    model = make_model().double()
    criterion = make_criterion(reduction="none")
    x, y = make_data(kind, SEQ, torch.Generator().manual_seed(0), torch.float64)
    neighbour = x.clone()
    neighbour[0] = make_data(kind, 1, torch.Generator().manual_seed(1), torch.float64)[0][0]
    if case == "batch_max":  # a neighbour whose example 0 is an outlier
        neighbour[0] *= 100
    if case == "broadcast_target":  # (it mixes through the targets: change example 0's,
        # by enough to move the mean target past the predictions: clipping keeps the
        # gradients' lengths at C, and only a change of sign then moves them)
        neighbour, y = x, torch.stack([y, torch.cat([y[:1] - 1000, y[1:]])])
    else:
        y = torch.stack([y, y])
    others = torch.ones(SEQ, dtype=torch.float64)
    others[0] = 0.0  # example 0's own gradient left out of the sum
    C = 0.1
    clipper = PerSampleClipper(model, C, check_independence=False)
    calls = _counting_calls(model)
    sums = [
        clipper.clipped_sum(_per_example(criterion(model(inputs), labels)) * others)
        for inputs, labels in zip((x, neighbour), y)
    ]
    assert len(calls) == 2  # no probe ran
    moved = torch.sqrt(sum((sums[0][p] - sums[1][p]).pow(2).sum() for p in model.parameters()))
    if case == "per_example":
        assert moved == 0
    else:
        assert moved > 1e-3 * C


@pytest.mark.parametrize("kind", list(MODELS))
def test_per_example_models_are_probed_once_and_accepted(kind):
    torch.manual_seed(0)
    model = MODELS[kind]().double().train()
    clipper = PerSampleClipper(model, 1.0)
    calls = _counting_calls(model)
    x, y = make_data(kind, 6, torch.Generator().manual_seed(0))
    losses = F.cross_entropy(model(x), y, reduction="none")
    # the forward and the probe's: example 0 replaced, then (floating-point inputs) extreme
    probes = 2 if x.is_floating_point() else 1
    assert len(calls) == 1 + probes
    clipper.clipped_sum(losses)
    clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
    assert len(calls) == 2 + probes  # probed once, then trained on: not again


class RefusesLargeInputs(MLP):
    """A model that checks its inputs' range (as some preprocessing does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 100:
            raise ValueError("inputs out of range")
        return super().forward(x)


def test_a_model_that_refuses_the_extreme_probes_inputs_is_accepted_without_a_warning():
    torch.manual_seed(0)
    model = RefusesLargeInputs().double()
    clipper = PerSampleClipper(model, 1.0)
    x, y = make_data("mlp", 6, torch.Generator().manual_seed(0), torch.float64)
    x[2] = 60.0  # twice it is out of range: the second probe's run raises, the first stands
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = F.cross_entropy(model(x), y, reduction="none")
    clipper.clipped_sum(losses)
    assert not clipper.recorder.independence.pending  # probed (by the first probe), done


def test_dropout_masks_are_the_real_forwards_and_the_random_state_is_left_as_it_was():
    torch.manual_seed(0)
    model = TinyTransformer(dropout=0.3).double().train()
    plain = copy.deepcopy(model)
    PerSampleClipper(model, 1.0)
    calls = _counting_calls(model)
    x, _ = make_data("transformer", 6, torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    out = model(x)
    state = torch.get_rng_state()
    torch.manual_seed(5)
    expected = plain(x)
    assert len(calls) == 2
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(out, expected)


class MaskedEncoder(nn.Module):
    """Hugging Face style: keyword inputs, an attention mask, an optional [T, T] causal
    mask (no batch dimension), a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.2, batch_first=True)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, input_ids, attention_mask, causal_mask=None):
        h = self.layer(
            self.emb(input_ids), src_mask=causal_mask, src_key_padding_mask=attention_mask == 0
        )
        return {"logits": self.head(h.mean(dim=1)), "hidden": h}


@pytest.mark.parametrize("causal", [False, True])
def test_masks_and_keyword_inputs_are_not_mistaken_for_mixing(causal):
    torch.manual_seed(0)
    model = MaskedEncoder().double().train()
    clipper = PerSampleClipper(model, 1.0)
    calls = _counting_calls(model)
    tokens, y = make_data("transformer", SEQ, torch.Generator().manual_seed(0))
    inputs = {"input_ids": tokens, "attention_mask": (tokens != 0).long()}
    if causal:  # [T, T] with T == B: its leading dimension looks like the batch's
        inputs["causal_mask"] = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)
    losses = F.cross_entropy(model(**inputs)["logits"], y, reduction="none")
    assert len(calls) > 1
    clipper.clipped_sum(losses)


def test_evaluation_with_gradients_on_is_not_mistaken_for_mixing():
    # In eval mode without gradients nn.TransformerEncoder takes its fast path, which
    # zeroes padded positions: the probe's re-run differs from the real forward where
    # examples have padding, but not from a re-run of the unchanged inputs.
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)

        def forward(self, tokens):
            return self.encoder(self.emb(tokens), src_key_padding_mask=tokens == 0)

    torch.manual_seed(0)
    model = Encoder().double().eval()
    PerSampleClipper(model, 1.0)
    calls = _counting_calls(model)
    x, _ = make_data("transformer", 8, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage")
        model(x)
    assert len(calls) == 3  # the forward, the probe, the unchanged re-run


def test_per_token_criterion_is_probed_once_and_accepted():
    class TokenModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 8)
            self.head = nn.Linear(8, VOCAB)

        def forward(self, tokens):
            return self.head(torch.tanh(self.emb(tokens))).transpose(1, 2)  # [B, V, T]

    torch.manual_seed(0)
    loss = nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=0)
    model, optimizer, criterion, loader = _private(TokenModel().double(), loss, "transformer")
    calls = _counting_calls(loss)
    for tokens, _ in loader:
        criterion(model(tokens), tokens).backward()
        optimizer.step()
    assert len(calls) == len(loader) + 1


def test_a_regression_target_that_broadcasts_against_the_predictions_is_refused_naming_the_shapes():
    # nn.MSELoss on predictions [B, 1] and a target [B]: [B, B] (torch only warns), each
    # example's loss over every target; two datasets differing in one target gave updates
    # 3.7 times 2C/L apart (review of the independence probe)
    torch.manual_seed(0)
    x = torch.randn(16, 5, dtype=torch.float64)
    t = torch.randn(16, dtype=torch.float64)
    model = nn.Linear(5, 1).double()
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=nn.MSELoss(),
        data_loader=DataLoader(TensorDataset(x, t), batch_size=8), noise_multiplier=0.0,
        max_grad_norm=0.1, poisson_sampling=False, accumulation_steps=2,
    )
    xb, tb = next(iter(loader))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's broadcasting warning)
        with pytest.raises(ExamplesMixedError, match=r"shapes \(8, 1\) and \(8,\), which broadcast to \(8, 8\)"):
            criterion(model(xb), tb)
        assert optimizer.micro_batches_accumulated == 0
        criterion(model(xb), tb.view(-1, 1)).backward()  # the fix the message names trains
    assert optimizer.micro_batches_accumulated == 1


def test_check_independence_false_skips_the_probe():
    torch.manual_seed(0)
    model = FunctionalBatchNorm().double()
    PerSampleClipper(model, 1.0, check_independence=False)
    calls = _counting_calls(model)
    model(torch.randn(4, 10, dtype=torch.float64))
    assert len(calls) == 1


def test_a_probe_that_cannot_run_warns_and_stops_probing():
    class SortedLengths(nn.Module):
        """Needs strictly decreasing lengths: example 0 given example 1's length is refused."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, CLASSES)

        def forward(self, x, lengths):
            if not (lengths[:-1] > lengths[1:]).all():
                raise ValueError("lengths must decrease")
            return self.fc(x)

    model = SortedLengths().double()
    clipper = PerSampleClipper(model, 1.0)
    calls = _counting_calls(model)
    x, lengths = torch.randn(3, 3, dtype=torch.float64), torch.tensor([3, 2, 1])
    with pytest.warns(UserWarning, match="could not run.*lengths must decrease.*not checked"):
        model(x, lengths)
    clipper.discard()
    model(x, lengths)
    assert len(calls) == 3  # the forward, the failed probe; then the forward alone


def test_moved_examples_allows_rounding_only_and_ignores_example_zero():
    from dpclip.independence import TOLERANCE_EPS, moved_examples

    a = torch.tensor([[1.0, -4.0], [2.0, float("nan")], [0.5, float("inf")]])
    eps = torch.finfo(a.dtype).eps
    assert moved_examples({"y": a}, {"y": a.clone()}, 3) is None
    b = a.clone()
    b[0] = 100.0  # example 0 may change
    b[1, 0] += 0.5 * TOLERANCE_EPS * eps * 4.0  # rounding, at the tensor's scale (4)
    assert moved_examples({"y": a}, {"y": b}, 3) is None
    b[2, 0] += 1e-3
    moved = moved_examples({"y": a}, {"y": b}, 3)
    assert (moved.output, moved.example) == ("['y']", 2)
    assert moved.amount == pytest.approx(1e-3, rel=1e-3)
    assert moved.tolerance == pytest.approx(TOLERANCE_EPS * eps * 4.0)
    b = a.clone()
    b[1, 1] = 0.0  # a NaN that became a number moved
    assert moved_examples((a,), (b,), 3).example == 1
    c = a.clone()
    c[2, 1] = float("nan")  # a number that became NaN: moved by inf
    assert moved_examples(a, c, 3).amount == float("inf")
    # outputs without B leading rows or not floating-point are not compared
    other = [torch.zeros(2), torch.arange(3)]
    assert moved_examples(other, [torch.ones(2), torch.arange(3) + 1], 3) is None


class TabularWithCodes(nn.Module):
    """A float matrix whose column 0 is a category code (cast to an index), beside
    continuous columns, an empty float input, and a shared float table [B', 3] that is
    not the examples' (B' == B by chance): none of these may trip the second probe."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.fc = nn.Linear(3 + 5 + 3, CLASSES)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor, empty: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0].long()
        self.seen.append(int(ids.max()))
        shared = table.mean(dim=0).expand(x.shape[0], -1)  # the same for every example
        return self.fc(torch.cat([self.emb(ids), x[:, 1:], shared + empty.sum()], dim=1))


def test_the_second_probe_keeps_codes_in_range_and_takes_no_table_for_examples():
    # (review of the second probe: an out-of-range id is a device-side assert on CUDA; an
    # empty float input crashed the probe; a batch-sized float table was refused)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randint(0, 4, (6, 1), generator=gen).double(), torch.randn(6, 5, generator=gen, dtype=torch.float64)], 1)
    y = torch.randint(0, CLASSES, (6,), generator=gen)
    empty = torch.empty(6, 0, dtype=torch.float64)
    torch.manual_seed(0)
    model = TabularWithCodes().double()
    clipper = PerSampleClipper(model, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = F.cross_entropy(model(x, empty, torch.zeros(6, 3, dtype=torch.float64)), y, reduction="none")
    # the forward and the first two probes: codes in range; the third (on the CPU only) tops
    # the integer column by one, out of the table's range: its run raised and was skipped
    assert len(model.seen) == 4 and max(model.seen[:3]) <= 3 and model.seen[3] == 4
    clipper.clipped_sum(losses)
    # a table that is no example's moves the others when example 0's row changes, and changing
    # the first input alone moves none: not refused, but said (a later per-example input
    # could mix examples so)
    torch.manual_seed(0)
    model = TabularWithCodes().double()
    clipper = PerSampleClipper(model, 1.0)
    table = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"example 0 in argument 0, argument 1, argument 2 moved .* first input alone did not"):
        losses = F.cross_entropy(model(x, empty, table), y, reduction="none")
    clipper.clipped_sum(losses)
    assert not clipper.recorder.independence.pending


class WeightedByArgument(nn.Module):
    """Cross-entropy whose class weights come as an argument: [C] with C == B here."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, weight=weight, reduction=self.reduction)


def test_a_criterions_batch_sized_argument_after_the_targets_is_not_taken_for_examples():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=WeightedByArgument(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=3), noise_multiplier=0.0,
        max_grad_norm=0.1, poisson_sampling=False,
    )
    weight = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)  # C == B == 3
    for xb, yb in loader:
        criterion(model(xb), yb, weight).backward()
        optimizer.step()
    assert engine.steps == 4


class LaterInputBatchNorm(nn.Module):
    """The tabular signature forward(categories, continuous) with batch statistics over the
    second input: the first probe's refusal is confirmed by the first input alone."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.fc = nn.Linear(3 + 5, CLASSES)

    def forward(self, codes: torch.Tensor, continuous: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.emb(codes), F.batch_norm(continuous, None, None, training=True)], 1))


def test_mixing_through_a_later_input_is_warned_of_and_a_sparse_input_leaves_the_probe_unchecked():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (6,), generator=gen)
    continuous = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    model = LaterInputBatchNorm().double()
    PerSampleClipper(model, 1.0)
    with pytest.warns(UserWarning, match="argument 1 moved example .* the privacy guarantee does not hold"):
        model(codes, continuous)
    # a sparse input: the probe cannot compare its rows, and says so (it had crashed the forward)
    torch.manual_seed(0)
    model = WithSparseInput().double()
    PerSampleClipper(model, 1.0)
    x = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"probe of the model \(WithSparseInput\) could not run"):
        model(x, x.to_sparse())


class WithSparseInput(MLP):
    def forward(self, x: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class TwoTower(nn.Module):
    """Users against the batch's items: in-batch negatives, each user scored on every item."""

    def __init__(self) -> None:
        super().__init__()
        self.users, self.items = nn.Linear(5, 4), nn.Linear(6, 4)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.users(user) @ self.items(item).T  # [B, B]


class InBatchNegatives(nn.Module):
    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scores, torch.arange(scores.shape[0]), reduction=self.reduction)


class NormalisedByBatchWeight(nn.Module):
    """Per-example losses weighted by w / Σ w over the batch: each depends on all weights."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, out: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(out, y, reduction="none") * w / w.sum()
        return losses if self.reduction == "none" else losses.sum()


def _private_on(model, criterion, *tensors):
    engine = dpclip.PrivacyEngine(accountant="rdp")
    return engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=criterion,
        data_loader=DataLoader(TensorDataset(*tensors), batch_size=4), noise_multiplier=0.0,
        max_grad_norm=0.1, poisson_sampling=False,
    )


@pytest.mark.parametrize("case", ["two_tower", "later_input_batch_norm", "weights_normalised_over_the_batch"])
def test_mixing_through_a_later_input_from_the_dp_loader_is_refused(case):
    # the input's values are the micro-batch's own (the loader's dataset gives them), so it is
    # no table with B rows by chance: refused, where it was only warned of and trained
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = 12
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    if case == "two_tower":
        model, criterion = TwoTower().double(), InBatchNegatives()
        data = (torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randn(n, 6, generator=gen, dtype=torch.float64), y)
    elif case == "later_input_batch_norm":
        model, criterion = LaterInputBatchNorm().double(), nn.CrossEntropyLoss()
        data = (torch.randint(0, 4, (n,), generator=gen), torch.randn(n, 5, generator=gen, dtype=torch.float64), y)
    else:
        model, criterion = nn.Linear(5, CLASSES).double(), NormalisedByBatchWeight()
        data = (torch.randn(n, 5, generator=gen, dtype=torch.float64), y, torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
    model, optimizer, criterion, loader = _private_on(model, criterion, *data)
    batch = next(iter(loader))
    with pytest.raises(dpclip.ExamplesMixedError, match=r"mixes examples: changing only example 0"):
        if case == "weights_normalised_over_the_batch":
            x, yb, w = batch
            criterion(model(x), yb, w).backward()
        else:
            *inputs, yb = batch
            criterion(model(*inputs), yb).backward()
    assert optimizer.micro_batches_accumulated == 0


def test_a_later_input_that_is_not_the_loaders_data_is_only_warned_of():
    # a table with B rows by chance, passed by the loop: not the examples'
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = torch.randn(12, 5, generator=gen, dtype=torch.float64), torch.randint(0, CLASSES, (12,), generator=gen)
    table = torch.randn(4, 5, generator=gen, dtype=torch.float64)  # B == 4 rows
    model, optimizer, criterion, loader = _private_on(TableArgument().double(), nn.CrossEntropyLoss(), x, y)
    xb, yb = next(iter(loader))
    with pytest.warns(UserWarning, match="but changing it in the first input alone did not"):
        loss = criterion(model(xb, table), yb)
    loss.backward()
    assert optimizer.micro_batches_accumulated == 1


class TableArgument(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, CLASSES)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return self.fc(x + table.mean(dim=0))


class ScaledByBatchMaximum(nn.Module):
    """Features already within [0, 1] (min-max scaled) or counts, divided by the batch's
    maximum: the second probe leaves such features alone (doubled, they could leave their
    range), so example 0 rarely held the maximum and the model trained."""

    def __init__(self, per_column: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(5, CLASSES)
        self.per_column = per_column

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x / (x.amax(dim=0) if self.per_column else x.max()))


@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("features", ["unit", "counts"])
@pytest.mark.parametrize("seed", range(4))
def test_a_batch_maximum_over_unit_or_count_features_is_refused(per_column, features, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 5, generator=gen, dtype=torch.float64)
    if features == "counts":
        x = torch.randint(0, 20, (8, 5), generator=gen).double() + 1
    y = torch.randint(0, CLASSES, (8,), generator=gen)
    torch.manual_seed(0)
    model = ScaledByBatchMaximum(per_column).double()
    PerSampleClipper(model, 1.0)
    with pytest.raises(dpclip.ExamplesMixedError, match="mixes examples"):
        model(x)
