"""Ghost norms in float32 where an example's position contributions cancel: the rounding
bound must cover the actual error, and the clipper must not underestimate a norm (an
underestimated ‖g_i‖ lets the clipped gradient exceed C). References: per-example
autograd in float64."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dpclip
import dpclip.clipping.clipper as clipper_module
import dpclip.clipping.memory as memory_module
from dpclip.clipping.norms import gram_sq_norm

B, T = 4, 8


def _alternating(scale: float, width: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T, width]: one large vector per example with alternating sign over the
    positions, plus small noise: Σ_t g_t a_tᵀ nearly cancels for a g that varies slowly."""
    sign = torch.tensor([1.0, -1.0]).repeat(T // 2).view(1, T, 1)
    v = scale * torch.randn(B, 1, width, generator=gen) / math.sqrt(width)
    return v * sign + 0.01 * torch.randn(B, T, width, generator=gen)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", ["random", "alternating", "offset"])
@pytest.mark.parametrize("width", [16, 256])
def test_gram_rounding_bound_covers_the_float32_error(case, width, bias):
    gen = torch.Generator().manual_seed(width)
    if case == "random":
        a, g = torch.randn(B, T, width, generator=gen), torch.randn(B, T, width // 2, generator=gen)
    elif case == "alternating":
        a = _alternating(3e3, width, gen)
        g = torch.randn(B, 1, width // 2, generator=gen) + 1e-3 * torch.randn(B, T, width // 2, generator=gen)
    else:  # a large offset common to all positions, gradients that sum to ~0 over them
        a = 1e3 * torch.randn(B, 1, width, generator=gen) + torch.randn(B, T, width, generator=gen)
        g = torch.randn(B, T, width // 2, generator=gen)
        g = g - g.mean(dim=1, keepdim=True)
    norm = gram_sq_norm(a, g, bias=bias)
    exact = gram_sq_norm(a.double(), g.double(), bias=bias).sq
    error = (norm.sq.double() - exact).abs()
    bound = norm.unit * norm.scale.double()
    assert (error <= bound).all(), (error / bound).max()
    if case != "random":  # the float32 norm is not just rounding-noisy here: the test bites
        assert (error / exact).max() > 1e-4


class Pool(nn.Module):
    """A trainable layer on [B, T, ·] inputs, mean-pooled to logits."""

    def __init__(self, layer: nn.Module, width: int, classes: int = 5) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(width, classes)
        self.head.requires_grad_(False)

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        h = self.layer(*x)
        if isinstance(self.layer, nn.Conv1d):
            h = h.transpose(1, 2)
        return self.head(h.mean(dim=1))


def _case(kind: str, gen: torch.Generator) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    if kind == "linear":
        return Pool(nn.Linear(32, 16), 16), (_alternating(3e3, 32, gen),)
    if kind == "conv":  # kernel 1: the patches are the positions themselves
        return Pool(nn.Conv1d(32, 16, 1), 16), (_alternating(3e3, 32, gen).transpose(1, 2),)
    if kind == "bilinear":
        # (with noise 0.01 the float32 norm was 0.06 % off on one BLAS and over 0.1 % on
        # another: 0.003 cancels enough for a 1 % error, so the test bites on any)
        x2 = torch.randn(B, 1, 4, generator=gen) + 0.003 * torch.randn(B, T, 4, generator=gen)
        return Pool(nn.Bilinear(8, 4, 16), 16), (_alternating(3e3, 8, gen), x2)
    # an embedding whose tokens come in pairs read with opposite signs: each token's
    # gradient nearly cancels, against large per-position gradients
    emb = nn.Embedding(10, 16)

    class Signed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = emb
            self.register_buffer("sign", 1e3 * torch.tensor([1.0, -1.0 + 1e-3]).repeat(T // 2).view(1, T, 1))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.emb(ids) * self.sign

    ids = torch.randint(0, 10, (B, T // 2), generator=gen).repeat_interleave(2, dim=1)
    return Pool(Signed(), 16), (ids,)


def _reference_norms(model: nn.Module, x: tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor:
    m64 = copy.deepcopy(model).double()
    params = [p for p in m64.parameters() if p.requires_grad]
    norms = []
    for i in range(B):
        xi = tuple(t[i:i + 1].double() if t.is_floating_point() else t[i:i + 1] for t in x)
        grads = torch.autograd.grad(F.cross_entropy(m64(*xi), y[i:i + 1]), params)
        norms.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    return torch.stack(norms)


def _norms(model: nn.Module, x: tuple[torch.Tensor, ...], y: torch.Tensor, memory: str) -> torch.Tensor:
    clipper = dpclip.PerSampleClipper(model, max_grad_norm=1e-3, clipping="ghost", memory=memory)
    try:
        clipper.clipped_sum(F.cross_entropy(model(*x), y, reduction="none"))
        return clipper.last_norms.double()
    finally:
        clipper.remove()


@pytest.mark.parametrize("kind", ["linear", "conv", "bilinear", "embedding"])
def test_ghost_norms_of_cancelling_contributions_are_not_underestimated(kind, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    model, x = _case(kind, gen)
    y = torch.randint(0, 5, (B,), generator=gen)
    reference = _reference_norms(model, x, y)
    # "fast" looks at each example's total after the pass; "low" at each layer before it
    # releases the layer's tensors: either way the flagged norms are computed in float64
    for memory in ("fast", "low"):
        torch.testing.assert_close(_norms(model, x, y, memory), reference, rtol=1e-4, atol=0, msg=memory)
    # without the second look the float32 norms are off: the cases cancel enough to matter
    monkeypatch.setattr(clipper_module, "GHOST_ROUNDING_TOLERANCE", math.inf)
    monkeypatch.setattr(memory_module, "GHOST_ROUNDING_TOLERANCE", math.inf)
    for memory in ("fast", "low"):
        off = (_norms(model, x, y, memory) - reference).abs() / reference
        assert off.max() > 1e-3, memory


def test_matmul_precision_settings_widen_the_bound():
    # in a fresh process: torch refuses reads after mixing its legacy and new settings
    code = """
import torch
from dpclip.clipping.norms import gram_unit, matmul_eps
cpu, cuda = torch.device("cpu"), torch.device("cuda")
assert matmul_eps(torch.float32, cpu) == torch.finfo(torch.float32).eps
torch.set_float32_matmul_precision("high")  # TF32 where there is any: not on a CPU
assert matmul_eps(torch.float32, cpu) == torch.finfo(torch.float32).eps
torch.set_float32_matmul_precision("highest")
assert matmul_eps(torch.float64, cuda) == torch.finfo(torch.float64).eps
ieee = gram_unit(torch.float32, cuda, 8, 16, 16)
torch.backends.cuda.matmul.fp32_precision = "tf32"
assert matmul_eps(torch.float32, cuda) == 2.0 ** -10
assert gram_unit(torch.float32, cuda, 8, 16, 16) == ieee  # cached until the clipper clears it
gram_unit.cache_clear()
assert gram_unit(torch.float32, cuda, 8, 16, 16) == ieee * 2.0 ** -10 / torch.finfo(torch.float32).eps
torch.backends.mkldnn.matmul.fp32_precision = "bf16"
assert matmul_eps(torch.float32, cpu) == 2.0 ** -7
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
