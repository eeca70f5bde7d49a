"""Set-up shared by the dpclip tests: a model made private on a small dataset."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from tests.dpclip.models import MODELS, make_data, reference_update


class Around(nn.Module):
    """A layer under test in context: proj (Linear d_in -> d) -> inner -> tanh -> mean over
    positions -> head (Linear d -> classes); ``inner`` maps [B, T, d] to [B, T', d]."""

    def __init__(self, inner: nn.Module, d_in: int, d: int, classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        self.inner = inner
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(self.proj(x))).mean(dim=1))


@dataclass
class Run:
    engine: dpclip.PrivacyEngine
    model: nn.Module
    reference_model: nn.Module  # untouched copy, for torch.func references
    optimizer: dpclip.DPOptimizer
    criterion: dpclip.DPCriterion
    loader: DataLoader
    x: torch.Tensor
    y: torch.Tensor

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}

    def reference(self, params, x, y, max_grad_norm, logical_batch):
        return reference_update(self.reference_model, params, x, y, max_grad_norm, logical_batch)


def make_run(
    kind: str = "mlp",
    *,
    n: int = 64,
    batch_size: int = 4,
    accumulation_steps: int | None = 2,
    max_physical_batch_size: int | None = None,
    noise_multiplier: float = 0.0,
    max_grad_norm: float | None = None,
    dtype: torch.dtype = torch.float64,
    optimizer: str = "sgd",
    poisson_sampling: bool = True,
    seed: int = 0,
    model: nn.Module | None = None,
    clipping: str = "auto",
    memory: str = "auto",
) -> Run:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model if model is not None else MODELS[kind]().to(dtype)
    x, y = make_data(kind, n, gen, dtype)
    reference_model = copy.deepcopy(model)
    if max_grad_norm is None:  # clip about half the examples, so clipping binds
        params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
        _, norms = reference_update(reference_model, params0, x, y, 1.0, 1.0)
        max_grad_norm = float(norms.median())
    params = list(model.parameters())
    opt = {
        "sgd": lambda: torch.optim.SGD(params, lr=1.0),
        "adam": lambda: torch.optim.Adam(params, lr=0.01),
        "adamw": lambda: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    }[optimizer]()
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, dp_opt, crit, loader = engine.make_private(
        module=model,
        optimizer=opt,
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        accumulation_steps=accumulation_steps,
        max_physical_batch_size=max_physical_batch_size,
        poisson_sampling=poisson_sampling,
        noise_generator=torch.Generator().manual_seed(seed + 1),
        sample_generator=torch.Generator().manual_seed(seed + 2),
        clipping=clipping,
        memory=memory,
    )
    return Run(engine, model, reference_model, dp_opt, crit, loader, x, y)


def train_logical_batch(run: Run, micro_batches, style: int) -> None:
    """One logical batch in loop style 1 (step/zero_grad every micro-batch) or 2 (every k)."""
    for xb, yb in micro_batches:
        run.criterion(run.model(xb), yb).backward()
        if style == 1:
            run.optimizer.step()
            run.optimizer.zero_grad()
    if style == 2:
        run.optimizer.step()
        run.optimizer.zero_grad()


def assert_clipped_sum_matches_reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clipping: str, rtol: float, atol: float
) -> dpclip.PerSampleClipper:
    """One micro-batch through a fresh clipper at C = the median per-example norm: its
    clipped sum and norms must equal torch.func's (``reference_update``, over the trainable
    parameters); the clipper."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    _, norms = reference_update(model, params, x, y, 1.0, 1.0)
    max_grad_norm = float(norms.median())
    expected, _ = reference_update(model, params, x, y, max_grad_norm, 1.0)
    names = {p: n for n, p in model.named_parameters()}
    for memory in ("low", "auto"):  # every memory mode: the same sums (the last clipper stays)
        clipper = dpclip.PerSampleClipper(model, max_grad_norm, clipping, memory=memory)
        got = clipper.clipped_sum(F.cross_entropy(model(x), y, reduction="none"))
        got = {names[p]: g for p, g in got.items()}
        assert set(got) == set(expected), memory
        for n, e in expected.items():
            torch.testing.assert_close(got[n], e.to(got[n].dtype), rtol=rtol, atol=atol, msg=f"{n} ({memory})")
        torch.testing.assert_close(clipper.last_norms, norms.to(clipper.last_norms.dtype), rtol=rtol, atol=0)
        if memory == "low":
            clipper.remove()
    return clipper
