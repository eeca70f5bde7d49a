"""A user's training script with checkpoints, run in its own process by the resume tests.

    python -m tests.dpclip.resume_run CONFIG_JSON

CONFIG: {"sampling": "poisson" | "shuffled", "style": 1 | 2, "batching": "k" | "max_physical",
"steps": T, "save_at": s or null, "checkpoint": path, "resume": bool, "out": path,
"checkpoint_every_step": bool}. It trains until the engine has taken T steps, saving a
checkpoint (model, optimizer, engine, torch's global RNG) after step s (or after every
step, written atomically), and, with "resume", starts from the checkpoint instead.
"out" gets the final parameters, the ledger and ε. The generators are seeded the same
way in every process, as a user's script does: resuming must not replay their draws.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip


def build(config):
    torch.manual_seed(0)
    n = 48
    x = torch.randn(n, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    shuffled = config["sampling"] == "shuffled"
    loader = DataLoader(TensorDataset(x, y), batch_size=12 if config["batching"] == "max_physical" else 4,
                        shuffle=shuffled)
    engine = dpclip.PrivacyEngine(accountant="rdp")
    batching = ({"max_physical_batch_size": 5} if config["batching"] == "max_physical"
                else {"accumulation_steps": 3})
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=0.5, poisson_sampling=not shuffled,
        noise_generator=torch.Generator().manual_seed(1),
        sample_generator=torch.Generator().manual_seed(2),
        **batching,
    )
    return engine, model, optimizer, criterion, loader


def save(path, engine, model, optimizer):
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "privacy_engine": engine.state_dict(),
        "torch_rng": torch.random.get_rng_state(),
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a kill never leaves half a checkpoint


def main(config):
    engine, model, optimizer, criterion, loader = build(config)
    if config["resume"]:
        state = torch.load(config["checkpoint"], weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state["privacy_engine"])
        torch.random.set_rng_state(state["torch_rng"])
    total = config["steps"]
    while engine.steps < total:
        for i, (xb, yb) in enumerate(loader):
            if len(yb) == 0:
                optimizer.add_empty_micro_batch()
            else:
                criterion(model(xb), yb).backward()
            before = engine.steps
            if config["style"] == 1:
                optimizer.step()
                optimizer.zero_grad()
            elif (i + 1) % 3 == 0 or i + 1 == len(loader):  # style 2 needs a fixed k (= 3)
                optimizer.step()
                optimizer.zero_grad()
            if engine.steps > before:
                if config.get("checkpoint_every_step") or engine.steps == config.get("save_at"):
                    save(config["checkpoint"], engine, model, optimizer)
                    if config.get("pause"):  # lets the kill test stop it at a random step
                        time.sleep(config["pause"])
                if engine.steps == config.get("save_at") and not config["resume"]:
                    return  # the first process ends here
                if engine.steps == total:
                    break
    out = {
        "params": {k: v.tolist() for k, v in model.state_dict().items()},
        "ledger": engine.ledger.state_dict(),
        "epsilon": engine.get_epsilon(1e-5, no_amplification=config["sampling"] == "shuffled"),
        "adam_steps": [int(s["step"]) for s in optimizer.state_dict()["state"].values()],
    }
    with open(config["out"], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
