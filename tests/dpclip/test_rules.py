"""The rule registry: which rule each layer type and configuration gets, and a family
added by registering, checked against torch.func per-sample gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpclip import PerSampleClipper
from dpclip.clipping.rules import Rule, base, register, rule_for
from dpclip.clipping.rules.bilinear import BilinearRule
from dpclip.clipping.rules.conv import ConvRule, ConvTransposeRule
from dpclip.clipping.rules.embedding import EmbeddingRule
from dpclip.clipping.rules.embedding_bag import EmbeddingBagRule
from dpclip.clipping.rules.fallback import OpacusRule
from dpclip.clipping.rules.linear import LinearRule
from dpclip.clipping.rules.norm import NormRule
from dpclip.clipping.rules.prelu import PreluRule
from tests.dpclip.helpers import assert_clipped_sum_matches_reference
from tests.dpclip.models import reference_update


class _OwnLinear(nn.Linear):
    """A subclass may compute something else in its own forward: no rule by inheritance."""

    def forward(self, x):
        return super().forward(x) * 2


class _PlainLinear(nn.Linear):
    """A subclass with nn.Linear's forward (as Opacus's RNNLinear): the linear rule."""


class _ScaledLinear(nn.Linear):
    """nn.Linear's forward, but it owns another parameter: no rule."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.scale = nn.Parameter(torch.ones(1))


CASES = [
    pytest.param(lambda: nn.Linear(4, 3), LinearRule, id="linear"),
    pytest.param(lambda: _OwnLinear(4, 3), None, id="linear-subclass"),
    pytest.param(lambda: _PlainLinear(4, 3), LinearRule, id="linear-subclass-same-forward"),
    pytest.param(lambda: _ScaledLinear(4, 3), None, id="linear-subclass-extra-parameter"),
    pytest.param(lambda: nn.Conv1d(2, 3, 3), ConvRule, id="conv1d"),
    pytest.param(lambda: nn.Conv2d(2, 3, 3, padding=1), ConvRule, id="conv2d"),
    pytest.param(lambda: nn.Conv2d(2, 4, 3, groups=2), ConvRule, id="conv2d-grouped"),
    pytest.param(lambda: nn.Conv3d(2, 3, 3), ConvRule, id="conv3d"),
    pytest.param(
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), ConvRule, id="conv2d-reflect"
    ),
    pytest.param(lambda: nn.Conv1d(2, 3, 3, padding="same"), ConvRule, id="conv1d-same"),
    pytest.param(
        lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular"), ConvRule, id="conv3d-circular"
    ),
    pytest.param(lambda: nn.ConvTranspose1d(2, 3, 3), ConvTransposeRule, id="conv-transpose1d"),
    pytest.param(lambda: nn.ConvTranspose2d(2, 4, 3, groups=2), ConvTransposeRule, id="conv-transpose2d"),
    pytest.param(lambda: nn.ConvTranspose3d(2, 3, 3), ConvTransposeRule, id="conv-transpose3d"),
    pytest.param(lambda: nn.LayerNorm(4), NormRule, id="layernorm"),
    pytest.param(lambda: nn.GroupNorm(2, 4), NormRule, id="groupnorm"),
    pytest.param(lambda: nn.InstanceNorm1d(4, affine=True), NormRule, id="instancenorm"),
    pytest.param(lambda: nn.InstanceNorm3d(4, affine=True), NormRule, id="instancenorm3d"),
    pytest.param(
        lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True), OpacusRule,
        id="instancenorm-running-stats",  # (in eval mode it normalises by the running statistics)
    ),
    pytest.param(lambda: nn.Embedding(5, 3, padding_idx=0), EmbeddingRule, id="embedding"),
    pytest.param(lambda: nn.Embedding(5, 3, max_norm=1.0), None, id="embedding-max-norm"),
    pytest.param(lambda: nn.Embedding(5, 3, sparse=True), None, id="embedding-sparse"),
    pytest.param(lambda: nn.Embedding(5, 3, scale_grad_by_freq=True), None, id="embedding-freq"),
    pytest.param(lambda: nn.EmbeddingBag(5, 3, mode="max"), EmbeddingBagRule, id="embedding-bag"),
    pytest.param(lambda: nn.PReLU(), PreluRule, id="prelu"),
    pytest.param(lambda: nn.Bilinear(3, 4, 2), BilinearRule, id="bilinear"),
    pytest.param(lambda: nn.Softmax2d(), None, id="no-family"),
]


@pytest.mark.parametrize("make, expected", CASES)
def test_each_layer_type_and_configuration_gets_its_family_rule(make, expected):
    rule = rule_for(make())
    assert (None if rule is None else type(rule)) is expected


class Scale(nn.Module):
    """y = x · w per feature: a type no family has a rule for."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return x * self.weight


class ScaledMLP(nn.Module):
    """Two positions per example, the scale between two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        return self.net(x).mean(dim=1)


class ScaleRule(Rule):
    """∇w ℓ_i = Σ over example i's positions of x·g; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def per_sample_grads(self, call):
        self.calls += 1
        x, g = call.activations[0].to(call.backprop.dtype), call.backprop
        return {"weight": (x * g).reshape(g.shape[0], -1, g.shape[-1]).sum(dim=1)}


@pytest.fixture
def registry(monkeypatch):
    """The registry as the families left it, restored after the test."""
    monkeypatch.setattr(base, "_ENTRIES", list(base._ENTRIES))
    monkeypatch.setattr(base, "_FALLBACKS", list(base._FALLBACKS))


@pytest.mark.usefixtures("registry")
def test_a_registered_family_is_used_and_matches_reference():
    torch.manual_seed(0)
    model = ScaledMLP().double()
    x, y = torch.randn(6, 2, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    rule = ScaleRule()
    register(Scale, rule)
    params = {k: v.detach() for k, v in model.named_parameters()}
    _, norms = reference_update(model, params, x, y, 1.0, 1.0)
    C = float(norms.median())  # clipping binds for about half the examples
    expected, _ = reference_update(model, params, x, y, C, 1.0)
    clipper = PerSampleClipper(model, C)
    got = clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
    clipper.remove()
    assert rule.calls >= 1  # the family's rule, not the exact graph fallback
    names = {p: n for n, p in model.named_parameters()}
    assert {names[p] for p in got} == set(expected)
    for p, s in got.items():
        torch.testing.assert_close(s, expected[names[p]], atol=1e-10, rtol=0)


@pytest.mark.usefixtures("registry")
def test_fallback_entries_come_after_every_family_whatever_the_order():
    own = ScaleRule()
    # (with running statistics: no family covers it, Opacus's fallback does)
    register(nn.InstanceNorm1d, own)  # registered after Opacus's fallback
    assert rule_for(nn.InstanceNorm1d(4, affine=True, track_running_stats=True)) is own
    register(lambda module: True, None, fallback=True)
    assert type(rule_for(nn.Linear(2, 2))) is LinearRule
    assert rule_for(Scale(4)) is None


@pytest.mark.parametrize("positions", [1, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_gram_norm_is_the_norm_of_the_per_example_gradient(positions, bias):
    # the ghost norm of a linear layer against its per-example gradients written out
    from dpclip.clipping.norms import gram_sq_norm

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, positions, 3, generator=gen, dtype=torch.float64) * 10
    g = torch.randn(4, positions, 2, generator=gen, dtype=torch.float64)
    expected = torch.einsum("btp,btd->bpd", g, a).square().sum(dim=(1, 2))
    if bias:
        expected = expected + g.sum(dim=1).square().sum(dim=1)
    torch.testing.assert_close(gram_sq_norm(a, g, bias=bias).sq, expected, rtol=1e-12, atol=0)


class InstanceNormPooled(nn.Module):
    """A convolution, InstanceNorm2d(affine=True), global average pooling: the norm's weight
    gets no gradient at all (the mean of x̂ over the positions is 0), only rounding, which
    the first micro-batch's check took for a use of the weight it does not see (when the
    layer had Opacus's rule: its rounding scale came from per-example gradients near 0)."""

    def __init__(self, pooled: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.InstanceNorm2d(8, affine=True)
        self.head = nn.Linear(8 if pooled else 8 * 36, 3)
        self.pooled = pooled

    def forward(self, x):
        h = self.norm(self.conv(x))
        return self.head(h.mean(dim=(2, 3)) if self.pooled else torch.tanh(h).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pooled", [True, False])
def test_instance_norm_takes_the_norm_rule_and_matches_reference(pooled, dtype):
    torch.manual_seed(0)
    model = InstanceNormPooled(pooled).to(dtype)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 6, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (6,), generator=gen)
    tol = {torch.float32: (1e-4, 1e-6), torch.float64: (1e-9, 1e-12)}[dtype]
    assert isinstance(rule_for(model.norm), NormRule)
    assert_clipped_sum_matches_reference(model, x, y, "auto", rtol=tol[0], atol=tol[1])
