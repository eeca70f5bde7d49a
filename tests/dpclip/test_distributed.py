"""Two gloo processes training as a DDP user writes it (tests/dpclip/ddp_run.py), checked
here against a per-example reference over both ranks' examples, Google's dp-accounting,
the sampler of one process, and each other."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpclip.sampling import PoissonMicroBatchSampler
from tests.accounting import oracle
from tests.dpclip import ddp_run as run
from tests.dpclip.per_example import reference_update

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
_RUNS: dict[str, tuple] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(case: str, folder: Path) -> tuple[list[int], list[dict | None], list[str]]:
    """(exit codes, results, stderr) of the two ranks of ``case``; cached per case."""
    if case in _RUNS:
        return _RUNS[case]
    folder.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.dpclip.ddp_run", case, str(r), str(WORLD), port, str(folder)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(WORLD)
    ]
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=240)[1])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{case}: a rank hung")
    results = [torch.load(folder / f"rank{r}.pt") if (folder / f"rank{r}.pt").exists() else None
               for r in range(WORLD)]
    _RUNS[case] = ([p.returncode for p in procs], results, errs)
    return _RUNS[case]


def _ok(case: str, tmp_path_factory) -> list[dict]:
    codes, results, errs = launch(case, tmp_path_factory.mktemp(case))
    assert codes == [0] * WORLD, "\n".join(errs)
    return results


def _expected_after(step: dict, others: list[dict], logical_batch: float) -> dict[str, torch.Tensor]:
    """SGD(lr=1) from ``before`` by the clipped mean over every rank's examples of the step."""
    data = run.dataset().tensors
    union = sorted(i for s in [step, *others] for i in s["indices"])
    m = run.model(width=step["before"]["1.weight"].shape[0])
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(step["before"][n])
    idx = torch.tensor(union, dtype=torch.long)
    update, _ = reference_update(m, (data[0][idx],), data[1][idx], 0.5, logical_batch)
    return {n: step["before"][n] - update[n] for n in update}


def _world_one_draws(sample_rate: float, steps: int) -> list[set[int]]:
    """The logical batches one process draws with the same seed: what the ranks' shares must add up to."""
    sampler = PoissonMicroBatchSampler(num_samples=run.N, sample_rate=sample_rate, steps=run.N // round(sample_rate * run.N),
                                       generator=torch.Generator().manual_seed(run.SEED), micro_batches=1)
    return [set(b) for b, _ in zip(sampler, range(steps))]


@pytest.mark.parametrize("case, logical", [
    ("k", WORLD * run.K * run.B), ("bmm", WORLD * run.K * run.B),  # L = world · k · B
    ("max_physical", WORLD * 8),  # world · the loader's batch
    ("sparse", WORLD * 1),
])
def test_every_rank_applies_the_clipped_mean_over_both_ranks_examples(case, logical, tmp_path_factory):
    results = _ok(case, tmp_path_factory)
    q = results[0]["sample_rate"]
    assert results[0]["logical_batch"] == logical and q == logical / run.N
    draws = _world_one_draws(q, run.STEPS)
    for s in range(run.STEPS):
        steps = [r["record"][s] for r in results]
        shares = [set(st["indices"]) for st in steps]
        assert not shares[0] & shares[1]
        assert shares[0] | shares[1] == draws[s]  # one global Poisson draw, split between the ranks
        expected = _expected_after(steps[0], steps[1:], logical)
        for st in steps:
            for n, e in expected.items():
                torch.testing.assert_close(st["after"][n], e, rtol=1e-9, atol=1e-12)
    if case == "sparse":  # a rank with no example in a step still takes the noisy, accounted step
        assert any(not r["record"][s]["indices"] for r in results for s in range(run.STEPS))
    for r in results:
        assert r["steps"] == run.STEPS
        assert r["all_reduces"] == run.STEPS  # one all-reduce of the clipped sums per logical step
        assert r["reducer_calls"] == 0  # DDP's own per-backward all-reduce never ran


def test_noise_is_added_once_over_the_ranks_and_every_rank_reports_the_same_epsilon(tmp_path_factory):
    results = _ok("noise", tmp_path_factory)
    logical, q = results[0]["logical_batch"], results[0]["sample_rate"]
    noise = []
    for s in range(run.STEPS):
        steps = [r["record"][s] for r in results]
        for n in steps[0]["after"]:  # the replicas stay bit-identical
            assert torch.equal(steps[0]["after"][n], steps[1]["after"][n])
        expected = _expected_after(steps[0], steps[1:], logical)
        noise += [(e - steps[0]["after"][n]).reshape(-1) for n, e in expected.items()]
    z = torch.cat(noise) * logical / 0.5  # N(0, σ²) per element, σ = 1, if the noise is σC/L
    n = z.numel()
    ratio = float(z.std())
    tol = 5 / math.sqrt(2 * n)  # five standard errors of a sample std
    assert abs(ratio - 1.0) < tol, (ratio, n)
    assert abs(ratio - math.sqrt(WORLD)) > 10 * tol  # not each rank's own full noise (√2)
    expected_eps = oracle.rdp_epsilon(q, 1.0, run.STEPS, 1e-5)
    for r in results:
        assert r["epsilon"] == pytest.approx(expected_eps, rel=1e-6)
        report = r["report"]
        assert report["processes"] == WORLD and report["logical_batch_size"] == logical
        assert report["epsilon"]["rdp"] == r["epsilon"] and report["steps"] == run.STEPS


def test_a_rank_that_dies_inside_a_logical_batch_stops_the_others_with_a_clear_error(tmp_path_factory):
    codes, results, errs = launch("fail", tmp_path_factory.mktemp("fail"))
    assert codes[1] == 3 and results[1] is None
    assert codes[0] == 0, errs[0]
    survivor = results[0]
    assert "all-reduce of the clipped sums" in survivor["error"] and "No parameter changed" in survivor["error"]
    assert survivor["steps"] == 1
    after_first = _ok("k", tmp_path_factory)[0]["record"][0]["after"]  # the same run, uninterrupted
    for n, p in survivor["params"].items():
        assert torch.equal(p, after_first[n])


def test_ranks_with_different_arguments_all_refuse(tmp_path_factory):
    results = _ok("refuse", tmp_path_factory)
    for r in results:
        assert "differ in sample_generator" in r["seed"]
        assert "differ in data" in r["shard"] and "not a shard of its own" in r["shard"]
    assert "max_grad_norm" in results[1]["bad"]
    assert "make_private failed on rank 1" in results[0]["bad"] and "max_grad_norm" in results[0]["bad"]


def test_a_resumed_run_continues_bit_exactly_on_every_rank(tmp_path_factory):
    results = _ok("resume", tmp_path_factory)
    for r in results:
        assert r["steps"] == 4
        for n, p in r["whole"].items():
            assert torch.equal(r["resumed"][n], p)
    for n, p in results[0]["resumed"].items():
        assert torch.equal(results[1]["resumed"][n], p)


class _Augmented(torch.utils.data.Dataset):
    """Random noise added on each read, as a data augmentation does."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        import random

        import numpy as np

        return {"x": self.x[i] + torch.randn(3), "shift": random.random() + np.random.rand(), "id": i}


def test_the_data_fingerprint_sees_contents_not_the_read_randomness():
    import random

    import numpy as np

    from dpclip.distributed import data_fingerprint

    x = torch.arange(60.0).reshape(20, 3)
    states = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = data_fingerprint(_Augmented(x))
    assert data_fingerprint(_Augmented(x)) == first  # random transforms read alike
    assert torch.equal(torch.random.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()  # the caller's streams are untouched
    assert data_fingerprint(_Augmented(x + 1)) != first
    shards = [torch.utils.data.Subset(_Augmented(x), range(r, 20, 2)) for r in range(2)]
    assert data_fingerprint(shards[0]) != data_fingerprint(shards[1])
    assert data_fingerprint(torch.utils.data.Subset(_Augmented(x), range(20))) == first
