"""The first-micro-batch self-check (``PerSampleClipper._audit``): it accepts every
correct model, including parameters whose true gradient is 0, and refuses a parameter
used where no record sees it, with a message that names the parameter and the cause."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpclip import PerSampleClipper


class ShiftedKeys(nn.Module):
    """An attention-like score: k_t = W x_t + b for T positions, then softmax over the
    positions, which ignores the constant shift b·q, so ∇b ℓ_i = 0 exactly for every
    example (the key bias of BERT-style attention). ``norm`` normalises one feature, so
    its weight multiplies x̂ = 0 and gets gradient 0 too."""

    def __init__(self) -> None:
        super().__init__()
        self.key = nn.Linear(5, 4)
        self.norm = nn.LayerNorm(1)
        nn.init.ones_(self.norm.bias)
        self.query = nn.Parameter(torch.randn(4))
        self.value = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = torch.softmax(self.key(x) @ self.query, dim=1)  # [B, T]
        values = self.value(x) * self.norm(x[..., :1])  # the norm's output is its bias
        return (attention.unsqueeze(-1) * values).sum(dim=1)


def _zero_gradient_model(dtype: torch.dtype) -> ShiftedKeys:
    """Only the key bias and the one-feature norm's weight train: their true gradient is
    0, so the whole gradient is rounding noise."""
    torch.manual_seed(0)
    model = ShiftedKeys().to(dtype)
    model.requires_grad_(False)
    model.key.bias.requires_grad_(True)
    model.norm.weight.requires_grad_(True)
    return model


@pytest.fixture(params=["fast", "low"])
def memory(request: pytest.FixtureRequest) -> str:
    """Both memory modes: a parameter whose every call takes its norm in the pass is
    checked as the pass gives its whole gradient (in "low" its calls keep nothing)."""
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parameter_whose_true_gradient_is_zero_passes(dtype, memory):
    model = _zero_gradient_model(dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, 5, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (16,), generator=gen)
    clipper = PerSampleClipper(model, 1.0, memory=memory)
    losses = F.cross_entropy(model(x), y, reduction="none")
    full = torch.autograd.grad(losses.sum(), model.key.bias, retain_graph=True)[0]
    assert 0 < float(full.abs().max()) < 1e-4 * float(losses.detach().abs().max())  # rounding only
    sums = clipper.clipped_sum(losses)
    assert clipper._audited
    # the clipped sum of a zero gradient is rounding noise too
    assert float(sums[model.key.bias].abs().max()) < 100 * torch.finfo(dtype).eps * 64 * 16


class SmallUnrecordedUse(nn.Module):
    """A tied weight whose use outside its module (through ``einsum``, an operation dpclip
    has no rule for) contributes little next to another layer's large gradient: the whole
    model's gradient norm must not hide it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.big = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.emb(tokens).mean(1))
        return self.big(x) + torch.einsum("bd,vd->bv", h, self.emb.weight)[:, :3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_unrecorded_use_next_to_a_large_gradient_is_refused(dtype, memory):
    torch.manual_seed(0)
    model = SmallUnrecordedUse().to(dtype)
    tokens = torch.randint(0, 12, (8, 5))
    x = torch.randn(8, 4, dtype=dtype) * 1e9  # ‖∇ big.weight‖ ~ 1e9
    clipper = PerSampleClipper(model, 1.0, memory=memory)
    losses = F.cross_entropy(model(tokens, x), torch.randint(0, 3, (8,)), reduction="none")
    with pytest.raises(RuntimeError) as refused:
        clipper.clipped_sum(losses)
    message = str(refused.value)
    assert "parameter 'emb.weight' (of module 'emb') gets gradient from outside its own " \
        "module's forward" in message
    assert "torch.einsum" in message and "head.weight = emb.weight" in message


class ForeignOnly(nn.Module):
    """A child's weight used only through F.linear: its module is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x) + F.linear(x, self.a.weight)


def test_parameter_of_a_module_never_called_says_nothing_was_recorded(memory):
    model = ForeignOnly().double()
    clipper = PerSampleClipper(model, 1.0, memory=memory)
    losses = F.cross_entropy(model(torch.randn(4, 3, dtype=torch.float64)),
                             torch.tensor([0, 1, 0, 1]), reduction="none")
    with pytest.raises(RuntimeError, match=r"parameter 'a.weight' \(of module 'a'\) gets "
                       "gradient from outside its own module's forward: no forward of its "
                       "module recorded any gradient for it"):
        clipper.clipped_sum(losses)


class InfiniteUnrecordedUse(nn.Module):
    """The recorded call is finite; the weight's other use (outside the module) adds 0 in
    the forward and an infinite gradient in the backward (√ at 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.fc.weight)
        return self.fc(x) + torch.sqrt(h - h.detach())


def test_non_finite_gradient_from_an_unrecorded_use_is_refused_not_skipped(memory):
    model = InfiniteUnrecordedUse().double()
    clipper = PerSampleClipper(model, 1.0, memory=memory)
    x = torch.rand(4, 3, dtype=torch.float64) + 0.5
    losses = F.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]), reduction="none")
    with pytest.raises(RuntimeError, match=r"parameter 'fc.weight' \(of module 'fc'\) has a NaN "
                       "or infinite gradient, although every per-example gradient dpclip "
                       "recorded for it is finite"):
        clipper.clipped_sum(losses)


class Float32Norm(nn.Module):
    """An RMSNorm that computes in float32 whatever the model's dtype, with a weight used
    as (1 + w) (Gemma's), recorded by operation; with ``graph``, as sqrt(1 + w), which no
    rule covers (the graph path)."""

    def __init__(self, width: int, graph: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        scale = 1.0 + self.weight.float()
        return (h * (scale.sqrt() if self.graph else scale)).type_as(x)


@pytest.mark.parametrize("graph", [False, True])
def test_a_float64_model_whose_layers_compute_in_float32_passes(graph, memory):
    # the check's rounding allowance came from the layers' output dtypes (float64), while
    # this norm's gradients are computed in float32: the sums of one gradient in two
    # orders differed by float32 rounding, and a correct float64 Gemma was refused as
    # using the weight where no record sees it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), Float32Norm(16, graph), nn.Tanh(), nn.Linear(16, 3)).double()
    nn.init.uniform_(model[1].weight, 0.0, 1.0)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    clipper = PerSampleClipper(model, 1e6, memory=memory)
    clipped = clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
    whole = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), list(model.parameters()))
    for p, g in zip(model.parameters(), whole):
        torch.testing.assert_close(clipped[p], g, rtol=1e-5, atol=1e-9)


def test_a_small_unrecorded_use_in_a_float64_model_without_float32_layers_is_refused(memory):
    # the float32 rounding allowance is for graph-path modules that may compute inside in
    # float32; a float64 model of rules keeps float64's, which sees a tied use at 1e-5
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.enc(x))
            return self.head(h) + 1e-5 * F.linear(h, self.enc.weight)[:, :3]

    torch.manual_seed(0)
    model = Tied().double()
    clipper = PerSampleClipper(model, 1.0, memory=memory)
    losses = F.cross_entropy(model(torch.randn(8, 4, dtype=torch.float64)), torch.randint(0, 3, (8,)), reduction="none")
    with pytest.raises(RuntimeError, match="'enc.weight'.*gets gradient from outside its own module"):
        clipper.clipped_sum(losses)


class BlockwiseCalls(nn.Module):
    """One Linear run 16 times, each time on its own block of input columns (a lookup per
    field, an input split in parts), plus a small use of its weight that no record sees."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 3, bias=False)
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for j in range(16):
            mask = torch.zeros(64, dtype=x.dtype)
            mask[4 * j:4 * j + 4] = 1
            out = out + self.lin(x * mask)
        return out + self.alpha * F.linear(x, self.lin.weight)


@pytest.mark.parametrize("alpha", [0.0, 0.003])
def test_rounding_scale_of_many_parts_is_not_their_norms_sum(alpha, memory):
    # The check's rounding scale is kept as numbers, not a parameter-sized tensor: the sum
    # of its parts' norms would allow up to √(number of parts) more, and accepted this
    # unrecorded use (difference 0.055, tolerance 0.075); √(sum of their squared norms)
    # never exceeds the norm of their sum (tolerance 0.021)
    torch.manual_seed(0)
    model = BlockwiseCalls(alpha)
    x, y = torch.randn(8, 64), torch.randint(0, 3, (8,))
    clipper = PerSampleClipper(model, 1.0, memory=memory)
    losses = F.cross_entropy(model(x), y, reduction="none")
    if alpha == 0.0:
        clipper.clipped_sum(losses)
    else:
        with pytest.raises(RuntimeError, match="'lin.weight'.*gets gradient from outside its own module"):
            clipper.clipped_sum(losses)


def test_an_infinite_gradient_from_an_unrecorded_use_is_refused_beside_large_finite_parts(memory):
    # contributions of ±5e18 cancel in each example (every recorded per-example gradient is
    # 0); the unrecorded use makes the whole gradient infinite. The sum of the parts' norms
    # overflowed float32 (8e19 squared), which forgave every non-finite element
    class Cancelling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2, bias=False)

        def forward(self, x, xs):
            out = self.fc(x)
            h = F.linear(xs, self.fc.weight)  # adds 0, with an infinite gradient
            return (out[:, 0] - out[:, 1]).sum(1) + torch.sqrt(h - h.detach()).sum(1)

    torch.manual_seed(0)
    model = Cancelling()
    clipper = PerSampleClipper(model, 1.0, memory=memory)
    losses = model(torch.full((4, 2, 2), 5e18), torch.rand(4, 2) + 0.5)
    with pytest.raises(RuntimeError, match="'fc.weight'.*has a NaN or infinite gradient"):
        clipper.clipped_sum(losses)


def test_a_loss_per_token_gets_the_batch_error_not_the_audits(memory):
    # the check as the pass gives each whole gradient must leave a call whose output
    # gradient is not batch-first to the clipper's error after the pass (which names the
    # fix), not refuse its parameter as used where no record sees it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    clipper = PerSampleClipper(model, 1.0, memory=memory)
    x, y = torch.randn(4, 7, 6), torch.randint(0, 3, (4 * 7,))
    with pytest.raises(RuntimeError, match="returned 28 per-sample losses but the model's forward had a batch of 4"):
        clipper.clipped_sum(F.cross_entropy(model(x).reshape(-1, 3), y, reduction="none"))
