"""The convolution rules (``dpclip.clipping.rules.conv``): every padding mode, string
padding, groups, and transposed convolutions, in 1, 2 and 3 dimensions, each by ghost
norm and by per-sample gradients against torch.func per-sample gradients in float64,
and none of them on the exact graph path."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dpclip
from dpclip.clipping.plan import GRAPH_PATH
from tests.dpclip.helpers import assert_clipped_sum_matches_reference, make_run, train_logical_batch

CLASSES = 3


class Net(nn.Module):
    """The layer under test between inputs [B, 6, *spatial] and a linear head over its
    channels averaged over positions; ``output_size`` is passed to a transposed
    convolution's forward."""

    def __init__(self, layer: nn.Module, output_size: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.output_size = output_size
        self.head = nn.Linear(layer.out_channels, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x) if self.output_size is None else self.layer(x, self.output_size)
        return self.head(torch.tanh(h).flatten(2).mean(dim=2))


def _case(make, spatial: tuple[int, ...], name: str):
    return pytest.param(make, spatial, id=name)


# (layer, spatial input shape), with stride or dilation not 1 where the configuration
# allows it (torch refuses padding="same" with a stride)
CASES = [
    _case(lambda: nn.Conv1d(6, 4, 3, stride=2, padding=2, padding_mode="reflect"), (11,), "1d-reflect"),
    _case(lambda: nn.Conv1d(6, 4, 3, stride=3, padding=1, padding_mode="replicate", groups=2), (10,),
          "1d-replicate-groups"),
    _case(lambda: nn.Conv1d(6, 4, 4, dilation=2, padding="same", bias=False), (9,), "1d-same-even-kernel"),
    _case(lambda: nn.Conv1d(6, 6, 4, dilation=2, padding="same", padding_mode="circular", groups=3), (9,),
          "1d-same-circular-groups"),
    _case(lambda: nn.Conv1d(6, 12, 3, dilation=2, padding="valid", groups=6), (10,), "1d-valid-depthwise"),
    _case(lambda: nn.Conv1d(6, 4, 2, stride=2, padding=1, dilation=3), (10,), "1d-zeros"),
    _case(lambda: nn.Conv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                            padding_mode="reflect"), (7, 6), "2d-reflect"),
    _case(lambda: nn.Conv2d(6, 4, (2, 3), dilation=(2, 1), padding="same", groups=2), (5, 6),
          "2d-same-groups"),
    _case(lambda: nn.Conv2d(6, 4, 3, stride=2, padding=1, padding_mode="replicate", groups=2, bias=False),
          (7, 7), "2d-replicate-groups"),
    _case(lambda: nn.Conv2d(6, 4, 3, stride=(1, 2), padding=(2, 1), padding_mode="circular"), (5, 6),
          "2d-circular"),
    _case(lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), (7, 6), "2d-depthwise"),
    _case(lambda: nn.Conv2d(6, 4, 2, padding="valid", dilation=2), (5, 5), "2d-valid"),
    # non-overlapping patches (a ViT's patch embedding), also cut short and zero-padded
    _case(lambda: nn.Conv2d(6, 4, (2, 3), stride=(2, 3)), (6, 9), "2d-patches"),
    _case(lambda: nn.Conv2d(6, 4, 2, stride=2, padding=1), (5, 6), "2d-patches-padded-cut"),
    _case(lambda: nn.Conv2d(6, 4, 2, stride=2, padding=1, padding_mode="reflect", bias=False), (5, 5),
          "2d-patches-reflect"),
    _case(lambda: nn.Conv3d(6, 4, 2, stride=2, padding=1, groups=2), (4, 5, 3), "3d-groups"),
    _case(lambda: nn.Conv3d(6, 4, (2, 3, 2), padding="same", padding_mode="reflect", dilation=(1, 1, 2)),
          (4, 4, 5), "3d-same-reflect"),
    _case(lambda: nn.ConvTranspose1d(6, 4, 3, stride=2, padding=1, output_padding=1), (7,),
          "t1d-output-padding"),
    _case(lambda: nn.ConvTranspose1d(6, 4, 3, stride=3, dilation=2, output_padding=2, groups=2, bias=False),
          (5,), "t1d-groups-dilation"),
    # output_padding ≥ stride (torch allows it below the dilation): positions past every input
    _case(lambda: nn.ConvTranspose1d(6, 4, 2, dilation=3, output_padding=2), (6,),
          "t1d-output-padding-past-stride"),
    _case(lambda: nn.ConvTranspose1d(6, 6, 3, stride=2, groups=6), (6,), "t1d-depthwise"),
    _case(lambda: nn.ConvTranspose2d(6, 6, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2),
                                     dilation=(1, 2), groups=3), (4, 3), "t2d-groups"),
    _case(lambda: nn.ConvTranspose3d(6, 4, 2, stride=2, padding=(0, 1, 0), groups=2), (3, 3, 2),
          "t3d-groups"),
]


def _assert_exact(make, spatial, clipping, output_size=None):
    """dpclip's clipped sum and norms equal torch.func's (float64, C = the median norm),
    and the layer took the convolution rule with ``clipping``'s strategy."""
    torch.manual_seed(0)
    model = Net(make(), output_size).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, *spatial, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (5,), generator=gen)
    clipper = assert_clipped_sum_matches_reference(model, x, y, clipping, rtol=1e-9, atol=1e-12)
    layer = next(lp for lp in clipper.plan().layers if lp.layer == "layer")
    transposed = isinstance(model.layer, nn.modules.conv._ConvTransposeNd)
    assert layer.rule == ("conv transpose" if transposed else "conv")
    assert layer.strategy == clipping.replace("_", "-")


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
@pytest.mark.parametrize("make, spatial", CASES)
def test_convolution_matches_per_sample_reference(make, spatial, clipping):
    _assert_exact(make, spatial, clipping)


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_transposed_convolution_given_an_output_size_matches_reference(clipping):
    # output_size instead of output_padding: the extra positions are read from the shapes
    _assert_exact(lambda: nn.ConvTranspose2d(6, 4, 3, stride=(2, 3), padding=1), (4, 3), clipping, (8, 8))


class OwnForward(nn.Conv2d):
    """A convolution subclass whose own forward calls ``F.conv2d`` (no rule by type)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding,
                                    self.dilation, self.groups)


class BareConv1d(nn.Module):
    """``F.conv1d`` with keyword arguments on a parameter of a module without a rule;
    ``padding="same"`` (uneven for an even kernel) is not recorded: the exact graph path."""

    def __init__(self, padding: str | int) -> None:
        super().__init__()
        self.out_channels = 4
        self.weight = nn.Parameter(0.3 * torch.randn(4, 3, 2))
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv1d(x, self.weight, stride=1 if self.padding == "same" else 2,
                                    padding=self.padding, dilation=2, groups=2)


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
@pytest.mark.parametrize("make, spatial, name", [
    (lambda: OwnForward(6, 4, 3, stride=2, padding=(1, 2), groups=2), (7, 6), "own-forward"),
    (lambda: BareConv1d(1), (11,), "bare-conv1d"),
    (lambda: BareConv1d("valid"), (11,), "bare-conv1d-valid"),
])
def test_convolution_called_in_a_modules_own_forward_takes_the_convolution_rule(make, spatial, name, clipping):
    torch.manual_seed(0)
    model = Net(make()).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, *spatial, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (5,), generator=gen)
    clipper = assert_clipped_sum_matches_reference(model, x, y, clipping, rtol=1e-9, atol=1e-12)
    layer = next(lp for lp in clipper.plan().layers if lp.layer == "layer")
    assert (layer.rule, layer.strategy) == ("functional conv", clipping.replace("_", "-"))


def test_same_padding_in_a_bare_convolution_takes_the_graph_path_exactly():
    torch.manual_seed(0)
    model = Net(BareConv1d("same")).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 11, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (5,), generator=gen)
    with pytest.warns(dpclip.SlowClippingWarning, match="'layer'"):
        clipper = assert_clipped_sum_matches_reference(model, x, y, "auto", rtol=1e-9, atol=1e-12)
    assert next(lp for lp in clipper.plan().layers if lp.layer == "layer").rule == GRAPH_PATH


class ConvZoo(nn.Module):
    """A reflect-padded "same" convolution, a circular depthwise one with a stride, a
    grouped transposed one and a head, on make_data("cnn") inputs [B, 1, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(1, 4, (3, 2), padding="same", padding_mode="reflect")
        self.depthwise = nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="circular", groups=4)
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.depthwise(torch.tanh(self.same(x))))
        return self.head(torch.tanh(self.up(h)).mean(dim=(2, 3)))


@pytest.mark.parametrize("clipping", dpclip.STRATEGIES)
def test_accumulated_update_of_convolutions_equals_large_batch_clipped_mean(clipping):
    # through make_private: two micro-batches of 4, σ = 0, against torch.func over all 8
    run = make_run("cnn", model=ConvZoo().double(), batch_size=4, accumulation_steps=2, clipping=clipping)
    before = run.params()
    micro = [(run.x[i * 4:(i + 1) * 4], run.y[i * 4:(i + 1) * 4]) for i in range(2)]
    train_logical_batch(run, micro, style=2)
    expected, norms = run.reference(before, run.x[:8], run.y[:8], run.optimizer.max_grad_norm, 8)
    assert (norms > run.optimizer.max_grad_norm).any() and (norms < run.optimizer.max_grad_norm).any()
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], rtol=1e-9, atol=1e-12, msg=name)
    plan = run.engine.clipping_plan()
    assert plan.slow_layers() == ()
    assert {lp.layer: lp.rule for lp in plan.layers} == {
        "same": "conv", "depthwise": "conv", "up": "conv transpose", "head": "linear"
    }
    assert GRAPH_PATH not in str(plan)


@pytest.mark.parametrize(
    "model_dtype, autocast_dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)],
    ids=["float32-autocast-bf16", "bf16-autocast-bf16", "float32-autocast-fp16"],
)
@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_autocast_clipped_contribution_stays_within_max_grad_norm(clipping, model_dtype, autocast_dtype):
    # one example per micro-batch, every one clipped: what it adds, measured in float64, is
    # its sensitivity, C to float32 rounding (the norm and the sum from the same rounded
    # inputs, in float32)
    torch.manual_seed(0)
    model = ConvZoo().to(model_dtype)
    C = 1e-3
    clipper = dpclip.PerSampleClipper(model, C, clipping)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)).to(model_dtype)
    y = torch.tensor([0, 1, 2, 0])
    for i in range(4):
        with torch.autocast("cpu", dtype=autocast_dtype):
            losses = torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="none")
            s = clipper.clipped_sum(losses)
        assert all(v.dtype == torch.float32 for v in s.values())
        norm = torch.sqrt(sum(v.double().pow(2).sum() for v in s.values())).item()
        assert C * (1 - 1e-3) <= norm <= C * (1 + 1e-6)
    assert clipper.plan().slow_layers() == ()
