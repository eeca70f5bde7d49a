"""Per-sample norms and clipped sums against independent references."""

from __future__ import annotations

import copy
from dataclasses import dataclass
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from dpclip import NonFiniteNormError, PerSampleClipper, clip_factors
from dpclip.clipping.rules.embedding import EmbeddingRule
from dpclip.clipping.rules.linear import LinearRule
from tests.dpclip.models import TinyTransformer, make_data


def test_clip_factors_edge_cases():
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0])
    torch.testing.assert_close(clip_factors(norms, 1.0), torch.tensor([1.0, 1.0, 1.0, 0.25]))
    clipped = clip_factors(norms, 2.0) * norms
    assert (clipped <= 2.0).all()


def _clipped_reference(model, x, y, C):
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))
    f = torch.clamp(C / norms, max=1.0)
    return {k: torch.einsum("i,i...->...", f, v) for k, v in g.items()}, norms


def _clipped_sum(model, x, y, C, clipping="auto", memory="auto"):
    clipper = PerSampleClipper(model, C, clipping, memory=memory)
    losses = F.cross_entropy(model(x), y, reduction="none")
    sums = clipper.clipped_sum(losses)
    clipper.remove()
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: s for p, s in sums.items()}


def _assert_matches_reference(model, x, y, clipping="auto", memory="auto"):
    """dpclip's clipped sum equals the torch.func one at C = the median norm (clipping binds
    for about half the examples)."""
    _, norms = _clipped_reference(model, x, y, 1.0)
    C = float(norms.median())
    expected, _ = _clipped_reference(model, x, y, C)
    got = _clipped_sum(model, x, y, C, clipping, memory)
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-10, rtol=0)


def _assert_refused(model, x, y, match, max_grad_norm=1.0):
    """clipped_sum on this forward raises a RuntimeError whose message matches."""
    clipper = PerSampleClipper(model, max_grad_norm)
    losses = F.cross_entropy(model(x), y, reduction="none")
    with pytest.raises(RuntimeError, match=match):
        clipper.clipped_sum(losses)


class TiedAndRepeated(nn.Module):
    """The head reuses the embedding matrix; one Linear runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens).mean(1)
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))
        return self.head(h)


class FourDimLinear(nn.Module):
    """A Linear on [B, H, T, D]: Opacus's ghost norm has no rule for 4-D inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x).mean(dim=(1, 2))


class PositionalParameter(nn.Module):
    """A parameter used directly in the root's forward: per-sample gradients through the
    recorded graph (no layer rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.pos = nn.Parameter(torch.randn(4, 6))
        self.head = nn.Linear(6, 12)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens) + self.pos).mean(1))


@pytest.mark.parametrize("clipping", ["auto", "ghost", "per_sample"])
@pytest.mark.parametrize("case", ["tied", "fourdim", "positional"])
def test_tied_repeated_and_unusual_shapes_match_reference(case, clipping):
    torch.manual_seed(0)
    if case == "positional":
        model = PositionalParameter().double()
        x = torch.randint(0, 12, (6, 4))
        y = torch.randint(0, 12, (6,))
    elif case == "tied":
        model = TiedAndRepeated().double()
        x = torch.randint(0, 12, (6, 4))
        y = torch.randint(0, 12, (6,))
    else:
        model = FourDimLinear().double()
        x = torch.randn(6, 2, 4, 5, dtype=torch.float64)
        y = torch.randint(0, 3, (6,))
    _assert_matches_reference(model, x, y, clipping)


def test_dropout_in_attention_uses_the_real_forward_masks():
    # With dropout, a recomputed forward would draw other masks; the reference
    # here is a per-example autograd loop over the very same forward pass.
    torch.manual_seed(0)
    model = TinyTransformer(dropout=0.3).double().train()
    x, y = make_data("transformer", 6, torch.Generator().manual_seed(1))
    clipper = PerSampleClipper(model, 0.05)
    losses = F.cross_entropy(model(x), y, reduction="none")
    params = list(model.parameters())
    per_sample = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(6)]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in per_sample])
    assert (norms > 0.05).all()
    factors = torch.clamp(0.05 / norms, max=1.0)
    expected = [sum(f * gs[j] for f, gs in zip(factors, per_sample)) for j in range(len(params))]
    got = clipper.clipped_sum(losses)
    torch.testing.assert_close(clipper.last_norms, norms, atol=1e-10, rtol=0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(got[p], e, atol=1e-10, rtol=0)


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_in_place_change_of_a_hooked_output_is_exact(memory):
    # the gradient is taken where the output entered the graph, as the layer computed it:
    # an activation applied in place afterwards (common in CNNs and MLPs) changes nothing
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    _assert_matches_reference(model, x, torch.tensor([0, 1, 0, 1, 1, 0]), memory=memory)


def test_non_finite_norm_raises_and_returns_nothing():
    model = nn.Linear(3, 2)
    clipper = PerSampleClipper(model, 1.0)
    x = torch.tensor([[1.0, 2.0, 3.0], [float("inf"), 0.0, 0.0]])
    losses = F.cross_entropy(model(x), torch.tensor([0, 1]), reduction="none")
    with pytest.raises(NonFiniteNormError, match="1 of 2"):
        clipper.clipped_sum(losses)


class ForeignWeight(nn.Module):
    """Uses a child's weight without calling the child: nothing records it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        return F.linear(x, self.a.weight)


def test_parameter_without_per_sample_gradient_is_an_error_not_a_silent_zero():
    model = ForeignWeight()
    _assert_refused(model, torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), "outside its own module")


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    clipper = PerSampleClipper(model, 1.0)
    losses = F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 2, (5,)), reduction="none")
    sums = clipper.clipped_sum(losses)
    assert set(sums) == {model[2].weight, model[2].bias}


def test_remove_detaches_every_hook():
    model = TinyTransformer()
    clipper = PerSampleClipper(model, 1.0)
    assert any(m._forward_hooks for m in model.modules())
    clipper.remove()
    assert not any(m._forward_hooks for m in model.modules())


def _spy(monkeypatch, rule_type):
    seen = {"ghost": [], "per_sample": [], "clipped_sum": []}
    for method in seen:
        attr = {"ghost": "ghost_sq_norms", "per_sample": "per_sample_grads"}.get(method, method)
        original = getattr(rule_type, attr)

        def spy(self, call, *args, original=original, method=method):
            seen[method].append(call.module)
            return original(self, call, *args)

        monkeypatch.setattr(rule_type, attr, spy)
    return seen


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_strategy_decides_between_ghost_norms_and_per_sample_gradients(monkeypatch, clipping):
    from tests.dpclip.models import EmbeddingBagOfWords

    model = EmbeddingBagOfWords().double()
    clipper = PerSampleClipper(model, 1.0, clipping)
    x, y = make_data("embedding", 5, torch.Generator().manual_seed(0))
    seen = {kind: _spy(monkeypatch, kind) for kind in (LinearRule, EmbeddingRule)}
    clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
    used = {id(m) for s in seen.values() for m in s[clipping]}
    other = "per_sample" if clipping == "ghost" else "ghost"
    assert used == {id(model.emb), id(model.proj), id(model.head)}
    assert not any(s[other] for s in seen.values())


def test_auto_picks_per_layer_by_shape_and_names_override_it(monkeypatch):
    class Shapes(nn.Module):
        """Linears on 1 position (ghost) and one on 40 positions of width 2 (per-sample:
        T²(d+p) > 64·p·d)."""

        def __init__(self) -> None:
            super().__init__()
            self.wide = nn.Linear(30, 20)
            self.long = nn.Linear(2, 2)
            self.head = nn.Linear(20, 3)

        def forward(self, x):
            h = self.wide(x[:, 0])
            return self.head(h) + self.long(x[:, :, :2]).mean(1).sum(1, keepdim=True)

    model = Shapes().double()
    x = torch.randn(4, 40, 30, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    expected, _ = _clipped_reference(model, x, y, 0.5)
    for clipping, ghost in (
        ("auto", {"wide", "head"}),
        ({"wide": "per_sample"}, {"head"}),
        ({"long": "ghost"}, {"wide", "head", "long"}),
    ):
        seen = _spy(monkeypatch, LinearRule)
        clipper = PerSampleClipper(model, 0.5, clipping)
        got = clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
        clipper.remove()
        names = {id(m): n for n, m in model.named_modules()}
        assert {names[id(m)] for m in seen["ghost"]} == ghost, clipping
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[p], expected[n], atol=1e-10, rtol=0)
        monkeypatch.undo()


@pytest.mark.parametrize(
    "clipping, match",
    [("fast", "one of"), ({"head": "exact"}, "one of"), ({"nothere": "ghost"}, "nothere"), (3, "one of")],
)
def test_bad_clipping_is_refused_before_any_hook(clipping, match):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=match):
        PerSampleClipper(model, 1.0, clipping)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kind", ["mlp", "embedding", "cnn", "conv1d", "transformer", "attention"])
def test_one_backward_pass_per_micro_batch(monkeypatch, kind):
    # Book-keeping: after the first (audited) micro-batch, the clipped sum comes from the
    # tensors of one backward pass; no second pass through the model.
    from tests.dpclip.models import MODELS

    model = MODELS[kind]().double()
    clipper = PerSampleClipper(model, 0.1, memory="fast")  # ("low": two passes, by design)
    x, y = make_data(kind, 6, torch.Generator().manual_seed(0))
    clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
    passes = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: passes.append(1) or real_grad(*a, **k))
    clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
    assert len(passes) == 1


def test_frozen_backbone_records_nothing_and_builds_no_graph():
    body = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 64))
    body.requires_grad_(False)
    model = nn.Sequential(body, nn.Tanh(), nn.Linear(64, 3)).double()
    clipper = PerSampleClipper(model, 0.5)
    assert [u.name for u in clipper.units] == ["2"]
    x, y = torch.randn(5, 64, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert not model[0](x).requires_grad  # no graph through the frozen part
    losses = F.cross_entropy(model(x), y, reduction="none")
    assert [c.module for c in clipper.recorder.calls] == [model[2]]
    got = clipper.clipped_sum(losses)
    expected, _ = _clipped_reference(model, x, y, 0.5)
    assert set(got) == {model[2].weight, model[2].bias}
    torch.testing.assert_close(got[model[2].weight], expected["2.weight"], atol=1e-10, rtol=0)


class FunctionalTiedHead(nn.Module):
    """GPT-2 style: the output layer reuses the embedding through F.linear (or, with
    ``einsum``, through an operation dpclip has no rule for)."""

    def __init__(self, einsum: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.einsum = einsum

    def forward(self, tokens):
        h = torch.tanh(self.emb(tokens).mean(1))
        if self.einsum:
            return torch.einsum("bd,vd->bv", h, self.emb.weight)
        return F.linear(h, self.emb.weight)


def test_weight_used_by_a_recognised_operation_outside_its_module_is_exact():
    torch.manual_seed(0)
    model = FunctionalTiedHead().double()
    x, y = torch.randint(0, 12, (5, 4)), torch.randint(0, 12, (5,))
    _assert_matches_reference(model, x, y)


def test_weight_used_by_another_operation_outside_its_module_is_refused_not_under_clipped():
    model = FunctionalTiedHead(einsum=True)
    x, y = torch.randint(0, 12, (3, 4)), torch.randint(0, 12, (3,))
    _assert_refused(model, x, y, "outside its own module", max_grad_norm=0.01)


def test_keyword_only_layer_input_falls_back_to_exact_per_sample_gradients():
    class KeywordCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(input=x)

    torch.manual_seed(0)
    model = KeywordCall().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    _assert_matches_reference(model, x, y)


def test_attention_called_twice_sums_per_sample_gradients_before_the_norm():
    class TwiceAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            h = self.attn(x, x, x, need_weights=False)[0]
            return self.attn(h, h, h, need_weights=False)[0].mean(1)

    torch.manual_seed(0)
    model = TwiceAttention().double()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    _assert_matches_reference(model, x, y)


class _TwicePositional(nn.Module):
    """x - pos (the broadcast rule) or x - exp(pos) (an operation without a rule: the graph
    path), run twice by ``_Twice``."""

    def __init__(self, through_exp: bool) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(3, 4))
        self.through_exp = through_exp

    def forward(self, x):
        return x - (self.pos.exp() if self.through_exp else self.pos)


class _Twice(nn.Module):
    def __init__(self, through_exp: bool) -> None:
        super().__init__()
        self.add = _TwicePositional(through_exp)

    def forward(self, x):
        return self.add(self.add(x)).mean(1)


def test_module_with_its_own_parameter_runs_twice_is_refused_not_double_counted():
    model = _Twice(through_exp=True)
    _assert_refused(model, torch.randn(3, 3, 4), torch.tensor([0, 1, 2]), "runs 2 times")


def test_module_with_a_broadcast_parameter_runs_twice_sums_per_sample_gradients():
    torch.manual_seed(0)
    model = _Twice(through_exp=False).double()
    _assert_matches_reference(model, torch.randn(3, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 2]))


def test_in_place_change_of_a_recorded_input_is_refused():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = x.clone()
            h += self.lin(h)  # changes lin's recorded input after its forward
            return self.head(h)

    model = Residual()
    _assert_refused(model, torch.randn(3, 4), torch.tensor([0, 1, 0]), "modified in place")


class _OwnForwardLinear(nn.Linear):
    """A Linear subclass with its own forward (Falcon's ``FalconLinear``): no rule of its
    own, so its calls take the graph path."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_an_output_changed_in_place_after_the_forward_is_clipped_as_computed(memory):
    # Falcon's decoder adds the attention output into the MLP's output in place
    # (mlp_output += attention_output), and nn.ReLU(inplace=True) changes a layer's output
    # too: the gradient of the output as the layer computed it is taken where it entered
    # the graph, so the change is none of the layer's business (it was refused before)
    class InPlaceSum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = _OwnForwardLinear(4, 4)
            self.b = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            h += self.b(x)
            y = self.b(x)
            y.relu_()
            return self.head(h + y)

    torch.manual_seed(0)
    model = InPlaceSum().double()
    _assert_matches_reference(model, torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]), memory=memory)


def test_layer_called_once_by_rule_and_once_through_the_graph_is_refused():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(input=torch.tanh(self.lin(x)))[:, :2]

    model = Mixed()
    _assert_refused(model, torch.randn(3, 4), torch.tensor([0, 1, 0]), "runs 2 times")


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_conv_with_non_zero_padding_matches_reference(padding_mode):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode), nn.Flatten(), nn.Linear(3 * 25, 3)
    ).double()
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    _assert_matches_reference(model, x, y)


def test_calls_with_other_parameters_are_not_recorded():
    # torch.func.functional_call runs the hooked modules with other tensors: not training
    from tests.dpclip.models import TinyTransformer

    model = TinyTransformer()
    clipper = PerSampleClipper(model, 1.0)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    x, _ = make_data("transformer", 3, torch.Generator().manual_seed(0))
    torch.func.functional_call(model, params, (x,)).sum().backward()
    assert clipper.recorder.calls == []


def test_an_empty_forward_names_add_empty_micro_batch_before_the_model_fails():
    # Hugging Face attention splits heads with view(B, T, -1, d), which cannot infer -1
    # from no examples: the user needs the hint before that error
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, vocab_size=50))
    clipper = PerSampleClipper(model, 1.0)
    empty = torch.zeros(0, 4, dtype=torch.long)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            with pytest.raises(RuntimeError, match="0 elements"):
                model(empty)
    hints = [w for w in seen if "empty micro-batch" in str(w.message)]
    assert len(hints) == 1  # once per run
    assert "add_empty_micro_batch()" in str(hints[0].message)
    clipper.remove()


@pytest.mark.parametrize("out_features", [6, 3])
def test_a_parametrized_weight_is_refused_naming_the_parametrization(out_features):
    # weight_norm computes the weight from two parameters without the batch: the graph
    # path's output is that weight. Its rows a multiple of B (Wav2Vec2's positional
    # convolution), the message blamed a reshape of the batch; as many as B (3), the rows
    # were taken for the examples' and the update was silently wrong
    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.utils.parametrizations.weight_norm(nn.Linear(4, out_features))
            self.head = nn.Linear(out_features, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(x)))

    with pytest.raises(ValueError, match=r"module 'lin' \(ParametrizedLinear\) has a parametrization of 'weight' "
                       r"\(_WeightNorm\).*remove_parametrizations"):
        PerSampleClipper(Normed(), 1.0)


class PositionTable(nn.Module):
    """A module computing a [T, D] table from its parameters alone (a ViT's position
    embedding scaled per channel): no batch, whatever T is."""

    def __init__(self, positions: int, width: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(positions, width) * 0.1)
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self) -> torch.Tensor:
        return self.pos * self.scale


class PositionTableOfLength(PositionTable):
    """The table cut to the input's length: the module gets the batch, its output does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward()[: x.shape[1]]


class WithTable(nn.Module):
    """A projection of the input plus ``table``'s output: called with the input where it
    takes one (``PositionTableOfLength``), else with nothing."""

    def __init__(self, table: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.table = table
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        rows = self.table(x) if isinstance(self.table, PositionTableOfLength) else self.table()
        return self.head(torch.tanh(self.proj(x) + rows).mean(1))


def test_a_table_cut_to_the_inputs_length_is_refused_when_its_rows_equal_the_batch():
    # (review: refused only for a module given no batched input, it trained silently wrong)
    torch.manual_seed(0)
    x, y = torch.randn(4, 4, 5), torch.arange(4) % 3
    _assert_refused(WithTable(PositionTableOfLength(8, 6)), x, y, r"module 'table' has shape \(4, 6\), computed without the batch")


@pytest.mark.parametrize("batch", [4, 3])
def test_a_table_computed_without_the_batch_is_refused_also_when_its_rows_equal_the_batch(batch):
    # T = 4 positions: with B = 4 the table's rows were taken for the examples' (the graph
    # path's shape check passed) and the update was silently wrong
    torch.manual_seed(0)
    x, y = torch.randn(batch, 4, 5), torch.arange(batch) % 3
    match = (r"module 'table' has shape \(4, 6\), computed without the batch \(its first dimension equals the "
             r"batch size by chance;.*computed from parameters alone" if batch == 4
             else r"module 'table' has shape \(4, 6\) but the loss has 3 per-sample values")
    _assert_refused(WithTable(PositionTable(4, 6)), x, y, match)


class SmallViT(nn.Module):
    """Patches, a class token, and pre-norm blocks of nn.MultiheadAttention and an MLP."""

    def __init__(self, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(
                ln1=nn.LayerNorm(dim), attn=nn.MultiheadAttention(dim, 4, batch_first=True), ln2=nn.LayerNorm(dim),
                mlp=nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
            ))
            for _ in range(depth)
        )
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for b in self.blocks:
            h = b["ln1"](x)
            x = x + b["attn"](h, h, h, need_weights=False)[0]
            x = x + b["mlp"](b["ln2"](x))
        return self.head(self.norm(x)[:, 0])


def test_the_first_micro_batch_check_changes_no_bit_of_the_clipped_sum():
    # the check asks the pass for the parameters' gradients too, which changed the order in
    # which the layers' norms arrived and so the rounding of their sum: a run resumed from a
    # checkpoint (checked again on its first micro-batch) differed from the uninterrupted one
    torch.manual_seed(0)
    model = SmallViT()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    sums = []
    for checked in (True, False):
        clipper = PerSampleClipper(copy.deepcopy(model), 0.5)
        clipper._audited = not checked
        names = {p: n for n, p in clipper.module.named_parameters()}
        got = clipper.clipped_sum(F.cross_entropy(clipper.module(x), y, reduction="none"))
        sums.append({names[p]: s for p, s in got.items()})
    assert sums[0].keys() == sums[1].keys()
    assert all(torch.equal(sums[0][n], sums[1][n]) for n in sums[0])


@dataclass
class Batch:
    """A user's batch object, which dpclip's search for tensors does not open."""

    x: torch.Tensor


class EinsumLayer(nn.Module):
    """A layer on dpclip's graph path: its weight in torch.einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,ij->bj", x, self.w)


class GatedOnBatch(nn.Module):
    """The graph-path layer fed from a batch object."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = EinsumLayer()
        self.head = nn.Linear(4, 3)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(torch.tanh(self.gate(batch.x)))


def test_a_graph_path_layer_fed_from_a_batch_object_is_not_taken_for_batch_less():
    # the mode sees no batched input in a dataclass: the layer's output, rows = B, was refused
    # as computed without the batch (a false refusal of a model that trained exactly)
    torch.manual_seed(0)
    model = GatedOnBatch().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    max_grad_norm = 0.2
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(4):  # one example at a time
        model.zero_grad()
        F.cross_entropy(model(Batch(x[i : i + 1])), y[i : i + 1]).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        for n, p in model.named_parameters():
            expected[n] += p.grad * min(1.0, max_grad_norm / float(norm))
    model.zero_grad()
    clipper = PerSampleClipper(model, max_grad_norm)
    got = clipper.clipped_sum(F.cross_entropy(model(Batch(x)), y, reduction="none"))
    names = {p: n for n, p in model.named_parameters()}
    for p, g in got.items():
        torch.testing.assert_close(g, expected[names[p]], rtol=1e-9, atol=1e-12)
