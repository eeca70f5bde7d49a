"""Mixed precision: ``torch.autocast`` (bfloat16, and float16, on CPU) around the forward
and the criterion, on float32 and bfloat16 models, for every rule family and the graph
path; and ``torch.compile``, refused.

What one example adds to the clipped sum is measured in float64 by the test (one example
per micro-batch): its norm is the sensitivity, and must stay within C to float32
rounding. The update is compared with a float32 per-example reference by ``torch.func``
(no autocast), within a tolerance derived from bfloat16's rounding.

CUDA autocast (float16 / bfloat16) takes the same code path (nothing in it is specific to
the CPU) but cannot be run here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from tests.dpclip.models import MODELS, GatedMLP, make_data, reference_update

#: bfloat16 keeps 8 significant bits: each rounding moves a value by up to 2^-9 relative
BF16_EPS = torch.finfo(torch.bfloat16).eps


KINDS = {**MODELS, "graph": GatedMLP}


def _data(kind: str, n: int, seed: int = 0):
    return make_data("mlp" if kind == "graph" else kind, n, torch.Generator().manual_seed(seed), torch.float32)


@pytest.mark.parametrize(
    "model_dtype, autocast_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float16),
    ],
    ids=["float32-autocast-bf16", "bf16-autocast-bf16", "float32-autocast-fp16"],
)
@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_autocast_clipped_contribution_stays_within_max_grad_norm(
    kind, clipping, model_dtype, autocast_dtype
):
    torch.manual_seed(0)
    model = KINDS[kind]().to(model_dtype)
    C = 1e-3  # far below every gradient norm: every example is clipped
    clipper = dpclip.PerSampleClipper(model, C, clipping)
    x, y = _data(kind, 6)
    if x.is_floating_point():
        x = x.to(model_dtype)
    worst = 0.0
    for i in range(6):
        # the backward inside autocast too: clipping must not run its own arithmetic in bfloat16
        with torch.autocast("cpu", dtype=autocast_dtype):
            losses = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="none")
            s = clipper.clipped_sum(losses)
        assert all(v.dtype == torch.float32 for v in s.values())
        norm = torch.sqrt(sum(v.double().pow(2).sum() for v in s.values())).item()
        worst = max(worst, norm / C)
    assert worst <= 1 + 1e-6


def _private(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float):
    engine = dpclip.PrivacyEngine(accountant="rdp")
    return engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        accumulation_steps=2,
        poisson_sampling=False,
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_autocast_update_matches_float32_reference(kind):
    # The user's usual loop: forward and criterion under autocast, backward outside it.
    torch.manual_seed(0)
    model = KINDS[kind]().float()
    x, y = _data(kind, 8)
    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    reference_model = copy.deepcopy(model)
    _, norms = reference_update(reference_model, params0, x, y, 1.0, 1.0)
    C = float(norms.median())  # about half the examples clipped
    expected, _ = reference_update(reference_model, params0, x, y, C, 8.0)
    model, optimizer, criterion, loader = _private(model, x, y, C)
    for xb, yb in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    got = {k: params0[k] - v.detach() for k, v in model.named_parameters()}
    diff = torch.sqrt(sum((got[k] - expected[k]).double().pow(2).sum() for k in got))
    scale = torch.sqrt(sum(v.double().pow(2).sum() for v in expected.values()))
    # Forward and backward round each layer's inputs and outputs to bfloat16 (2^-9
    # relative each); through these few layers it stays within a few of them (measured: 1 to
    # 2 eps), the clipping factors included. A dropped micro-batch, a missed clip or a
    # wrong scale is off by O(1).
    assert float(diff / scale) <= 4 * BF16_EPS


class TiedOutsideItsModule(nn.Module):
    """The embedding's weight also used outside the embedding's forward, through an
    operation dpclip has no rule for (einsum; F.linear would be recorded)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.emb(tokens))).mean(dim=1)
        return torch.einsum("bd,vd->bv", h, self.emb.weight)


def test_autocast_still_refuses_a_weight_used_outside_its_module():
    # the first micro-batch's check allows bfloat16 rounding, not a missing term
    torch.manual_seed(0)
    model = TiedOutsideItsModule()
    clipper = dpclip.PerSampleClipper(model, 1.0)
    tokens = torch.randint(0, 20, (8, 5), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 20, (8,), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = F.cross_entropy(model(tokens), y, reduction="none")
    with pytest.raises(RuntimeError, match="gets gradient from outside its own module"):
        clipper.clipped_sum(losses)


# --- torch.compile: refused, with what to do instead -------------------------------------


def _compiled_root(model):
    return torch.compile(model, backend="aot_eager")


def _compiled_in_place(model):
    model.compile(backend="aot_eager")
    return model


def _compiled_submodule(model):
    model.layer = torch.compile(model.layer, backend="aot_eager")
    return model


def _compiled_forward(model):
    model.layer.forward = torch.compile(model.layer.forward, backend="aot_eager")
    return model


@pytest.mark.parametrize(
    "compile_, where",
    [
        (_compiled_root, r"'<root>' \(OptimizedModule\) is the result of torch.compile"),
        (_compiled_in_place, r"'<root>' \(TinyTransformer\) was compiled in place"),
        (_compiled_submodule, r"'layer' \(OptimizedModule\) is the result of torch.compile"),
        (_compiled_forward, r"'layer' \(TransformerEncoderLayer\) has a forward compiled"),
    ],
)
def test_compiled_model_is_refused_at_make_private(compile_, where):
    torch.manual_seed(0)
    model = MODELS["transformer"]()
    x, y = _data("transformer", 8)
    with pytest.raises(ValueError, match=where + ".*not supported with per-example clipping"):
        _private(compile_(model), x, y, 1.0)
    # nothing was claimed: the uncompiled model (a fresh one here) is accepted
    _private(MODELS["transformer"](), x, y, 1.0)


@pytest.mark.parametrize("part", ["root", "submodule"])
@pytest.mark.parametrize("kind, child", [("mlp", "net"), ("transformer", "layer")])
def test_compiling_after_make_private_is_refused_at_backward(kind, child, part):
    # Compiled after the first (eager, audited) micro-batch: the compiled graph would hide
    # the gradient at the recorded outputs inside it, and the clipped sum would silently
    # miss those parameters (the MLP's first layer). Refused instead, every time; the
    # eager model still trains.
    torch.manual_seed(0)
    model = MODELS[kind]()
    x, y = _data(kind, 8)
    clipper = dpclip.PerSampleClipper(model, 1.0)
    clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
    eager_child = getattr(model, child)
    if part == "root":
        run = torch.compile(model, backend="aot_eager")
    else:
        setattr(model, child, torch.compile(eager_child, backend="aot_eager"))
        run = model
    for _ in range(2):  # the second run replays the compiled code
        losses = F.cross_entropy(run(x), y, reduction="none")
        with pytest.raises(RuntimeError, match="ran under torch.compile after make_private"):
            clipper.clipped_sum(losses)
    setattr(model, child, eager_child)
    s = clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
    assert len(s) == len([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("first", [True, False])
def test_compiling_after_make_private_is_refused_at_the_losses_backward_saying_so(first):
    # through make_private's criterion: the compiled forward records nothing, and its loss's
    # backward() had said the forward "was already used by a backward()" (new-user trial)
    torch.manual_seed(0)
    x, y = _data("mlp", 8)
    model, optimizer, criterion, loader = _private(MODELS["mlp"](), x, y, 1.0)
    batches = iter(loader)
    if not first:  # after an eager micro-batch
        xb, yb = next(batches)
        criterion(model(xb), yb).backward()
    compiled = torch.compile(model, backend="aot_eager")
    xb, yb = next(batches)
    loss = criterion(compiled(xb), yb)
    with pytest.raises(RuntimeError, match="ran under torch.compile after make_private"):
        loss.backward()
    assert optimizer.micro_batches_accumulated == (0 if first else 1)
