"""DP-SGD with gradient accumulation on several processes: DistributedDataParallel as usual.

Run: torchrun --nproc_per_node 2 examples/ddp.py     (CPU: gloo; on GPUs: nccl)

Every rank builds the same loader over the whole dataset (scikit-learn's digits, shipped
in the package: nothing is downloaded) with the micro-batch B = 16, and the same
sample_generator seed; accumulation_steps = 4. The expected logical batch is
L = world_size · k · B (128 with two processes), one Poisson draw at q = L/N per step
shared out among the ranks; the clipped sums are all-reduced once per step and the noise
is added once. Rank 0 prints the privacy report.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import dpclip

DELTA = 1e-5
EPOCHS = 3
SEED = 2024  # the same on every rank: one global Poisson draw per step


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # replicas may start apart: DistributedDataParallel broadcasts rank 0's
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
    model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    engine = dpclip.PrivacyEngine(accountant="prv")
    model, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=16),  # the same on every rank
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accumulation_steps=4,
        sample_generator=torch.Generator().manual_seed(SEED),
    )
    for epoch in range(EPOCHS):
        for i, (xb, yb) in enumerate(loader):
            loss = criterion(model(xb.to(device)), yb.to(device))
            loss.backward()
            if (i + 1) % 4 == 0:
                optimizer.step()
                optimizer.zero_grad()
        with torch.no_grad():
            accuracy = (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1}: {engine.steps} steps, accuracy {accuracy:.3f}, "
                  f"epsilon {engine.get_epsilon(DELTA):.2f}", flush=True)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    replicas = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(replicas, weights)
    if rank == 0:
        assert all(torch.equal(r, weights) for r in replicas), "replicas differ"
        print(f"{world} processes, logical batch L = {engine.plan.logical_batch_size:g}, "
              "replicas identical")
        print(engine.report(DELTA))
    dist.barrier()  # tear gloo down together: a rank that exits while rank 0 reports can abort
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's worker threads can abort the interpreter's own teardown after a clean run,
    # process group destroyed ("terminate called without an active exception", exit -6:
    # torch's issue, seen here on a loaded 2-core machine): leave without that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
