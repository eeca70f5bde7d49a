"""Elementwise scale and shift by a parameter inside a module without a rule
(``w * x``, ``x + b``: RMS normalisations such as T5's and Llama's), recorded by
operation with the elementwise rules instead of the exact graph path, each checked
against torch.func per-sample gradients. (A parameter broadcast otherwise:
test_broadcast_params.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dpclip import PerSampleClipper
from dpclip.clipping.recording import GraphCall, LayerCall
from dpclip.clipping.rules.elementwise import SCALE, SHIFT
from tests.dpclip.helpers import Around, assert_clipped_sum_matches_reference

T, D_IN, D, CLASSES = 5, 4, 6, 3


class RMSNorm(nn.Module):
    """Llama's LlamaRMSNorm (``cast``: the statistics in another dtype, the result cast
    back to the input's before the scale) or T5's T5LayerNorm (``weight_first``)."""

    def __init__(self, cast: torch.dtype | None = None, weight_first: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(D))
        self.cast, self.weight_first = cast, weight_first

    def forward(self, x):
        input_dtype = x.dtype
        h = x.to(self.cast) if self.cast is not None else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = h.to(input_dtype)
        return self.weight * h if self.weight_first else h * self.weight


class ScaleShift(nn.Module):
    """x ⊙ w + b with parameters of shape [D] (broadcast over the batch and the positions)
    or [T, D] (over the batch); ``bias_first``: b + w ⊙ x."""

    def __init__(self, shape: tuple[int, ...] = (D,), bias_first: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(shape))
        self.bias = nn.Parameter(0.3 * torch.randn(shape))
        self.bias_first = bias_first

    def forward(self, x):
        return self.bias + self.weight * x if self.bias_first else x * self.weight + self.bias


class Twice(nn.Module):
    """The same module run twice in one forward: its per-example gradients add up."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.tanh(self.inner(x)))


class ShiftByExp(ScaleShift):
    """The bias enters through exp, an operation no rule covers: the module takes the
    graph path, its recorded scale dropped."""

    def forward(self, x):
        return x * self.weight + self.bias.exp()


def Net(inner: nn.Module) -> Around:  # noqa: N802 - a model, named like one
    return Around(inner, D_IN, D, CLASSES)


def _assert_exact(
    inner: nn.Module, clipping: str, dtype: torch.dtype = torch.float64, batch: int = 4
) -> tuple[Around, PerSampleClipper, torch.Tensor]:
    """dpclip's clipped sum and norms equal torch.func's at C = the median per-example norm."""
    torch.manual_seed(0)
    model = Net(inner).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, T, D_IN, generator=gen, dtype=dtype)
    y = torch.randint(0, CLASSES, (batch,), generator=gen)
    rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (1e-5, 1e-7)
    clipper = assert_clipped_sum_matches_reference(model, x, y, clipping, rtol, atol)
    model(x)  # what one forward records
    return model, clipper, x


def _inner_calls(model: Around, clipper: PerSampleClipper) -> tuple[list[LayerCall], list[GraphCall]]:
    calls = clipper.recorder.calls
    layers = [c for c in calls if isinstance(c, LayerCall) and c.module is model.inner]
    return layers, [c for c in calls if isinstance(c, GraphCall)]


@pytest.mark.parametrize("clipping", ["auto", "ghost", "per_sample"])
@pytest.mark.parametrize("weight_first", [True, False])
def test_rms_norm_scale_takes_the_scale_rule(clipping, weight_first):
    model, clipper, _ = _assert_exact(RMSNorm(weight_first=weight_first), clipping)
    layers, graph = _inner_calls(model, clipper)
    assert not graph and [c.rule for c in layers] == [SCALE]


@pytest.mark.parametrize("clipping", ["auto", "ghost", "per_sample"])
def test_rms_norm_with_dtype_casts_takes_the_scale_rule(clipping):
    # float32 model, statistics in float64, cast back before the scale (Llama's RMSNorm)
    model, clipper, _ = _assert_exact(RMSNorm(cast=torch.float64), clipping, dtype=torch.float32)
    layers, graph = _inner_calls(model, clipper)
    assert not graph and [c.rule for c in layers] == [SCALE]


@pytest.mark.parametrize("clipping", ["auto", "ghost", "per_sample"])
@pytest.mark.parametrize("shape, bias_first", [((D,), False), ((D,), True), ((T, D), False)])
def test_scale_and_shift_take_the_elementwise_rules(clipping, shape, bias_first):
    model, clipper, _ = _assert_exact(ScaleShift(shape, bias_first), clipping)
    layers, graph = _inner_calls(model, clipper)
    assert not graph and sorted(c.rule is SHIFT for c in layers) == [False, True]


@pytest.mark.parametrize("clipping", ["auto", "per_sample"])
def test_scale_and_shift_module_run_twice_is_exact(clipping):
    # the graph path refuses a module that runs twice; the rules sum its per-example gradients
    model, clipper, _ = _assert_exact(Twice(ScaleShift((T, D))), clipping)
    calls = clipper.recorder.calls
    assert not any(isinstance(c, GraphCall) for c in calls)
    assert sum(isinstance(c, LayerCall) and c.module is model.inner.inner for c in calls) == 4


def test_parameter_also_in_an_operation_without_a_rule_takes_the_graph_path_exactly():
    model, clipper, _ = _assert_exact(ShiftByExp(), "auto")
    layers, graph = _inner_calls(model, clipper)
    assert not layers and [c.unit.module for c in graph] == [model.inner]


@pytest.mark.parametrize("clipping", ["auto", "per_sample"])
def test_parameter_broadcast_within_the_trailing_shape_takes_the_broadcast_rule(clipping):
    # weight [T, 1] against x [B, T, D]: not the trailing shape, so not the scale rule, but
    # a parameter broadcast over the batch (tests/dpclip/test_broadcast_params.py)
    inner = ScaleShift()
    inner.weight = nn.Parameter(1 + 0.3 * torch.randn(T, 1))
    model, clipper, _ = _assert_exact(inner, clipping)
    layers, graph = _inner_calls(model, clipper)
    assert not graph and sorted(type(c.rule).__name__ for c in layers) == ["BroadcastRule", "ShiftRule"]


# --- F.layer_norm / F.group_norm in a module's own forward ------------------------------------


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """ConvNeXt's ConvNextLayerNorm: an ``nn.LayerNorm`` subclass whose own forward permutes
    [B, C, T] to channels-last around ``super().forward`` (``F.layer_norm``)."""

    def __init__(self) -> None:
        super().__init__(D, eps=1e-6)
        with torch.no_grad():
            self.weight.add_(0.3 * torch.randn(D))
            self.bias.add_(0.3 * torch.randn(D))

    def forward(self, x):
        return super().forward(x.transpose(1, 2).transpose(1, 2))


class FunctionalGroupNorm(nn.Module):
    """``F.group_norm`` on [B, C, T] with keyword arguments, weight only, in its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(T))

    def forward(self, x):
        return nn.functional.group_norm(x, num_groups=T, weight=self.scale, eps=1e-4)


@pytest.mark.parametrize("clipping", ["auto", "per_sample"])
@pytest.mark.parametrize("inner", [ChannelsFirstLayerNorm, FunctionalGroupNorm])
def test_functional_normalisation_in_a_module_without_a_rule_takes_the_norm_rule(clipping, inner):
    model, clipper, _ = _assert_exact(inner(), clipping)
    layers, graph = _inner_calls(model, clipper)
    assert not graph and [type(c.rule).__name__ for c in layers] == ["FunctionalNormRule"]
