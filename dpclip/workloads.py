"""Built-in workloads for ``dpclip compare`` and the benchmarks: model, generated data, loss.

Nothing is downloaded: the data are random tensors drawn from a fixed seed.
Sizes follow the performance issue: an MLP 784-512-256-10, a small CNN, and a
2-layer transformer (d = 128, sequence 64) built from ``nn.TransformerEncoderLayer``
as is (``nn.MultiheadAttention`` inside).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

__all__ = ["WORKLOADS", "Workload", "load_workload"]


@dataclass
class Workload:
    """What ``dpclip.compare.run`` trains: a model factory, a dataset, a loss module."""

    model_fn: Callable[[], nn.Module]
    dataset: Dataset
    criterion: nn.Module


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (784, 512, 256, 10)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two conv blocks on 1×28×28 images (GroupNorm: BatchNorm mixes examples)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.GroupNorm(4, 32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class Transformer(nn.Module):
    """Token and learned position embeddings (``nn.Embedding`` each, as GPT-2 / BERT),
    2 ``nn.TransformerEncoderLayer``, mean-pool head."""

    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, layers: int = 2, seq: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.head = nn.Linear(d, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # contiguous: Opacus's embedding rule views its input
        positions = torch.arange(tokens.shape[1], device=tokens.device).repeat(tokens.shape[0], 1)
        h = self.emb(tokens) + self.pos(positions)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def _data(kind: str, n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(n, 784, generator=gen)
        return TensorDataset(x, torch.randint(0, 10, (n,), generator=gen))
    if kind == "cnn":
        x = torch.randn(n, 1, 28, 28, generator=gen)
        return TensorDataset(x, torch.randint(0, 10, (n,), generator=gen))
    tokens = torch.randint(0, 1000, (n, 64), generator=gen)
    return TensorDataset(tokens, torch.randint(0, 2, (n,), generator=gen))


def mlp(n: int = 4096, seed: int = 0) -> Workload:
    return Workload(MLP, _data("mlp", n, seed), nn.CrossEntropyLoss())


def cnn(n: int = 4096, seed: int = 0) -> Workload:
    return Workload(CNN, _data("cnn", n, seed), nn.CrossEntropyLoss())


def transformer(n: int = 4096, seed: int = 0) -> Workload:
    return Workload(Transformer, _data("transformer", n, seed), nn.CrossEntropyLoss())


def tiny(n: int = 96, seed: int = 0) -> Workload:
    """A few-second workload for tests: MLP 20-16-3."""
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 20, generator=gen), torch.randint(0, 3, (n,), generator=gen))
    return Workload(_tiny_model, data, nn.CrossEntropyLoss())


def _tiny_model() -> nn.Module:
    return MLP((20, 16, 3))


#: Built-in workloads by ``--model`` name.
WORKLOADS: dict[str, Callable[[], Workload]] = {"mlp": mlp, "cnn": cnn, "transformer": transformer, "tiny": tiny}


def load_workload(spec: str) -> Workload:
    """A built-in name ("mlp", "cnn", "transformer", "tiny") or "module:function"
    where ``function()`` returns a ``Workload``."""
    if spec in WORKLOADS:
        return WORKLOADS[spec]()
    module_name, sep, function = spec.partition(":")
    if not sep or not module_name or not function:
        raise ValueError(f"Expected --model to be one of {sorted(WORKLOADS)} or module:function, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load {spec!r}: {err}") from None
    workload = factory()
    if not isinstance(workload, Workload):
        raise ValueError(f"{spec}() must return a dpclip.workloads.Workload, got {type(workload)}")
    return workload
