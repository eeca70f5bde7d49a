"""The clipping plan (``engine.clipping_plan()``): per layer the rule and strategy its
per-example gradients take and its share of the time, and the warning for layers on the
slow exact graph path."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from tests.dpclip.models import CLASSES, MODELS, GatedMLP, make_data

ATTENTION = "attention projections (linear)"
GRAPH = "exact graph path"


class InstanceNormNet(nn.Module):
    """InstanceNorm with running statistics: a layer only Opacus has a per-sample rule for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.inorm = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inorm(self.conv(x))).mean(dim=-1))


#: (model, data kind, {layer: rule}) — what each layer's type is documented to take
RULES = {
    "mlp": (MODELS["mlp"], "mlp", {"net.0": "linear", "net.2": "linear"}),
    "embedding": (
        MODELS["embedding"], "embedding",
        {"emb": "embedding", "proj": "linear", "norm": "norm", "head": "linear"},
    ),
    "cnn": (MODELS["cnn"], "cnn", {"conv": "conv", "gn": "norm", "fc": "linear"}),
    "conv1d": (MODELS["conv1d"], "conv1d", {"conv": "conv", "norm": "norm", "head": "linear"}),
    "transformer": (
        MODELS["transformer"], "transformer",
        {
            "emb": "embedding", "layer.self_attn": ATTENTION, "layer.linear1": "linear",
            "layer.linear2": "linear", "layer.norm1": "norm", "layer.norm2": "norm",
            "head": "linear",
        },
    ),
    "attention": (
        MODELS["attention"], "attention",
        {
            "emb": "embedding", "self_attn": ATTENTION, "cross": ATTENTION, "triple": ATTENTION,
            "ctx": "linear", "sep": ATTENTION, "head": "linear",
        },
    ),
    "graph": (GatedMLP, "mlp", {"fc1": "linear", "gate": GRAPH, "fc2": "linear"}),
    "opacus": (InstanceNormNet, "conv1d", {"conv": "conv", "inorm": "Opacus fallback", "head": "linear"}),
}


def _micro_batch(kind: str, n: int = 8):
    return make_data(kind, n, torch.Generator().manual_seed(0), torch.float32)


@pytest.mark.parametrize("name", sorted(RULES))
def test_plan_names_each_layers_rule_before_and_after_a_micro_batch(name):
    make, kind, expected = RULES[name]
    torch.manual_seed(0)
    model = make()
    clipper = dpclip.PerSampleClipper(model, 1.0)
    before = clipper.plan()
    assert not before.measured and before.backward_share is None
    assert {lp.layer: lp.rule for lp in before.layers} == expected
    assert all(lp.share is None for lp in before.layers)
    x, y = _micro_batch(kind)
    clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
    after = clipper.plan()
    assert after.measured and after.micro_batches == (1, 1) and after.batch_size == 8
    assert {lp.layer: lp.rule for lp in after.layers} == expected
    shares = [lp.share for lp in after.layers]
    assert all(s is not None and 0 <= s <= 1 for s in shares)
    assert sum(shares) + after.backward_share == pytest.approx(1.0)
    for _ in range(2):  # later micro-batches replace the first (first-call costs) in the sums
        clipper.clipped_sum(F.cross_entropy(model(x[:4]), y[:4], reduction="none"))
    later = clipper.plan()
    assert later.micro_batches == (2, 3) and later.batch_size == 4
    assert {lp.layer: lp.rule for lp in later.layers} == expected
    assert sum(lp.share for lp in later.layers) + later.backward_share == pytest.approx(1.0)


class WideAndLong(nn.Module):
    """Two Linear layers whose shapes make "auto" choose differently: ghost costs
    T²(d+p), per-sample gradients 64·p·d (clipper docstring). 'wide': T=2, d=p=32 →
    ghost; 'long': T=64, d=p=2 → per-sample."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(32, 32)
        self.long = nn.Linear(2, 2)
        self.head = nn.Linear(34, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.wide(x[:, :2, :32]).mean(dim=1)
        b = self.long(x[:, :, 32:34]).mean(dim=1)
        return self.head(torch.cat([a, b], dim=1))


@pytest.mark.parametrize(
    "clipping, expected",
    [
        ("auto", {"wide": "ghost", "long": "per-sample", "head": "ghost"}),
        ("ghost", {"wide": "ghost", "long": "ghost", "head": "ghost"}),
        ("per_sample", {"wide": "per-sample", "long": "per-sample", "head": "per-sample"}),
    ],
)
def test_plan_shows_the_strategy_each_layer_took(clipping, expected):
    torch.manual_seed(0)
    model = WideAndLong()
    clipper = dpclip.PerSampleClipper(model, 1.0, clipping)
    static = {lp.layer: lp.strategy for lp in clipper.plan().layers}
    assert static == ({k: "decided per call" for k in expected} if clipping == "auto" else expected)
    x = torch.randn(4, 64, 34)
    y = torch.randint(0, CLASSES, (4,))
    clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
    assert {lp.layer: lp.strategy for lp in clipper.plan().layers} == expected


def _private(model, kind, n=16, batch_size=4, memory="auto", clipping="auto"):
    x, y = make_data(kind, n, torch.Generator().manual_seed(0), torch.float32)
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accumulation_steps=2,
        poisson_sampling=False,
        memory=memory,
        clipping=clipping,
    )
    return engine, model, optimizer, criterion, loader


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
@pytest.mark.parametrize("memory", ["fast", "low"])
def test_plan_says_what_each_layer_keeps_until_the_clipped_sum(memory, clipping):
    torch.manual_seed(0)
    engine, model, optimizer, criterion, loader = _private(
        MODELS["mlp"](), "mlp", memory=memory, clipping=clipping
    )
    assert {lp.keeps for lp in engine.clipping_plan().layers} == {"-"}  # nothing measured yet
    xb, yb = next(iter(loader))
    criterion(model(xb), yb).backward()
    keeps = {lp.keeps for lp in engine.clipping_plan().layers}
    expected = "nothing" if memory == "low" else (
        "input + output gradient" if clipping == "ghost" else "per-example gradients"
    )
    assert keeps == {expected}
    assert expected in str(engine.clipping_plan())


def _train(model, optimizer, criterion, loader) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for xb, yb in loader:
            criterion(model(xb), yb).backward()
            optimizer.step()
            optimizer.zero_grad()
    return [w for w in caught if issubclass(w.category, dpclip.SlowClippingWarning)]


def test_graph_path_layer_is_named_in_one_warning_with_its_share():
    torch.manual_seed(0)
    engine, *run = _private(GatedMLP(), "mlp")
    slow = _train(*run)
    assert len(slow) == 1  # once, after the first micro-batch, not per micro-batch
    assert "'gate' (SigmoidGate, " in str(slow[0].message)
    assert "exact graph path" in str(slow[0].message)
    assert slow[0].filename == __file__  # the user's backward(), not dpclip's code
    gate = next(lp for lp in engine.clipping_plan().layers if lp.layer == "gate")
    assert gate.rule == GRAPH and gate.share is not None


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_no_warning_when_every_layer_has_a_rule(kind):
    torch.manual_seed(0)
    engine, *run = _private(MODELS[kind](), kind)
    assert _train(*run) == []
    assert engine.clipping_plan().slow_layers() == ()


def test_str_and_to_dict_list_every_trainable_layer():
    torch.manual_seed(0)
    model = MODELS["transformer"]()
    model.layer.norm2.requires_grad_(False)  # frozen: not clipped, not in the plan
    engine, model, optimizer, criterion, loader = _private(model, "transformer")
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    trainable = {"layer.self_attn" if n.startswith("layer.self_attn") else n for n in trainable}
    for measured in (False, True):
        plan = engine.clipping_plan()
        assert plan.measured is measured
        text = str(plan).splitlines()
        rows = {line.split()[0]: line for line in text[3:]}
        assert set(rows) - {"(backward"} == trainable
        assert "(backward" in rows if measured else "(backward" not in rows
        assert rows["layer.self_attn"].split()[1] == "MultiheadAttention"
        # aligned: every row's share ends in the same column
        assert len({len(line) for line in text[1:] if line.endswith("%") or line.endswith("-")}) == 1
        data = json.loads(json.dumps(plan.to_dict()))
        assert {d["layer"] for d in data["layers"]} == trainable
        assert data["micro_batches"] == ([1, 1] if measured else None)
        assert data["memory"] in (("auto: fast", "auto: low") if measured else ("auto",))
        assert f"memory {data['memory']};" in text[0]
        if not measured:
            xb, yb = next(iter(loader))
            criterion(model(xb), yb).backward()


def test_clipping_plan_before_make_private_is_refused():
    with pytest.raises(RuntimeError, match="call make_private first"):
        dpclip.PrivacyEngine().clipping_plan()
