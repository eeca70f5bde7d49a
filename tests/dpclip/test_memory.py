"""Memory modes (``dpclip.clipping.memory``): the same update in each, and a peak memory
near non-private training's.

Peak memory is the peak of the bytes torch allocates on the CPU during one micro-batch
(forward, loss and backward), from the profiler's allocation records: a count of what
the code under test holds, not of what the process's allocator keeps mapped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from dpclip.compare import allocated_bytes
from dpclip.workloads import Transformer, transformer
from tests.dpclip.helpers import make_run, train_logical_batch
from tests.dpclip.test_engine import _assert_update_matches, _micro_batches


@pytest.mark.parametrize("clipping", dpclip.STRATEGIES)
@pytest.mark.parametrize("kind", ["mlp", "embedding", "cnn", "transformer", "conv1d", "attention"])
@pytest.mark.parametrize("k", [1, 4])
def test_low_memory_update_equals_large_batch_clipped_mean(kind, k, clipping):
    # Invariant 1 with memory="low" (two backward passes): k micro-batches, σ = 0 -> Σ
    # clipped per-sample grads over the union / (k·B), against torch.func
    run = make_run(kind, batch_size=4, accumulation_steps=k, clipping=clipping, memory="low")
    before = run.params()
    micro = _micro_batches(run, k, 4)
    train_logical_batch(run, micro, 2)
    _assert_update_matches(run, before, micro, k * 4, atol=1e-9)
    assert run.engine.steps == 1


@pytest.mark.parametrize("kind", ["cnn", "transformer", "attention"])
def test_low_memory_float32_update_matches_reference(kind):
    run = make_run(kind, batch_size=4, accumulation_steps=2, dtype=torch.float32, memory="low")
    before = run.params()
    micro = _micro_batches(run, 2, 4)
    train_logical_batch(run, micro, 2)
    _assert_update_matches(run, before, micro, 8, atol=0.0, rtol=1e-5)


def test_memory_modes_give_the_same_noisy_steps():
    # σ > 0, the same seeds: the modes differ only by rounding
    params = {}
    for memory in ("fast", "low"):
        run = make_run("transformer", batch_size=4, accumulation_steps=2, noise_multiplier=1.0, memory=memory)
        for _ in range(2):
            train_logical_batch(run, _micro_batches(run, 2, 4), 2)
        params[memory] = run.params()
    for name, p in params["fast"].items():
        torch.testing.assert_close(params["low"][name], p, atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("memory", ["medium", "LOW", None, 0])
def test_unknown_memory_mode_is_refused_before_anything_changes(memory):
    model = nn.Linear(3, 2)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    engine = dpclip.PrivacyEngine()
    with pytest.raises(ValueError, match="memory"):
        engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            criterion=nn.CrossEntropyLoss(), data_loader=DataLoader(data, batch_size=4),
            noise_multiplier=1.0, max_grad_norm=1.0, memory=memory,
        )
    assert not model._forward_hooks and engine.steps == 0


def _micro_batch_peaks(memory: str | None, batch: int = 16, model: nn.Module | None = None,
                       dataset: TensorDataset | None = None, criterion: nn.Module | None = None) -> int:
    """Peak bytes of one micro-batch, after warm-up micro-batches (the first one also
    checks the records against the whole gradient); by default of the built-in
    transformer (d 128, 64 tokens)."""
    torch.manual_seed(0)
    if model is None:
        work = transformer(n=64)
        model, dataset, criterion = Transformer(), work.dataset, work.criterion
    *inputs, y = dataset[:batch]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    if memory is not None:
        model, optimizer, criterion, _ = dpclip.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, criterion=criterion,
            data_loader=DataLoader(dataset, batch_size=batch), noise_multiplier=1.0,
            max_grad_norm=1.0, accumulation_steps=4, memory=memory,
        )

    def step():
        criterion(model(*inputs), y).backward()

    for _ in range(2):
        step()
    peak, _ = allocated_bytes(step)
    optimizer.zero_grad()
    return peak


def test_peak_memory_of_a_micro_batch_stays_near_non_private():
    # Non-private training's peak is about the activations autograd saves (the parameter
    # gradients already exist after the warm-up). Holding every layer's output (and the
    # attention projections' outputs) past the forward and every output gradient until
    # the norms were known, as dpclip did before, peaked at 2.3x it here. Taking each
    # layer's norm as its gradient arrives and keeping only what the clipped sum needs
    # peaks at 1.38x ("fast": the linear layers' inputs and output gradients for their
    # ghost norms' clipped sum) and 1.33x ("low": the graph kept for the second pass).
    non_private = _micro_batch_peaks(None)
    fast = _micro_batch_peaks("fast")
    low = _micro_batch_peaks("low")
    assert non_private > 2**20  # activations of 16 x 64 tokens x 128 features: megabytes
    assert fast <= 1.5 * non_private, (fast / non_private, "fast")
    assert low <= 1.45 * non_private, (low / non_private, "low")


def test_t5_relative_position_bias_does_not_keep_the_graph_in_fast_mode():
    # T5's relative-position bias is a lookup without a batch dimension that meets the
    # batch only after a permute (a "chained" meeting). Its per-example output gradient
    # needs a backward from that meeting to the lookup; taking it after the pass kept
    # the whole graph (every activation) alive beside the kept output gradients: 1.56x
    # non-private. Taken as the pass reaches the meeting, nothing is kept.
    from tests.dpclip.hf_models import TokenCrossEntropy, seq2seq_batch, t5

    batch, seq = 16, 64
    (src, decoder_ids), labels = seq2seq_batch(4 * batch, seq, torch.Generator().manual_seed(0))
    dataset = TensorDataset(src, decoder_ids, labels)

    def peak(memory):
        torch.manual_seed(0)
        return _micro_batch_peaks(memory, batch, t5(seq).float(), dataset, TokenCrossEntropy())

    non_private, fast = peak(None), peak("fast")
    assert non_private > 2**20
    assert fast <= 1.15 * non_private, fast / non_private
