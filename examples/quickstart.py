"""Train a small CNN on scikit-learn's digits with DP-SGD and gradient accumulation.

Run: make demo   (or: python examples/quickstart.py)

The digits data ships inside scikit-learn: nothing is downloaded. The loader's
batch size is the micro-batch (B = 16); accumulation_steps = 4 makes the
expected logical batch L = 64, sampled by Poisson sampling at q = L/N. The
run is capped at ε = 8 (δ = 1e-5); it ends by printing the privacy report
and writing its plot to build/privacy_report.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

import dpclip

DELTA = 1e-5
EPOCHS = 15
MAX_EPSILON = 8.0
PLOT = Path("build/privacy_report.png")


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.GroupNorm(4, 32),
            nn.Tanh(),
            nn.AvgPool2d(2),
        )
        self.head = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=16)

    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    engine = dpclip.PrivacyEngine(accountant="prv")
    model, optimizer, criterion, train_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        data_loader=train_loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accumulation_steps=4,
        noise_generator=torch.Generator().manual_seed(1),
        sample_generator=torch.Generator().manual_seed(2),
        max_epsilon=MAX_EPSILON,
        target_delta=DELTA,
    )
    plan = engine.plan
    print(
        f"N={plan.dataset_size}  micro-batch B={plan.micro_batch_size}  "
        f"k={plan.accumulation_steps}  logical batch L={plan.logical_batch_size}  "
        f"q={plan.sample_rate:.4f}  steps/epoch={plan.steps_per_epoch}  "
        f"sigma={engine.noise_multiplier}  C={engine.max_grad_norm}"
    )

    start = time.perf_counter()
    for epoch in range(1, EPOCHS + 1):
        model.train()
        bar = dpclip.progress(train_loader, engine, delta=DELTA, desc=f"epoch {epoch:2d}",
                              leave=False, file=sys.stdout, disable=not sys.stdout.isatty())
        for x_micro, y_micro in bar:
            loss = criterion(model(x_micro), y_micro)
            loss.backward()
            optimizer.step()  # applies once per logical batch, skips in between
            optimizer.zero_grad()
        if epoch % 5 == 0 or epoch == EPOCHS:
            print(
                f"epoch {epoch:2d}  test accuracy {accuracy(model, x_test, y_test):.3f}  "
                f"epsilon {engine.get_epsilon(DELTA):.3f}  (delta={DELTA}, steps={engine.steps})"
            )
    print(f"trained in {time.perf_counter() - start:.1f} s")
    print(f"final: test accuracy {accuracy(model, x_test, y_test):.3f}\n")
    report = engine.report(DELTA)
    print(report)
    PLOT.parent.mkdir(exist_ok=True)
    report.plot(str(PLOT))
    print(f"plot of epsilon versus step: {PLOT}")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


if __name__ == "__main__":
    main()
