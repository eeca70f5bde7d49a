"""DPTrainer under torchrun, DPCallback with Lightning's DDP strategy and an accelerate
loop under torchrun: 2 gloo processes on CPU, launched as their users launch them
(``frameworks_ddp.py``).

The same guarantees as one process: one global Poisson logical batch of expected
size L = W·k·B per step (q = L/N), ranks identical, the noise added once (std σC/L,
not √W·σC/L), ε as dp-accounting at q, bit-exact resume from the framework's
checkpoint. The σ = 0 reference is dpclip's own one-process loop with W·k
micro-batches per step and the same sampling seed: the same draws."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip

pytestmark = pytest.mark.filterwarnings("ignore")

RUN = Path(__file__).with_name("frameworks_ddp.py")
sys.path.insert(0, str(RUN.parent))
import frameworks_ddp as run  # noqa: E402

W = 2


def launch(framework: str, out: Path, sigma: float, steps: int, resume: Path | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    args = [framework, str(out), str(sigma), str(steps)] + ([str(resume)] if resume else [])
    if framework == "lightning":  # Lightning starts the other rank itself
        command = [sys.executable, str(RUN), *args]
    else:
        # --standalone: a free port, not 29500 (another test may hold it under xdist)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(W),
                   str(RUN), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(W)]


def one_process_reference(framework: str) -> dict[str, torch.Tensor]:
    """One step of dpclip's own loop with W·k micro-batches and the same seed, σ = 0."""
    torch.manual_seed(0)
    if framework == "trainer":
        import transformers

        from dpclip.integrations.transformers import PerExampleLoss

        model, criterion = run.bert().double(), PerExampleLoss("single_label")
        loader = DataLoader(run.examples(), batch_size=run.B, collate_fn=transformers.default_data_collator)
    else:
        model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 3)).double()
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(run.N, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (run.N,), generator=gen)
        )
        criterion, loader = nn.CrossEntropyLoss(), DataLoader(data, batch_size=run.B)
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=run.LR), criterion=criterion,
        data_loader=loader, noise_multiplier=0.0, max_grad_norm=run.C, accumulation_steps=W * run.K,
        sample_generator=torch.Generator().manual_seed(7),
    )
    for batch in loader:
        if framework == "trainer":
            labels = batch.pop("labels")
            criterion(model(**batch).logits, labels).backward()
        else:
            x, y = batch
            criterion(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if engine.steps == 1:
            break
    names = [n for n, _ in model.named_parameters()]
    if framework == "lightning":
        names = [f"net.{n}" for n in names]
    return {n: p.detach().clone() for n, (_, p) in zip(names, model.named_parameters())}


def epsilon(steps: int) -> float:
    q = W * run.K * run.B / run.N
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.0)), steps
    )
    return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(run.DELTA)


def assert_ranks_identical(ranks: list[dict]) -> None:
    first = ranks[0]["params"]
    for other in ranks[1:]:
        assert all(torch.equal(first[n], other["params"][n]) for n in first)


@pytest.mark.parametrize("framework", ["trainer", "lightning", "accelerate"])
def test_two_processes_train_one_private_model(framework, tmp_path):
    exact = launch(framework, tmp_path / "exact", 0.0, 1)
    assert [r["world"] for r in exact] == [W, W] and [r["steps"] for r in exact] == [1, 1]
    assert exact[0]["sample_rate"] == W * run.K * run.B / run.N
    assert_ranks_identical(exact)
    reference = one_process_reference(framework)
    scale = max(float(p.abs().max()) for p in reference.values())
    for name, p in reference.items():
        torch.testing.assert_close(exact[0]["params"][name], p, rtol=1e-9, atol=1e-12 * scale, msg=name)

    noisy = launch(framework, tmp_path / "noisy", 1.0, 1)
    assert_ranks_identical(noisy)
    # same draws (sampling seed), so the difference is the noise alone: (σC/L)·lr per element
    noise = torch.cat([(noisy[0]["params"][n] - exact[0]["params"][n]).flatten() for n in reference])
    expected = 1.0 * run.C / (W * run.K * run.B) * run.LR
    ratio = float(noise.std() / expected)
    assert abs(ratio - 1) < 5 / (2 * noise.numel()) ** 0.5, ratio  # √2 if each rank added its own
    assert [r["steps"] for r in noisy] == [1, 1]
    assert noisy[0]["epsilon"] == noisy[1]["epsilon"] == pytest.approx(epsilon(1), rel=1e-6)
    if framework == "trainer":  # logged by rank 0 as by every rank
        assert [e[:2] for e in noisy[0]["logged"]] == [(1, pytest.approx(epsilon(1), rel=1e-6))]


@pytest.mark.parametrize("framework", ["trainer", "lightning", "accelerate"])
def test_two_processes_resume_bit_exactly_from_the_frameworks_checkpoint(framework, tmp_path):
    full = launch(framework, tmp_path / "full", 1.0, 4)
    assert [r["steps"] for r in full] == [4, 4]
    checkpoint = tmp_path / "full" / {"trainer": "checkpoint-2", "lightning": "step=2.ckpt", "accelerate": "state-2"}[framework]
    resumed = launch(framework, tmp_path / "resumed", 1.0, 4, resume=checkpoint)
    assert [r["steps"] for r in resumed] == [4, 4]
    for before, after in zip(full, resumed):
        assert all(torch.equal(before["params"][n], after["params"][n]) for n in before["params"])
        assert after["epsilon"] == before["epsilon"] == pytest.approx(epsilon(4), rel=1e-6)
