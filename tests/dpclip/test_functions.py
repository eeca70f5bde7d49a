"""Recording by operation (dpclip.clipping.functions): lookups on ids without a batch
dimension that meet the batch by broadcasting, linear operations with a trainable
weight inside modules without a rule, and lookups through ``nn.Embedding``
subclasses, each checked against torch.func per-sample gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpclip import PerSampleClipper
from dpclip.clipping.recording import GraphCall, LayerCall
from tests.dpclip.helpers import assert_clipped_sum_matches_reference

VOCAB, T, D, CLASSES = 11, 5, 6, 3


class PositionEmbedding(nn.Module):
    """BERT / GPT-2: positions [1, T] from torch.arange, looked up and broadcast-added."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        h = torch.tanh(self.tok(ids) + self.pos(positions))
        return self.head(h.mean(dim=1))


class RelativeBias(nn.Module):
    """T5: a lookup on a [T, T] bucket matrix (no batch dimension), permuted to
    [1, H, T, T] and added to the attention scores of two layers."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(VOCAB, D)
        self.bias = nn.Embedding(4, heads)
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids):
        t = ids.shape[1]
        rel = torch.arange(t).unsqueeze(0) - torch.arange(t).unsqueeze(1)
        buckets = rel.clamp(-2, 1) + 2  # [T, T] in 0..3
        position_bias = self.bias(buckets).permute(2, 0, 1).unsqueeze(0)
        h = self.tok(ids)
        for layer in self.layers:  # the same position_bias in every layer
            q = h.view(h.shape[0], t, self.heads, -1).transpose(1, 2)
            scores = q @ q.transpose(-1, -2) + position_bias
            mixed = (scores.softmax(-1) @ q).transpose(1, 2).reshape(h.shape)
            h = torch.tanh(layer(mixed))
        return self.head(h.mean(dim=1))


class AddmmProjection(nn.Module):
    """GPT-2's Conv1D: y = addmm(b, x.view(-1, d), W) with W stored [in, out]."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.weight.shape[1])


class MatmulMinusExpBias(AddmmProjection):
    """x @ W - exp(b): the bias enters through exp, an operation without a rule (graph path)."""

    def forward(self, x):
        return x @ self.weight - self.bias.exp()


class Conv1DNet(nn.Module):
    def __init__(self, projection: type[AddmmProjection] = AddmmProjection) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.proj = projection(D, 2 * D)
        self.head = nn.Linear(2 * D, CLASSES)

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.tok(ids))).mean(dim=1))


class ScaledEmbedding(nn.Embedding):
    """BART's BartScaledWordEmbedding: a subclass whose forward scales the lookup."""

    def forward(self, ids):
        return super().forward(ids) * 2.5


class TiedScaledEncoderDecoder(nn.Module):
    """Two scaled embeddings and an nn.Embedding sharing one weight (BART's shared,
    encoder and decoder tables)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(VOCAB, D, padding_idx=0)
        self.encoder = ScaledEmbedding(VOCAB, D, padding_idx=0)
        self.decoder = ScaledEmbedding(VOCAB, D, padding_idx=0)
        self.encoder.weight = self.decoder.weight = self.shared.weight
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids):
        h = torch.tanh(self.encoder(ids)).mean(dim=1, keepdim=True) + self.decoder(ids.flip(1))
        return self.head(torch.tanh(h).mean(dim=1))


class LostChain(nn.Module):
    """Position embeddings expanded over the batch by hand and concatenated: no
    broadcast operation tells each example's share."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(2 * D, CLASSES)

    def forward(self, ids):
        pos = self.pos(torch.arange(ids.shape[1])).expand(ids.shape[0], -1, -1)
        return self.head(torch.cat([self.tok(ids), pos], dim=-1).mean(dim=1))


def _data(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, T), generator=gen)
    ids[0, -2:] = 0  # padding in the first example
    return ids, torch.randint(0, CLASSES, (batch,), generator=gen)


def _assert_exact(model: nn.Module, batch: int, clipping: str = "auto") -> PerSampleClipper:
    """dpclip's clipped sum equals torch.func's at C = the median per-example norm."""
    torch.manual_seed(0)
    model = model.double()
    x, y = _data(batch)
    return assert_clipped_sum_matches_reference(model, x, y, clipping, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_lookup_on_broadcast_position_ids_is_exact(clipping):
    _assert_exact(PositionEmbedding(), batch=4, clipping=clipping)


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
@pytest.mark.parametrize("batch", [3, T])  # T == B: a [T, T] table looks batch-first
def test_batchless_lookup_permuted_and_added_in_two_layers_is_exact(clipping, batch):
    _assert_exact(RelativeBias(), batch=batch, clipping=clipping)


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_addmm_with_a_trainable_weight_takes_the_linear_rule(clipping):
    model = Conv1DNet()
    clipper = _assert_exact(model, batch=4, clipping=clipping)
    model(_data(4)[0])  # what one forward records
    records = clipper.recorder.calls
    assert not any(isinstance(c, GraphCall) for c in records)
    assert any(isinstance(c, LayerCall) and c.module is model.proj for c in records)


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_addmm_with_a_frozen_weight_and_a_trainable_bias_is_exact(clipping):
    # bias-only fine-tuning (BitFit) of GPT-2's Conv1D: the call belongs to the bias's unit
    model = Conv1DNet()
    model.proj.weight.requires_grad_(False)
    _assert_exact(model, batch=4, clipping=clipping)


def test_parameter_in_an_operation_without_a_rule_takes_the_graph_path_exactly():
    model = Conv1DNet(MatmulMinusExpBias)
    clipper = _assert_exact(model, batch=4)
    model(_data(4)[0])
    mine = [c for c in clipper.recorder.calls if getattr(c, "module", None) is model.proj]
    graph = [c for c in clipper.recorder.calls if isinstance(c, GraphCall)]
    assert not mine and [c.unit.module for c in graph] == [model.proj]


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_scaling_embedding_subclass_tied_to_two_tables_is_exact(clipping):
    _assert_exact(TiedScaledEncoderDecoder(), batch=4, clipping=clipping)


def _assert_refused(make: type[nn.Module], batch: int, match: str) -> None:
    """The first micro-batch's clipped sum raises a RuntimeError matching ``match``."""
    torch.manual_seed(0)
    model = make().double()
    x, y = _data(batch)
    clipper = PerSampleClipper(model, 1.0)
    losses = F.cross_entropy(model(x), y, reduction="none")
    with pytest.raises(RuntimeError, match=match):
        clipper.clipped_sum(losses)


def test_batchless_lookup_that_meets_the_batch_unrecognised_is_refused():
    _assert_refused(LostChain, 4, r"module 'pos' on ids without a batch dimension")


class TransposedLinear(nn.Linear):
    """Falcon's FalconLinear: an nn.Linear subclass whose forward is x @ W.T + b."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class OnePlusWeightNorm(nn.Module):
    """Gemma's RMSNorm, scaled by (1 + w), computed in float32 with ``float32`` (Gemma's
    ``x.float() ... (1.0 + self.weight.float())``)."""

    def __init__(self, width: int, float32: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width) * 0.3)
        self.float32 = float32

    def forward(self, x):
        h = x.float() if self.float32 else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        w = self.weight.float() if self.float32 else self.weight
        return (h * (1.0 + w)).type_as(x)


class TransposedMisuse(nn.Module):
    """A transposed square weight used elementwise: its gradient is transposed against the
    parameter's, no rule for it (the graph path; taken as the parameter, it was normed
    and summed transposed)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) * 0.3)

    def forward(self, x):
        return (x.unsqueeze(-1) * self.weight.T).sum(-1) + (x.unsqueeze(-1) * self.weight).sum(-2)


class OwnForwards(nn.Module):
    def __init__(self, norm: type[nn.Module] = OnePlusWeightNorm, transposed: str = "T") -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.proj = TransposedLinear(D, 2 * D)
        if transposed != "T":
            self.proj.forward = lambda x: (
                x @ self.proj.weight.t() if transposed == "t" else x @ self.proj.weight.transpose(-1, 0)
            ) + self.proj.bias
        self.norm = norm(2 * D)
        self.head = nn.Linear(2 * D, CLASSES)

    def forward(self, ids):
        return self.head(torch.tanh(self.norm(self.proj(self.tok(ids)))).mean(dim=1))


@pytest.mark.parametrize("transposed", ["T", "t", "transpose"])
@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_a_linear_forward_with_the_weight_transposed_and_a_one_plus_weight_norm_take_rules(clipping, transposed):
    # Falcon's x @ W.T + b and Gemma's x * (1 + w.float()) took the graph path (per-example
    # gradients by a batched vector-Jacobian product): as W's linear rule and w's
    # elementwise rule they are exact too
    model = OwnForwards(transposed=transposed)
    clipper = _assert_exact(model, batch=4, clipping=clipping)
    model(_data(4)[0])
    records = clipper.recorder.calls
    assert not any(isinstance(c, GraphCall) for c in records)
    assert {c.module for c in records if isinstance(c, LayerCall)} >= {model.proj, model.norm}


def test_a_transposed_weight_used_elementwise_takes_the_graph_path_exactly():
    model = OwnForwards(norm=TransposedMisuse)
    clipper = _assert_exact(model, batch=4)
    model(_data(4)[0])
    graph = [c.unit.module for c in clipper.recorder.calls if isinstance(c, GraphCall)]
    assert graph == [model.norm]


def test_a_float64_model_with_a_float32_one_plus_weight_norm():
    torch.manual_seed(0)
    model = OwnForwards(norm=lambda width: OnePlusWeightNorm(width, float32=True)).double()
    x, y = _data(4)
    # its norm computes in float32: exact to float32 rounding
    clipper = assert_clipped_sum_matches_reference(model, x, y, "auto", rtol=1e-5, atol=1e-7)
    model(x)
    assert not any(isinstance(c, GraphCall) for c in clipper.recorder.calls)


class SequenceFirstInside(nn.Module):
    """A rule-less projection that runs sequence-first inside and returns batch-first:
    (x.transpose(0, 1) @ W.T).transpose(0, 1), or F.linear on the transposed input."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2 * D, D) * 0.3)
        self.functional = functional

    def forward(self, x):
        seq = x.transpose(0, 1)
        y = F.linear(seq, self.weight) if self.functional else seq @ self.weight.T
        return y.transpose(0, 1)


class SequenceFirstNet(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.inner = inner
        self.head = nn.Linear(2 * D, CLASSES)

    def forward(self, ids):
        return self.head(torch.tanh(self.inner(self.tok(ids))).mean(dim=1))


@pytest.mark.parametrize("functional", [False, True])
def test_a_linear_operation_on_a_sequence_first_tensor_is_not_taken_for_batch_first(functional):
    # with T == B every shape check passes: recorded as a linear call, the positions of
    # the transposed input were taken for the examples (norms 5 % off, clipped
    # contributions above C); the batch's dimension is followed through the transposes
    model = SequenceFirstNet(SequenceFirstInside(functional))
    clipper = _assert_exact(model, batch=T)
    model(_data(T)[0])
    assert [c.unit.module for c in clipper.recorder.calls if isinstance(c, GraphCall)] == [model.inner]


class SequenceFirstLayers(nn.Module):
    """A sequence-first model (fairseq style): nn.Linear on [T, B, D]."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids):
        h = self.proj(self.tok(ids).transpose(0, 1))  # [T, B, D]
        return self.head(torch.tanh(h).mean(dim=0))


def test_a_layer_on_a_sequence_first_tensor_is_refused_at_the_forward():
    torch.manual_seed(0)
    model = SequenceFirstLayers()
    clipper = PerSampleClipper(model, 1.0)
    ids, _ = _data(T)  # T == B: the shape checks cannot tell
    with pytest.raises(RuntimeError, match=r"module 'proj' \(Linear\) runs on a tensor .* batch is dimension 1"):
        model(ids)
    clipper.remove()


class SequenceFirstIds(nn.Module):
    """XLNet's way: the ids transposed to [T, B] before the lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids):
        h = self.tok(ids.transpose(0, 1))  # [T, B, D]
        return self.head(h.mean(dim=0))


def test_a_lookup_on_sequence_first_ids_is_refused_at_the_forward():
    # with T == B nothing else notices: XLNet's norms were 23 % off, its clipped update 15 %
    torch.manual_seed(0)
    model = SequenceFirstIds()
    clipper = PerSampleClipper(model, 1.0)
    ids, _ = _data(T)
    with pytest.raises(RuntimeError, match=r"lookup of module 'tok' runs on ids of shape .* batch is dimension 1"):
        model(ids)
    clipper.remove()


class IndexedRelativeBias(nn.Module):
    """BEiT's relative-position bias: a table indexed by a [T, T] buffer (not a lookup
    through F.embedding), permuted to [1, H, T, T] and added to the attention scores."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * T - 1, heads) * 0.1)
        self.register_buffer("index", torch.arange(T).unsqueeze(0) - torch.arange(T).unsqueeze(1) + T - 1)

    def forward(self):
        return self.table[self.index].permute(2, 0, 1).unsqueeze(0)


class IndexedBiasAttention(nn.Module):
    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(VOCAB, D)
        self.bias = IndexedRelativeBias(heads)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, ids):
        h = self.tok(ids)
        q = h.view(h.shape[0], T, self.heads, -1).transpose(1, 2)
        scores = q @ q.transpose(-1, -2) + self.bias()
        mixed = (scores.softmax(-1) @ q).transpose(1, 2).reshape(h.shape)
        return self.head(mixed.mean(dim=1))


def test_a_bias_table_indexed_rather_than_looked_up_is_refused_saying_so():
    # (the message had said it met the batch other than by a broadcasting add, which it does not)
    _assert_refused(
        IndexedBiasAttention, 3, r"module 'bias' has shape \(1, 2, 5, 5\).* table indexed, gathered or multiplied otherwise"
    )
