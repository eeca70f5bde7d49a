"""Invariant 6: save → load in a new process → continue is bit-exact; noise is never replayed.

The reference is the same script run without interruption; the resumed part always
runs in a fresh Python process, with its generators seeded as the first one's were.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from tests.dpclip import resume_run
from tests.dpclip.helpers import make_run

ROOT = Path(__file__).resolve().parents[2]


def _resume_in_new_process(config, timeout=120):
    subprocess.run(
        [sys.executable, "-m", "tests.dpclip.resume_run", json.dumps(config)],
        cwd=ROOT, check=True, timeout=timeout,
    )


def _read(path):
    return json.loads(Path(path).read_text())


CONFIGS = [
    ("poisson", 1, "k"),
    ("poisson", 2, "k"),
    ("poisson", 1, "max_physical"),
    ("shuffled", 1, "k"),
    ("shuffled", 2, "k"),
    ("shuffled", 1, "max_physical"),
]


@pytest.mark.parametrize("sampling,style,batching", CONFIGS)
def test_resume_in_a_new_process_is_bit_exact(tmp_path, sampling, style, batching):
    base = {"sampling": sampling, "style": style, "batching": batching, "steps": 11,
            "checkpoint": str(tmp_path / "ckpt.pt")}
    resume_run.main({**base, "save_at": None, "resume": False, "out": str(tmp_path / "full.json")})
    resume_run.main({**base, "save_at": 6, "resume": False, "out": str(tmp_path / "unused.json")})
    _resume_in_new_process({**base, "save_at": 6, "resume": True, "out": str(tmp_path / "resumed.json")})
    full, resumed = _read(tmp_path / "full.json"), _read(tmp_path / "resumed.json")
    assert resumed["params"] == full["params"]  # bit-exact: same noise, same batches
    assert resumed["ledger"] == full["ledger"]
    assert resumed["epsilon"] == full["epsilon"]
    assert full["adam_steps"] == [11] * 4  # the optimizer took as many steps as the ledger has


def test_resume_at_the_end_of_a_pass_starts_the_next_pass(tmp_path):
    base = {"sampling": "poisson", "style": 1, "batching": "k", "steps": 9,
            "checkpoint": str(tmp_path / "ckpt.pt")}
    resume_run.main({**base, "save_at": None, "resume": False, "out": str(tmp_path / "full.json")})
    resume_run.main({**base, "save_at": 4, "resume": False, "out": str(tmp_path / "unused.json")})
    _resume_in_new_process({**base, "save_at": 4, "resume": True, "out": str(tmp_path / "resumed.json")})
    assert _read(tmp_path / "resumed.json") == _read(tmp_path / "full.json")


def test_a_run_killed_at_a_random_step_resumes_without_reused_noise(tmp_path):
    base = {"sampling": "poisson", "style": 2, "batching": "k", "steps": 24,
            "checkpoint": str(tmp_path / "ckpt.pt"), "checkpoint_every_step": True}
    resume_run.main({**base, "resume": False, "out": str(tmp_path / "full.json")})
    os.remove(tmp_path / "ckpt.pt")
    kill_after = random.Random(13).randint(3, 18)
    config = {**base, "resume": False, "pause": 0.2, "out": str(tmp_path / "killed.json")}
    proc = subprocess.Popen([sys.executable, "-m", "tests.dpclip.resume_run", json.dumps(config)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (tmp_path / "ckpt.pt").exists():
                saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
                if dpclip.PrivacyEngine and sum(
                    e["count"] for e in saved["privacy_engine"]["ledger"]["entries"]
                ) >= kill_after:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run must be killed mid-training"
    assert not (tmp_path / "killed.json").exists()
    _resume_in_new_process({**base, "resume": True, "out": str(tmp_path / "resumed.json")})
    full, resumed = _read(tmp_path / "full.json"), _read(tmp_path / "resumed.json")
    assert sum(e["count"] for e in resumed["ledger"]["entries"]) == 24
    assert resumed["adam_steps"] == [24] * 4  # ledger steps == optimizer steps
    assert resumed["params"] == full["params"]  # any replayed noise would show here


def test_a_fresh_engine_with_the_same_seeds_does_not_replay_noise_after_loading():
    # The danger the generator state guards against: without it, a resumed run seeded like
    # the first would draw steps 1..n's noise again for steps n+1..2n.
    first = make_run("mlp", noise_multiplier=1.0, seed=5)
    for xb, yb in first.loader:
        first.criterion(first.model(xb), yb).backward()
        first.optimizer.step()
        first.optimizer.zero_grad()
        if first.engine.steps == 2:
            break
    noise_state = first.optimizer.generator.get_state()
    second = make_run("mlp", noise_multiplier=1.0, seed=5)
    second.engine.load_state_dict(first.engine.state_dict())
    assert torch.equal(second.optimizer.generator.get_state(), noise_state)
    fresh = make_run("mlp", noise_multiplier=1.0, seed=5)
    assert not torch.equal(fresh.optimizer.generator.get_state(), noise_state)


def _stepped_run(steps=2, **kwargs):
    run = make_run("mlp", noise_multiplier=1.0, **kwargs)
    for xb, yb in run.loader:
        run.criterion(run.model(xb), yb).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
        if run.engine.steps == steps and run.optimizer.micro_batches_accumulated == 0:
            break
    return run


def test_loading_into_an_engine_that_has_stepped_is_refused_unless_asked():
    old = _stepped_run(steps=2).engine.state_dict()
    later = _stepped_run(steps=5)
    noise = later.optimizer.generator.get_state()
    with pytest.raises(RuntimeError, match="has taken 5 steps, which loading would forget"):
        later.engine.load_state_dict(old)
    assert later.engine.steps == 5 and torch.equal(later.optimizer.generator.get_state(), noise)
    later.engine.load_state_dict(old, replace_steps=True)  # a deliberate rollback
    assert later.engine.steps == 2


def test_state_mid_logical_batch_is_refused():
    run = make_run("mlp", noise_multiplier=1.0, accumulation_steps=2)
    xb, yb = run.x[:4], run.y[:4]
    run.criterion(run.model(xb), yb).backward()
    with pytest.raises(RuntimeError, match="logical batch is in progress"):
        run.engine.state_dict()
    assert "ledger" in run.engine.report(delta=1e-5).to_dict()  # the report still works


def _tamper(state, path, value):
    *keys, last = path
    node = state
    for key in keys:
        node = node[key]
    node[last] = value
    return state


@pytest.mark.parametrize(
    "path,value,match",
    [
        (("ledger", "entries", 0, "params", "sample_rate"), 1e-9, "never records"),
        (("ledger", "entries", 0, "params", "noise_multiplier"), 50.0, "never records"),
        (("plan", "sample_rate"), 1e-9, "differs"),
        (("rng",), None, "no generator states"),
        (("rng", "noise"), "not base64!", "not a saved state"),
        (("rng", "sampling", "consumed"), 5, "consumed=5"),
        (("rng", "sampling", "consumed"), -1, "consumed=-1"),
        (("schema",), "dpclip.engine/1", "cannot be resumed|not resumed"),
    ],
)
def test_loaded_states_are_checked_against_the_run(path, value, match):
    state = _tamper(_stepped_run(steps=2).engine.state_dict(), path, value)
    fresh = make_run("mlp", noise_multiplier=1.0)
    noise = fresh.optimizer.generator.get_state()
    with pytest.raises(ValueError, match=match):
        fresh.engine.load_state_dict(state)
    assert fresh.engine.steps == 0 and torch.equal(fresh.optimizer.generator.get_state(), noise)


def test_shuffled_state_must_agree_with_its_example_uses():
    run = make_run("mlp", noise_multiplier=1.0, poisson_sampling=False)
    for xb, yb in run.loader:
        run.criterion(run.model(xb), yb).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
    state = run.engine.state_dict()
    state["example_uses"] = make_run("mlp", noise_multiplier=1.0, poisson_sampling=False).engine.state_dict()["example_uses"]
    with pytest.raises(ValueError, match="not from one run"):
        make_run("mlp", noise_multiplier=1.0, poisson_sampling=False).engine.load_state_dict(state)


def test_poisson_sampling_draws_only_from_the_loaders_index_set():
    # a train/validation split by SubsetRandomSampler: validation examples are never trained on
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    dataset = TensorDataset(x, y, torch.arange(40))
    train = list(range(0, 40, 2))
    model = nn.Linear(6, 3).double()
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, opt, crit, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(dataset, batch_size=5, sampler=torch.utils.data.SubsetRandomSampler(train)),
        noise_multiplier=1.0, max_grad_norm=1.0, accumulation_steps=2,
        sample_generator=torch.Generator().manual_seed(0),
    )
    assert engine.plan.dataset_size == 20 and engine.plan.sample_rate == 10 / 20  # q over the split
    seen = set()
    for _ in range(20):
        for xb, yb, ib in loader:
            seen |= set(ib.tolist())
    assert seen <= set(train) and len(seen) == 20


@pytest.mark.parametrize(
    "sampler_of",
    [
        lambda d: torch.utils.data.WeightedRandomSampler([1.0] * len(d), len(d)),
        lambda d: torch.utils.data.RandomSampler(d, num_samples=2 * len(d)),
        lambda d: torch.utils.data.SubsetRandomSampler([0, 1, 1, 2]),
    ],
    ids=["weighted", "random-2N", "subset-repeats"],
)
def test_poisson_sampling_refuses_samplers_whose_index_set_it_cannot_read(sampler_of):
    dataset = TensorDataset(torch.randn(20, 6), torch.randint(0, 3, (20,)))
    model = nn.Linear(6, 3)
    with pytest.raises(ValueError, match="(?i)sampler"):
        dpclip.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            criterion=nn.CrossEntropyLoss(),
            data_loader=DataLoader(dataset, batch_size=2, sampler=sampler_of(dataset)),
            noise_multiplier=1.0, max_grad_norm=1.0,
        )
