"""A small private MLP run for the report, budget, CLI and logging tests."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from tests.dpclip.models import MLP, make_data


def private_mlp(
    *,
    n: int = 80,
    batch_size: int = 8,
    accountant: str = "rdp",
    noise_multiplier: float = 1.0,
    seed: int = 0,
    **make_private_kwargs,
):
    """(engine, model, optimizer, criterion, loader) for an MLP on n random examples."""
    gen = torch.Generator().manual_seed(seed)
    x, y = make_data("mlp", n, gen, torch.float64)
    torch.manual_seed(seed)
    model = MLP().double()
    make_private_kwargs.setdefault("accumulation_steps", 2)
    engine = dpclip.PrivacyEngine(accountant=accountant)
    model, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(seed + 1),
        sample_generator=torch.Generator().manual_seed(seed + 2),
        **make_private_kwargs,
    )
    return engine, model, optimizer, criterion, loader


def train(engine, model, optimizer, criterion, loader, epochs: int = 1) -> None:
    for _ in range(epochs):
        for x, y in loader:
            criterion(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
