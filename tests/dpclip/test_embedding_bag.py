"""nn.EmbeddingBag is exact (σ = 0 update against a one-example-at-a-time reference) in
every mode, with per-sample weights, padding, 2-D input and 1-D input with offsets, and
with ids repeated inside a bag first appearing after the first (audited) micro-batch; the
configurations it cannot clip per example are refused at make_private."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from tests.dpclip.per_example import K, relative_error

VOCAB, DIM, CLASSES, B, L = 10, 4, 3, 3, 5


class Bags(nn.Module):
    """Token ids [B, L] (``PAD`` = empty slot) → class logits. ``flat``: the bag layer is
    called on the 1-D concatenation of the non-empty slots with offsets (``include_last``:
    offsets end with the total length); else on the 2-D ids. ``weighted``: per-sample
    weights [B, L] are passed too (mode sum)."""

    PAD = -1

    def __init__(self, mode: str, flat: bool, weighted: bool, include_last: bool = False,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, DIM, mode=mode, padding_idx=padding_idx,
                                   include_last_offset=include_last)
        self.head = nn.Linear(DIM, CLASSES)
        self.flat, self.weighted, self.include_last = flat, weighted, include_last

    def forward(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        extra = (weights,) if self.weighted else ()
        if not self.flat:
            bags = self.bag(ids.clamp(min=0), None, *extra)
        else:
            keep = ids != self.PAD
            lengths = keep.sum(dim=1)
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            if not self.include_last:
                offsets = offsets[:-1]
            extra = (weights[keep],) if self.weighted else ()
            bags = self.bag(ids[keep], offsets, *extra)
        return self.head(torch.tanh(bags))


def _data(padding: bool, empty_bag: bool):
    """K·B examples; the first micro-batch has no id twice in a bag, the second repeats
    ids inside bags (Opacus's rule loses those repeats)."""
    gen = torch.Generator().manual_seed(0)
    first = torch.stack([torch.randperm(VOCAB, generator=gen)[:L] for _ in range(B)])
    second = torch.randint(0, 3, (B, L), generator=gen)  # ids 0..2: repeats in every bag
    ids = torch.cat([first, second])
    if padding:
        ids[1, 0] = ids[B, 1] = 0  # padding_idx 0 inside bags
    if empty_bag:
        ids[B + 1] = Bags.PAD
    ids[B + 2, -2:] = Bags.PAD  # a shorter bag
    weights = torch.rand(K * B, L, generator=gen, dtype=torch.float64) + 0.5
    labels = torch.randint(0, CLASSES, (K * B,), generator=gen)
    return ids, weights, labels


CONFIGS = [
    pytest.param("sum", False, False, False, None, id="sum-2d"),
    pytest.param("mean", False, False, False, None, id="mean-2d"),
    pytest.param("max", False, False, False, None, id="max-2d"),
    pytest.param("sum", False, True, False, None, id="sum-2d-weights"),
    pytest.param("sum", True, False, False, None, id="sum-offsets"),
    pytest.param("mean", True, False, False, 0, id="mean-offsets-padding"),
    pytest.param("max", True, False, True, None, id="max-offsets-include-last"),
    pytest.param("sum", True, True, True, 0, id="sum-offsets-weights-include-last-padding"),
    pytest.param("mean", False, False, False, 0, id="mean-2d-padding"),
    pytest.param("max", True, False, False, 0, id="max-offsets-padding"),
]


@pytest.mark.parametrize("clipping", ["auto", "per_sample"])
@pytest.mark.parametrize("style", [1, 2])
@pytest.mark.parametrize("mode, flat, weighted, include_last, padding_idx", CONFIGS)
def test_embedding_bag_update_equals_one_example_at_a_time_reference(
    mode, flat, weighted, include_last, padding_idx, style, clipping
):
    torch.manual_seed(0)
    model = Bags(mode, flat, weighted, include_last, padding_idx).double()
    ids, weights, labels = _data(padding=padding_idx is not None, empty_bag=flat)
    if not flat:
        ids = ids.clamp(min=0)
    assert relative_error(model, (ids, weights), labels, style, B, clipping) < 1e-10


@pytest.mark.parametrize(
    "option, match",
    [
        (dict(max_norm=1.0), "max_norm"),
        (dict(scale_grad_by_freq=True), "scale_grad_by_freq=True"),
        (dict(sparse=True), "sparse=True"),
    ],
)
def test_unsupported_embedding_bag_is_refused_at_make_private(option, match):
    model = nn.Sequential(nn.EmbeddingBag(VOCAB, DIM, **option), nn.Linear(DIM, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    data = DataLoader(TensorDataset(torch.zeros(4, L, dtype=torch.long), torch.zeros(4).long()),
                      batch_size=2)
    with pytest.raises(ValueError, match=rf"nn.EmbeddingBag with {match} is not supported"):
        dpclip.PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
            data_loader=data, noise_multiplier=1.0, max_grad_norm=1.0, accumulation_steps=2,
        )
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
