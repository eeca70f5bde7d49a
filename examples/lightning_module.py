"""Train a LightningModule privately with PyTorch Lightning (dpclip's DPCallback).

Run: python examples/lightning_module.py [--epochs 8]
Needs: pip install 'dpclip[lightning]'

The data is scikit-learn's digits (shipped inside scikit-learn: nothing is downloaded).

The module is written as for non-private training: `training_step` returns the
batch's mean loss, computed with its loss module `self.criterion`. The lines that
differ: the `DPCallback` (σ, C, δ) in the Trainer's callbacks. The Trainer's
`accumulate_grad_batches=4` is k and the loader's batch size is the micro-batch
B = 16: expected logical batch L = 64, Poisson sampling at q = L/N.
"""

from __future__ import annotations

import argparse
import sys

import lightning.pytorch as pl
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from dpclip.integrations.lightning import DPCallback

DELTA = 1e-5


class DigitsClassifier(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        self.criterion = nn.CrossEntropyLoss()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


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
    module = DigitsClassifier(args.lr)
    privacy = DPCallback(noise_multiplier=args.noise_multiplier, max_grad_norm=1.0, target_delta=DELTA)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accumulate_grad_batches=4, callbacks=[privacy], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x_train, y_train), batch_size=16))
    with torch.no_grad():
        accuracy = (module(x_test).argmax(-1) == y_test).float().mean().item()
    engine = privacy.privacy_engine
    print(f"test accuracy {accuracy:.3f}, ε = {engine.get_epsilon(DELTA):.2f} (δ = {DELTA:g}) "
          f"after {engine.steps} steps")
    print()
    print(engine.report(delta=DELTA))


if __name__ == "__main__":
    main(sys.argv[1:])
