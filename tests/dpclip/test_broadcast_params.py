"""Trainable parameters used other than by a linear map (issue 14, point 2): ``nn.PReLU``
and ``F.prelu``, a parameter broadcast over the batch (ViT's ``cls_token.expand(B, -1, -1)``
and ``x + position_embeddings`` of shape [1, T, D], a bare parameter in the model's own
forward), ``nn.Bilinear``, and ``nn.MultiheadAttention(add_bias_kv=True, add_zero_attn=True)``.

Each takes its rule, not the exact graph path, and its clipped sum and per-example norms
equal torch.func's per-example gradients (``assert_clipped_sum_matches_reference``) in
float64, for each strategy; a model with all of them trains through ``make_private`` with
accumulation to the clipped per-example update.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpclip import PerSampleClipper
from dpclip.clipping.plan import GRAPH_PATH
from dpclip.clipping.recording import GraphCall, LayerCall
from dpclip.clipping.rules.bilinear import BILINEAR
from dpclip.clipping.rules.broadcast import BROADCAST
from dpclip.clipping.rules.linear import LINEAR
from dpclip.clipping.rules.prelu import PRELU
from tests.dpclip.helpers import Around, assert_clipped_sum_matches_reference, make_run, train_logical_batch

B, T, D_IN, D, CLASSES = 4, 5, 3, 6, 3
STRATEGIES = ["ghost", "per_sample"]


def Net(inner: nn.Module) -> Around:  # noqa: N802 - a model, named like one
    return Around(inner, D_IN, D, CLASSES)


def _assert_exact(model: nn.Module, clipping: str, x: torch.Tensor | None = None) -> PerSampleClipper:
    """float64: dpclip's clipped sum and norms equal torch.func's at C = the median norm;
    the clipper, with the calls of one more forward recorded."""
    torch.manual_seed(0)
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    if x is None:
        x = torch.randn(B, T, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (x.shape[0],), generator=gen)
    clipper = assert_clipped_sum_matches_reference(model, x, y, clipping, rtol=1e-9, atol=1e-12)
    model(x)
    return clipper


def _rules_of(clipper: PerSampleClipper, module: nn.Module) -> list:
    """The rules of ``module``'s recorded calls; asserts that nothing took the graph path."""
    calls = clipper.recorder.calls
    assert not any(isinstance(c, GraphCall) for c in calls)
    assert GRAPH_PATH not in str(clipper.plan())
    return [c.rule for c in calls if isinstance(c, LayerCall) and c.module is module]


def _graph_modules(clipper: PerSampleClipper) -> list[nn.Module]:
    return [c.unit.module for c in clipper.recorder.calls if isinstance(c, GraphCall)]


# --- PReLU ----------------------------------------------------------------------------


class ChannelsFirst(nn.Module):
    """[B, T, D] -> [B, D, T] (channels in dimension 1, as after a convolution), ``layer``,
    and back."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, h):
        return self.layer(h.transpose(1, 2)).transpose(1, 2)


class FunctionalPrelu(nn.Module):
    """``F.prelu`` on a parameter of a module without a rule."""

    def __init__(self, slopes: int) -> None:
        super().__init__()
        self.slope = nn.Parameter(0.25 + 0.1 * torch.randn(slopes))

    def forward(self, h):
        return F.prelu(h, self.slope)


@pytest.mark.parametrize("clipping", STRATEGIES)
@pytest.mark.parametrize("slopes", [1, D])
def test_prelu_takes_the_prelu_rule(clipping, slopes):
    prelu = nn.PReLU(slopes, init=0.1)
    with torch.no_grad():
        prelu.weight.add_(0.1 * torch.randn(slopes))  # a different slope per channel
    clipper = _assert_exact(Net(ChannelsFirst(prelu)), clipping)
    assert _rules_of(clipper, prelu) == [PRELU]


@pytest.mark.parametrize("clipping", STRATEGIES)
def test_prelu_on_batch_by_channel_input_takes_the_prelu_rule(clipping):
    prelu = nn.PReLU(D)
    model = nn.Sequential(nn.Linear(D_IN, D), prelu, nn.Linear(D, CLASSES))
    x = torch.randn(B, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    clipper = _assert_exact(model, clipping, x)
    assert _rules_of(clipper, prelu) == [PRELU]


@pytest.mark.parametrize("clipping", STRATEGIES)
@pytest.mark.parametrize("slopes", [1, T])
def test_functional_prelu_in_a_module_without_a_rule_takes_the_prelu_rule(clipping, slopes):
    model = Net(FunctionalPrelu(slopes))  # channels: dimension 1 of [B, T, D], T of them
    clipper = _assert_exact(model, clipping)
    assert _rules_of(clipper, model.inner) == [PRELU]


# --- parameters broadcast over the batch ------------------------------------------------


class ViTEmbeddings(nn.Module):
    """Hugging Face ViT's embeddings after the patch projection: a class token expanded
    over the batch and concatenated before the patches, then position embeddings [1, T+1, D]
    added (``stack``: the token expanded over the positions too and stacked with them,
    position embeddings [1, T, D])."""

    def __init__(self, stack: bool = False) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.position_embeddings = nn.Parameter(torch.randn(1, T if stack else T + 1, D))
        self.stack = stack

    def forward(self, h):
        if self.stack:
            cls = self.cls_token.expand(h.shape[0], T, -1)
            return torch.stack((cls, h), dim=1).sum(dim=1) + self.position_embeddings
        cls = self.cls_token.expand(h.shape[0], -1, -1)
        return torch.cat((cls, h), dim=1) + self.position_embeddings


class RootParameters(nn.Module):
    """Parameters of the model itself, used in its own forward: a scalar scale, a position
    embedding [1, T, D], a per-feature gain [D] and a per-position one [T, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D_IN, D)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.pos = nn.Parameter(torch.randn(1, T, D))
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(D))
        self.per_position = nn.Parameter(1 + 0.3 * torch.randn(T, 1))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        h = (self.proj(x) + self.pos) * self.scale
        h = torch.tanh(h) * self.gain / self.per_position
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("clipping", STRATEGIES)
@pytest.mark.parametrize("stack", [False, True])
def test_vit_class_token_and_position_embeddings_take_the_broadcast_rule(clipping, stack):
    model = Net(ViTEmbeddings(stack))
    clipper = _assert_exact(model, clipping)
    assert _rules_of(clipper, model.inner) == [BROADCAST, BROADCAST]


@pytest.mark.parametrize("clipping", STRATEGIES)
def test_parameters_of_the_model_itself_are_recorded_by_operation(clipping):
    model = RootParameters()
    clipper = _assert_exact(model, clipping)
    assert sorted(type(r).__name__ for r in _rules_of(clipper, model)) == [
        "BroadcastRule", "BroadcastRule", "ScaleRule", "ScaleRule",
    ]
    root = next(lp for lp in clipper.plan().layers if lp.layer == "<root>")
    assert root.rule == "broadcast + scale"


class ExpandedAs(nn.Module):
    """``h * p.expand_as(h)`` with p of shape [1, T, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(1 + 0.3 * torch.randn(1, T, 1))

    def forward(self, h):
        return h * self.p.expand_as(h)


@pytest.mark.parametrize("clipping", STRATEGIES)
def test_parameter_expanded_as_a_batch_first_tensor_takes_the_broadcast_rule(clipping):
    model = Net(ExpandedAs())
    clipper = _assert_exact(model, clipping)
    assert _rules_of(clipper, model.inner) == [BROADCAST]


class ExpandedBySize(nn.Module):
    """A parameter [1, D] expanded to [n, D] with n = B by chance, not the batch: added to
    [B, T, D], its rows are positions (``misaligned``); or expanded over the batch but then
    used by an operation that does not align it with batch-first tensors."""

    def __init__(self, misaligned: bool) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(1, D))
        self.misaligned = misaligned

    def forward(self, h):
        if self.misaligned:
            return h + self.p.expand(h.shape[1], -1)  # n = T positions
        return h + torch.sin(self.p.expand(h.shape[0], -1)).unsqueeze(1)


@pytest.mark.parametrize("misaligned", [True, False])
def test_expanded_parameter_not_aligned_with_the_batch_takes_the_graph_path_exactly(misaligned):
    # T = B here: the expanded size equals the batch size, but the rows are not examples
    x = torch.randn(T, T, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = Net(ExpandedBySize(misaligned))
    clipper = _assert_exact(model, "auto", x)
    assert _graph_modules(clipper) == [model.inner]


class ExpandedThrough(nn.Module):
    """A class token expanded over the batch and returned: its use outside the module is
    not seen aligned before the module's forward ends."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))

    def forward(self, h):
        return self.cls_token.expand(h.shape[0], -1, -1)


class ConcatOutside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token = ExpandedThrough()

    def forward(self, h):
        return torch.cat((self.token(h), h), dim=1)


def test_expanded_parameter_leaving_its_module_unaligned_takes_the_graph_path_exactly():
    model = Net(ConcatOutside())
    clipper = _assert_exact(model, "auto")
    assert _graph_modules(clipper) == [model.inner.token]


# --- views of a parameter: dimensions of size 1 added or dropped ----------------------


class ChannelsFirstNorm(nn.Module):
    """ConvNeXt's channels-first LayerNorm on [B, D, T]: normalised over channels by hand,
    then ``weight[:, None] * x + bias[:, None]`` (``view``: ``weight.view(1, -1, 1)`` and
    ``bias.unsqueeze(-1)``), on h [B, T, D] seen channels-first."""

    def __init__(self, view: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(D))
        self.bias = nn.Parameter(0.3 * torch.randn(D))
        self.view = view

    def forward(self, h):
        x = h.transpose(1, 2)
        x = (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True, unbiased=False) + 1e-6).sqrt()
        if self.view == "index":
            x = self.weight[:, None] * x + self.bias[:, None]
        else:
            x = self.weight.view(1, -1, 1) * x + self.bias.unsqueeze(-1)
        return x.transpose(1, 2)


@pytest.mark.parametrize("clipping", STRATEGIES)
@pytest.mark.parametrize("view", ["index", "view-unsqueeze"])
def test_views_of_a_parameter_with_unit_dimensions_take_the_broadcast_rule(clipping, view):
    model = Net(ChannelsFirstNorm(view))
    clipper = _assert_exact(model, clipping)
    assert _rules_of(clipper, model.inner) == [BROADCAST, BROADCAST]


class SlicedScale(nn.Module):
    """A slice of a parameter (not all its elements) and a view that reorders them: the
    rules do not take them, the exact graph path does."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.p = nn.Parameter(1 + 0.3 * torch.randn(2 * D if use == "slice" else (D, 2)))
        self.use = use

    def forward(self, h):
        if self.use == "slice":
            return h * self.p[:D, None].squeeze(-1)
        return h * self.p.t()[:1].squeeze(0) + self.p[:, 1]


@pytest.mark.parametrize("use", ["slice", "reordered"])
def test_parameter_slices_and_reordered_views_take_the_graph_path_exactly(use):
    model = Net(SlicedScale(use))
    clipper = _assert_exact(model, "auto")
    assert _graph_modules(clipper) == [model.inner]


# --- Bilinear -------------------------------------------------------------------------


class BilinearOf(nn.Module):
    """``nn.Bilinear(D, D_IN, D)`` of h and a second input computed from h."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(D, D_IN, D, bias=bias)
        self.other = nn.Linear(D, D_IN)

    def forward(self, h):
        return self.bilinear(h, torch.tanh(self.other(h)))


@pytest.mark.parametrize("clipping", STRATEGIES)
@pytest.mark.parametrize("bias", [True, False])
def test_bilinear_takes_the_bilinear_rule(clipping, bias):
    model = Net(BilinearOf(bias))
    clipper = _assert_exact(model, clipping)
    assert _rules_of(clipper, model.inner.bilinear) == [BILINEAR]
    layer = next(lp for lp in clipper.plan().layers if lp.layer == "inner.bilinear")
    assert layer.strategy == clipping.replace("_", "-")


@pytest.mark.parametrize("clipping", STRATEGIES)
def test_bilinear_on_one_position_per_example_takes_the_bilinear_rule(clipping):
    bilinear = nn.Bilinear(D_IN, D_IN, D)
    model = nn.Sequential(nn.Linear(D_IN, D_IN), nn.Tanh())

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.bilinear, self.head = model, bilinear, nn.Linear(D, CLASSES)

        def forward(self, x):
            return self.head(torch.tanh(self.bilinear(self.first(x), x)))

    x = torch.randn(B, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pair = Pair()
    clipper = _assert_exact(pair, clipping, x)
    assert _rules_of(clipper, bilinear) == [BILINEAR]


# --- nn.MultiheadAttention with bias_k / bias_v and zero attention -------------------------


class Attention(nn.Module):
    def __init__(self, masked: bool = False, **options) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True, **options)
        self.masked = masked

    def forward(self, h):
        # keys masked by the example's own values (bias_k and the zero key stay unmasked)
        mask = (h[:, :, 0] > h[:, :, 1]).detach() if self.masked else None
        return self.attn(h, h, h, key_padding_mask=mask, need_weights=False)[0]


@pytest.mark.parametrize("clipping", STRATEGIES)
@pytest.mark.parametrize(
    "options",
    [
        {"add_bias_kv": True},
        {"add_zero_attn": True},
        {"add_bias_kv": True, "add_zero_attn": True, "masked": True},
    ],
    ids=["bias_kv", "zero_attn", "both-masked"],
)
def test_attention_with_bias_kv_and_zero_attention_takes_its_rules(clipping, options):
    model = Net(Attention(**options))
    clipper = _assert_exact(model, clipping)
    rules = _rules_of(clipper, model.inner.attn)
    assert rules.count(BROADCAST) == (2 if options.get("add_bias_kv") else 0)
    assert rules.count(LINEAR) == 2  # the packed q/k/v projection and the output projection
    assert len(rules) == rules.count(BROADCAST) + rules.count(LINEAR)


# --- all of them through make_private with accumulation ---------------------------------


class Everything(nn.Module):
    """conv1d data [B, 3, 12]: PReLU per channel, a projection, a class token and position
    embeddings of the model itself, attention with bias_k / bias_v and zero attention, a
    bilinear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.prelu = nn.PReLU(3, init=0.2)
        self.proj = nn.Linear(3, D)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.position_embeddings = nn.Parameter(torch.randn(1, 13, D))
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True, add_bias_kv=True, add_zero_attn=True)
        self.bilinear = nn.Bilinear(D, D, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        h = self.proj(self.prelu(x).transpose(1, 2))
        h = torch.cat((self.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
        h = h + self.position_embeddings
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.tanh(self.bilinear(h, torch.tanh(h)))[:, 0])


@pytest.mark.parametrize("style", [1, 2])
def test_accumulated_update_equals_the_clipped_per_example_update(style):
    torch.manual_seed(0)
    run = make_run("conv1d", model=Everything().double(), batch_size=4, accumulation_steps=2)
    before = run.params()
    micro = [(run.x[i * 4:(i + 1) * 4], run.y[i * 4:(i + 1) * 4]) for i in range(2)]
    train_logical_batch(run, micro, style)
    expected, _ = run.reference(before, run.x[:8], run.y[:8], run.optimizer.max_grad_norm, 8)
    for name, p in run.model.named_parameters():
        update = before[name] - p.detach()
        torch.testing.assert_close(update, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    plan = run.engine.clipping_plan()
    assert plan.slow_layers() == ()
    rules = {lp.layer: lp.rule for lp in plan.layers}
    assert rules["<root>"] == "broadcast" and rules["prelu"] == "prelu"
    assert rules["bilinear"] == "bilinear" and "broadcast" in rules["attn"]


class _PositionsOnly(nn.Module):
    """The only trainable layer: an embedding on position ids made without the batch and
    expanded to it (a lookup resolved after the backward)."""

    def __init__(self, t: int = 5, d: int = 8, v: int = 11) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d).requires_grad_(False)
        self.pos = nn.Embedding(t, d)
        self.head = nn.Linear(d, v).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)
        return self.head(torch.tanh(self.inp(x) + self.pos(ids)))


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_losses_per_token_are_refused_when_only_a_batchless_lookup_trains(memory):
    # also after a correct first micro-batch, whose audit would otherwise catch it
    torch.manual_seed(0)
    model = _PositionsOnly()
    x, y = torch.randn(3, 5, 8), torch.randint(0, 11, (3, 5))
    clipper = PerSampleClipper(model, max_grad_norm=1e-2, clipping="ghost", memory=memory)
    clipper.clipped_sum(F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1))
    logits = model(x)
    with pytest.raises(RuntimeError, match="returned 15 per-sample losses but the model's forward had a batch of 3"):
        clipper.clipped_sum(F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1), reduction="none"))
    clipper.remove()


class _TokensAndPositionsInOneTable(nn.Module):
    """One embedding looked up by batched token ids and by batch-less position ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.emb(torch.arange(ids.shape[1]).unsqueeze(0))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
@pytest.mark.parametrize("ids", ["random", "positions"])
def test_a_table_used_by_batched_and_batchless_lookups_is_clipped_as_one(clipping, ids):
    # the two lookups' per-example gradients add up before the norm: with ids equal to
    # the positions, normed apart they gave ‖g_i‖/√2, and c_i·g_i of norm √2·C
    torch.manual_seed(0)
    model = _TokensAndPositionsInOneTable().double()
    x = torch.randint(0, 20, (4, 8)) if ids == "random" else torch.arange(8).repeat(4, 1)
    y = torch.randint(0, 3, (4,))
    assert_clipped_sum_matches_reference(model, x, y, clipping, rtol=1e-9, atol=1e-12)


class _SliceMeetsPositions(nn.Module):
    """Position embeddings [1, T, D] added to the whole batch and to example 0's slice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(D, CLASSES)
        self.first_shape: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pos(torch.arange(x.shape[1]))[None]  # [1, T, D], without the batch
        h = self.inp(x)
        self.first_shape = tuple((h[:1] + p).shape)  # one example's slice: [1, T, D]
        return self.head(torch.tanh(h + p).mean(1))


def test_a_batchless_lookup_meeting_one_examples_slice_leaves_its_shape():
    # dpclip expanded the position embeddings over the batch there too, so that h[:1] + p
    # came out [B, T, D]: the model computed something else under dpclip (a sum over it B times)
    model = _SliceMeetsPositions()
    clipper = _assert_exact(model, "auto")
    assert model.first_shape == (1, T, D)
    clipper.remove()
