"""Train privately in an accelerate loop: `accelerator.accumulate(model)` and
`accelerator.backward(loss)`, as written for non-private training.

Run: python examples/accelerate_loop.py [--epochs 8]
 or: torchrun --nproc_per_node 2 examples/accelerate_loop.py   (one DP run over 2 processes)
Needs: pip install 'dpclip[accelerate]'

The data is scikit-learn's digits (shipped inside scikit-learn: nothing is downloaded).

The lines that differ from non-private training: the engine and `make_private`
between preparing the model and preparing the optimizer and loader, with
`accumulation_steps` equal to the Accelerator's
`gradient_accumulation_steps` (k = 4; B = 16, so L = 64, Poisson sampling at
q = L/N). `accelerator.backward` divides the loss by k; dpclip takes that as the
mean over the k micro-batches that its division by L already is. The engine is
registered for checkpointing, so `accelerator.save_state` carries the privacy state.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import torch.nn as nn
from accelerate import Accelerator
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

import dpclip

DELTA = 1e-5
K = 4


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
    model = accelerator.prepare(model)  # first: with several processes it is the DDP wrapper
    engine = dpclip.PrivacyEngine()
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x_train, y_train), batch_size=16),
        noise_multiplier=args.noise_multiplier, max_grad_norm=1.0, accumulation_steps=K,
    )
    optimizer, loader = accelerator.prepare(optimizer, loader)
    accelerator.register_for_checkpointing(engine)

    with tempfile.TemporaryDirectory() as checkpoints:
        for epoch in range(args.epochs):
            for xb, yb in loader:
                with accelerator.accumulate(model):
                    loss = criterion(model(xb), yb)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
            accelerator.save_state(checkpoints)  # model, optimizer, RNG and the privacy state
            with torch.no_grad():
                accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
            accelerator.print(f"epoch {epoch + 1}: test accuracy {accuracy:.3f}, "
                  f"ε = {engine.get_epsilon(DELTA):.2f} (δ = {DELTA:g}), {engine.steps} steps")
    accelerator.print()
    accelerator.print(engine.report(delta=DELTA))


if __name__ == "__main__":
    main(sys.argv[1:])
