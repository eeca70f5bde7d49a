"""Ghost norms of calls sharing one weight (``dpclip.clipping.shared``): tied lookups and
heads, a linear layer run twice. References: ``torch.func`` per-example gradients, and
Hugging Face GPT-2 one example at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dpclip
from dpclip.clipping import clipper as clipper_module
from dpclip.clipping import shared
from tests.dpclip.helpers import assert_clipped_sum_matches_reference


class TiedLM(nn.Module):
    """A lookup with padding whose matrix is also the per-position head's (with a bias of
    its own), and one Linear run twice in between: three groups of shared weights."""

    def __init__(self, vocab: int = 11, width: int = 8, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(torch.tanh(self.mix(self.emb(ids)))))
        return self.head(h).mean(1)


@pytest.fixture
def spied(monkeypatch):
    """The rows each SharedWeightGhost norm was computed for (None: the whole micro-batch)."""
    seen: list[torch.Tensor | None] = []
    original = shared.SharedWeightGhost.ghost_sq_norms

    def spy(self, call=None, rows=None):
        seen.append(rows)
        return original(self, call, rows)

    monkeypatch.setattr(shared.SharedWeightGhost, "ghost_sq_norms", spy)
    return seen


def _ids(batch: int = 6, seq: int = 4, vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    ids[:, -1] = 0  # padding: its row gets no gradient from the lookup
    ids[0, :2] = ids[0, 2]  # an id repeated within an example
    return ids, torch.randint(0, vocab, (batch,), generator=gen)


@pytest.mark.parametrize("clipping", ["auto", "ghost"])
def test_tied_lookup_head_and_a_layer_run_twice_match_per_example_gradients(clipping, spied):
    torch.manual_seed(0)
    model = TiedLM().double()
    x, y = _ids()
    assert_clipped_sum_matches_reference(model, x, y, clipping, rtol=1e-10, atol=1e-12)
    # both groups (the tied matrix, mix's weight and bias) took the Gram product, in both
    # memory modes and for both reference norms (C = the median, then the sums)
    assert len(spied) >= 4 and all(rows is None for rows in spied)


def test_second_look_in_float64_gives_the_same_norms(monkeypatch, spied):
    # a tolerance of 0 sends every example with a rounding bound to the float64 second look
    monkeypatch.setattr(clipper_module, "GHOST_ROUNDING_TOLERANCE", 0.0)
    torch.manual_seed(0)
    model = TiedLM()
    x, y = _ids()
    assert_clipped_sum_matches_reference(model, x, y, "auto", rtol=2e-5, atol=1e-7)
    assert any(rows is not None and rows.numel() == x.shape[0] for rows in spied)


def test_per_sample_strategy_and_a_gram_larger_than_the_weight_sum_per_example_gradients(spied):
    torch.manual_seed(0)
    x, y = _ids()
    assert_clipped_sum_matches_reference(TiedLM().double(), x, y, "per_sample", rtol=1e-10, atol=1e-12)
    assert not spied
    # 2 x 48 positions: a 96 x 96 Gram matrix per example holds more than the summed
    # per-example gradients of a 4 x 3 matrix (and its copy)
    long_ids = torch.randint(1, 4, (6, 48), generator=torch.Generator().manual_seed(1))
    assert_clipped_sum_matches_reference(TiedLM(4, 3).double(), long_ids, y % 4, "auto", rtol=1e-10, atol=1e-12)
    assert not spied


def test_untied_model_is_unchanged(spied):
    torch.manual_seed(0)
    x, y = _ids()
    assert_clipped_sum_matches_reference(TiedLM(tie=False).double(), x, y, "auto", rtol=1e-10, atol=1e-12)
    assert len(spied) >= 2  # mix, run twice, is still a group


@pytest.mark.hf
def test_gpt2_tied_embedding_trains_exactly_without_per_example_vocabulary_matrices(spied):
    from tests.dpclip.hf_models import TokenCrossEntropy, causal_lm_batch, gpt2, reference_update

    torch.manual_seed(0)
    model = gpt2(8).double()
    (ids,), labels = causal_lm_batch(4, 8, torch.Generator().manual_seed(0))
    criterion = TokenCrossEntropy()
    _, norms = reference_update(model, (ids,), labels, criterion, 1.0, 1.0)
    max_grad_norm = float(norms.median())  # half of the examples clipped
    expected, _ = reference_update(model, (ids,), labels, criterion, max_grad_norm, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = {p: n for n, p in model.named_parameters()}
    engine = dpclip.PrivacyEngine()
    private, optimizer, crit, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=criterion,
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=4),
        noise_multiplier=0.0, max_grad_norm=max_grad_norm, poisson_sampling=False,
    )
    for x, target in loader:  # one logical batch: the four examples
        crit(private(x), target).backward()
        optimizer.step()
    assert spied  # wte and lm_head: one group, by its Gram product
    for p, n in names.items():
        torch.testing.assert_close(before[n] - p.detach(), expected[n], rtol=1e-9, atol=1e-12, msg=n)


class AttentionTwice(nn.Module):
    """One nn.MultiheadAttention run twice: inside it the projections' rows are stored
    position-major ([T, B, 3E] and [T·B, E]), not example by example."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.att(x, x, x, need_weights=False)[0]
        h = self.att(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


@pytest.mark.parametrize("seq, gram", [(2, True), (16, False)])
def test_positions_are_counted_per_example_in_position_major_layouts(seq, gram, spied):
    # counted from the stored rows, an attention call seemed to have B positions (its
    # in-projection, [T, B, 3E]) or 1 (its out-projection, [T·B, E]): a Gram matrix over
    # 2 x 16 positions was taken for an 8 x 8 weight, 16x the per-example gradient it replaces
    torch.manual_seed(0)
    model = AttentionTwice().double()
    x = torch.randn(4, seq, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    assert_clipped_sum_matches_reference(model, x, y, "auto", rtol=1e-10, atol=1e-12)
    assert bool(spied) == gram
