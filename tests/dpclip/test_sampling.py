"""Samplers draw what the accountant assumes (invariant 4)."""

from __future__ import annotations

import math
from collections import UserDict

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from dpclip.sampling import (
    GroupedBatchSampler,
    PlannedSchedule,
    PoissonMicroBatchSampler,
    split_evenly,
    wrap_data_loader,
)


def _logical_batches(sampler, k):
    micro = list(sampler)
    return [micro[i : i + k] for i in range(0, len(micro), k)]


def test_poisson_logical_batches_have_the_accounted_distribution():
    n, q, steps, k = 200, 0.1, 3000, 4
    sampler = PoissonMicroBatchSampler(
        num_samples=n, sample_rate=q, steps=steps, micro_batches=k,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(sampler) == steps * k
    counts = torch.zeros(n)
    sizes = []
    for parts in _logical_batches(sampler, k):
        assert len(parts) == k
        union = [i for p in parts for i in p]
        assert len(set(union)) == len(union)  # micro-batches are disjoint
        lengths = [len(p) for p in parts]
        assert max(lengths) - min(lengths) <= 1
        counts[union] += 1
        sizes.append(len(union))
    sizes = torch.tensor(sizes, dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    # size ~ Binomial(N, q): mean within 5 standard errors, variance within 5 of its SEs
    assert abs(sizes.mean().item() - mean) < 5 * math.sqrt(var / steps)
    assert abs(sizes.var().item() - var) < 5 * var * math.sqrt(2 / steps)
    # each example joins with probability q, independently of the others
    per_example_sd = math.sqrt(steps * q * (1 - q))
    assert (counts - steps * q).abs().max().item() < 5 * per_example_sd


def test_small_rates_give_empty_micro_and_logical_batches():
    sampler = PoissonMicroBatchSampler(
        num_samples=50, sample_rate=0.02, steps=200, micro_batches=3,
        generator=torch.Generator().manual_seed(1),
    )
    batches = _logical_batches(sampler, 3)
    assert len(batches) == 200
    assert any(all(len(p) == 0 for p in parts) for parts in batches)
    assert any(len(parts[-1]) == 0 and len(parts[0]) > 0 for parts in batches)


def test_max_micro_batch_size_len_is_exact_and_schedule_matches():
    schedule = PlannedSchedule()
    sampler = PoissonMicroBatchSampler(
        num_samples=300, sample_rate=0.1, steps=10, max_micro_batch_size=7,
        schedule=schedule, generator=torch.Generator().manual_seed(2),
    )
    for _ in range(3):  # each epoch: len() before iterating is what the epoch yields
        expected = len(sampler)
        micro = list(sampler)
        assert len(micro) == expected
        assert all(len(m) <= 7 for m in micro)
    micro = list(sampler)  # starting the epoch plans its logical batches
    counts = [schedule.next_logical_batch() for _ in range(10)]
    assert sum(counts) == len(micro)
    start = 0
    for c in counts:  # each planned group is one logical batch split into ceil(size / M)
        size = sum(len(m) for m in micro[start : start + c])
        assert c == max(1, math.ceil(size / 7))
        start += c
    with pytest.raises(RuntimeError, match="no logical batch is planned"):
        schedule.next_logical_batch()


def test_grouped_batches_plan_a_short_last_group():
    schedule = PlannedSchedule()
    base = BatchSampler(SequentialSampler(range(100)), batch_size=8, drop_last=False)
    sampler = GroupedBatchSampler(base, schedule, micro_batches=4)
    assert list(sampler) == list(base)
    assert [schedule.next_logical_batch() for _ in range(4)] == [4, 4, 4, 1]

    split = GroupedBatchSampler(base, schedule, max_micro_batch_size=3)
    micro = list(split)
    assert len(split) == len(micro) == 12 * 3 + 2
    assert [i for m in micro for i in m] == list(range(100))


def test_split_evenly():
    assert split_evenly([1, 2, 3, 4, 5], 3) == [[1, 2], [3, 4], [5]]
    assert split_evenly([1], 3) == [[1], [], []]


def test_loader_turns_empty_micro_batches_into_zero_length_tensors():
    ds = TensorDataset(torch.randn(20, 3, 2), torch.arange(20))
    sampler = PoissonMicroBatchSampler(
        num_samples=20, sample_rate=0.05, steps=20, micro_batches=4,
        generator=torch.Generator().manual_seed(3),
    )
    loader = wrap_data_loader(DataLoader(ds, batch_size=1), sampler)
    shapes = [(tuple(x.shape), y.dtype) for x, y in loader]
    assert len(shapes) == len(loader) == 80
    assert ((0, 3, 2), torch.int64) in shapes


class Encoding(UserDict):
    """A collate's mapping that torch's tree functions do not open (as Hugging Face's
    BatchEncoding, which DataCollatorWithPadding returns)."""


@pytest.mark.parametrize("wrap", [Encoding, dict])
def test_an_empty_micro_batch_of_a_mapping_collate_has_no_rows(wrap):
    # (its one example was left whole: the empty micro-batch trained on dataset[0])
    ids = torch.arange(40).reshape(20, 2)

    def collate(items):
        return wrap({"input_ids": torch.stack([ids[i] for i in items]), "labels": torch.tensor(items),
                     "meta": [torch.zeros(1) for _ in items]})

    sampler = PoissonMicroBatchSampler(
        num_samples=20, sample_rate=0.05, steps=20, micro_batches=4, generator=torch.Generator().manual_seed(3),
    )
    loader = wrap_data_loader(DataLoader(list(range(20)), batch_size=1, collate_fn=collate), sampler)
    batches = list(loader)
    empty = [b for b in batches if b["labels"].shape[0] == 0]
    assert empty and all(type(b) is wrap for b in empty)
    assert all(b["input_ids"].shape == (0, 2) for b in empty)
