"""An engine run against a one-example-at-a-time reference, for layers that take
several inputs per example (token ids and bag lengths, sequences): σ = 0, k = 2
micro-batches of B examples in order (no Poisson sampling), one logical batch."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpclip

K = 2


def reference_update(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor,
                     max_grad_norm: float, logical_batch: float):
    """({name: Σ_i min(1, C/‖g_i‖) g_i / L}, norms ‖g_i‖): g_i from a forward and backward
    of example i alone, with plain autograd, on a copy of ``model``."""
    model = copy.deepcopy(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for _, p in named]
    norms = []
    for i in range(labels.shape[0]):
        loss = F.cross_entropy(model(*(x[i : i + 1] for x in inputs)), labels[i : i + 1])
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        for t, g in zip(total, grads):
            t.add_(torch.clamp(max_grad_norm / norm, max=1.0) * g)
        norms.append(norm)
    return {n: t / logical_batch for (n, _), t in zip(named, total)}, torch.stack(norms)


def relative_error(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor,
                   style: int, batch_size: int, clipping: str = "auto") -> float:
    """‖update − reference‖ / ‖reference‖ after one logical batch of K micro-batches, loop
    style 1 (step/zero_grad every micro-batch) or 2 (every K), C = the median norm."""
    _, norms = reference_update(model, inputs, labels, 1.0, 1.0)
    max_grad_norm = float(norms.median())
    expected, _ = reference_update(model, inputs, labels, max_grad_norm, K * batch_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(*inputs, labels), batch_size=batch_size),
        noise_multiplier=0.0, max_grad_norm=max_grad_norm, accumulation_steps=K,
        poisson_sampling=False, clipping=clipping,
        noise_generator=torch.Generator().manual_seed(1),
        sample_generator=torch.Generator().manual_seed(2),
    )
    for i, (*xs, y) in enumerate(loader):
        criterion(model(*xs), y).backward()
        if style == 1 or (i + 1) % K == 0:
            optimizer.step()
            optimizer.zero_grad()
        if i + 1 == K:
            break
    assert engine.steps == 1
    params = dict(model.named_parameters())
    diff = sum((before[n] - params[n].detach() - e).pow(2).sum() for n, e in expected.items())
    size = sum(e.pow(2).sum() for e in expected.values())
    assert size > 0
    return float(torch.sqrt(diff / size))
