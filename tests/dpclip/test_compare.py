"""dpclip.compare on a tiny model: the same update as Opacus hooks + BMM, the broken naive
accumulation shows, ε agrees, the JSON schema holds, and the CLI runs end to end."""

from __future__ import annotations

import json
import mmap
import math
import subprocess
import sys
import time

import pytest
import torch

from dpclip import compare
from dpclip.workloads import tiny


@pytest.fixture(scope="module")
def result():
    w = tiny()
    return compare.run(
        w.model_fn, w.dataset, w.criterion, logical_batch=16, micro_batch=4, steps=3,
        noise_multiplier=1.0, max_grad_norm=0.5, isolate=False,
    )


def test_same_update_as_opacus_hooks_bmm_and_the_naive_accumulation_is_off(result):
    assert [r.method for r in result.rows] == list(compare.DEFAULT_METHODS)
    assert result.row("dpclip").max_abs_update_diff <= 1e-6
    assert result.row("opacus-hooks-bmm").max_abs_update_diff <= 1e-6
    assert result.row("opacus-ghost-bmm").max_abs_update_diff <= 1e-6
    assert result.row("opacus-ghost-accumulate").max_abs_update_diff > 1e-3
    assert result.row("nonprivate").max_abs_update_diff is None


def test_epsilon_of_dpclip_equals_opacus_bmm_for_the_same_run(result):
    dp = result.row("dpclip").epsilon
    for method in ("opacus-hooks-bmm", "opacus-ghost-bmm"):
        # The same steps at the same q; Opacus's RDP orders differ slightly from dp-accounting's.
        assert result.row(method).epsilon == pytest.approx(dp, rel=2e-3)
    assert result.row("opacus-ghost-accumulate").epsilon < dp  # it records q = B/N: under-counts
    assert math.isinf(result.row("nonprivate").epsilon)
    assert all(r.steps == 4 for r in result.rows)  # warm-up + timed


def test_json_schema(result):
    data = json.loads(result.to_json())
    assert data["schema"] == compare.COMPARE_SCHEMA
    assert set(data) == {"schema", "config", "environment", "rows"}
    expected = {"method", "max_abs_update_diff", "epsilon", "steps", "step_time_s", "step_time_min_s",
                "step_time_max_s", "peak_memory_mb", "time_ratio", "memory_ratio", "note"}
    for row in data["rows"]:
        assert set(row) == expected
    assert data["rows"][0]["time_ratio"] == 1.0
    assert data["config"]["logical_batch"] == 16 and data["environment"]["torch"]


def test_bad_arguments_are_named():
    w = tiny()
    with pytest.raises(ValueError, match="methods"):
        compare.run(w.model_fn, w.dataset, w.criterion, logical_batch=16, micro_batch=4, steps=1,
                    noise_multiplier=1.0, max_grad_norm=1.0, methods=["opacus-magic"])
    with pytest.raises(ValueError, match="micro_batch"):
        compare.run(w.model_fn, w.dataset, w.criterion, logical_batch=16, micro_batch=0, steps=1,
                    noise_multiplier=1.0, max_grad_norm=1.0)


def test_a_dataset_of_more_than_pairs_is_named_with_the_fix():
    # (categories, continuous, y): "too many values to unpack" from inside a run
    w = tiny()
    triples = torch.utils.data.TensorDataset(*w.dataset.tensors[:1], *w.dataset.tensors)
    with pytest.raises(ValueError, match=r"gives a tuple of 3 per example; compare takes \(x, y\) pairs"):
        compare.run(w.model_fn, triples, w.criterion, logical_batch=16, micro_batch=4, steps=1,
                    noise_multiplier=1.0, max_grad_norm=1.0)


def test_isolated_runs_need_a_picklable_model_factory():
    w = tiny()
    with pytest.raises(ValueError, match="picklable"):
        compare.run(lambda: w.model_fn(), w.dataset, w.criterion, logical_batch=16, micro_batch=4,
                    steps=1, noise_multiplier=1.0, max_grad_norm=1.0)


def test_cli_runs_end_to_end_with_each_method_in_its_own_process(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dpclip", "compare", "--model", "tiny", "--logical-batch", "16",
         "--micro-batch", "4", "--steps", "2", "--methods", "nonprivate,dpclip", "--json",
         str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("| method |")
    data = json.loads((tmp_path / "c.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["nonprivate", "dpclip"]
    assert data["rows"][1]["max_abs_update_diff"] <= 1e-6
    assert data["config"]["isolate"] is True
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_per_example_reference_and_cpu_clock():
    w = tiny()
    result = compare.run(
        w.model_fn, w.dataset, w.criterion, logical_batch=16, micro_batch=4, steps=2, noise_multiplier=1.0,
        max_grad_norm=0.5, methods=["nonprivate", "dpclip", "opacus-ghost-accumulate"], clock="cpu",
        reference="per-example", threads=1, isolate=False,
    )
    assert result.row("dpclip").max_abs_update_diff <= 1e-6
    assert result.row("opacus-ghost-accumulate").max_abs_update_diff > 1e-3
    assert all(r.step_time_s > 0 for r in result.rows)
    assert result.config["clock"] == "cpu" and result.config["reference"] == "per-example"
    unchecked = compare.run(w.model_fn, w.dataset, w.criterion, logical_batch=16, micro_batch=4, steps=1,
                            noise_multiplier=1.0, max_grad_norm=0.5, methods=["dpclip"], reference=None,
                            isolate=False)
    assert unchecked.row("dpclip").max_abs_update_diff is None


def test_bad_clock_and_reference_are_named():
    w = tiny()
    common = dict(logical_batch=16, micro_batch=4, steps=1, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="clock"):
        compare.run(w.model_fn, w.dataset, w.criterion, clock="gpu", **common)
    with pytest.raises(ValueError, match="reference"):
        compare.run(w.model_fn, w.dataset, w.criterion, reference="vmap", **common)


def test_peak_memory_sees_a_transient_allocation():
    # fresh pages from the kernel: a malloc'd block may reuse memory the process already
    # holds (after the rest of the suite, a 64 MiB torch tensor did not move the RSS)
    size = 64 * 2**20
    with compare._PeakMemory(torch.device("cpu")) as memory:
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1  # touched: resident
        block.close()
    assert 60 <= memory.peak_mb <= 80


def test_refusal_names_the_error_of_a_method_that_cannot_train():
    w = tiny()
    assert compare.refusal(w.model_fn, "dpclip", w.dataset, w.criterion, logical_batch=16, micro_batch=4) is None
    refused = compare.refusal(_frozen, "opacus-ghost-bmm", w.dataset, w.criterion, logical_batch=16, micro_batch=4)
    assert refused is not None and refused.split(":")[0].endswith("Error")


def _frozen():
    model = tiny().model_fn()
    model.requires_grad_(False)
    return model


def test_time_ratio_pairs_steps_so_that_the_machine_drift_cancels(monkeypatch):
    # a machine that gets slower with every step: the non-private run, then the other
    # method's run, give a ratio far above the true 2; paired steps give about 2
    taken = []

    def busy(seconds: float) -> None:
        end = time.process_time() + seconds * (1 + 0.2 * len(taken))
        taken.append(seconds)
        while time.process_time() < end:
            pass

    def setup(method, model, criterion, dataset, cfg, sigma, lr):
        cost = {"nonprivate": 0.004, "dpclip": 0.008}[method]

        def train(batches):
            for _ in batches:
                busy(cost)
                yield

        return train, lambda: 1.0, model, ""

    monkeypatch.setattr(compare, "_setup", setup)
    w = tiny()
    result = compare.run(
        w.model_fn, w.dataset, w.criterion, logical_batch=16, micro_batch=4, steps=3, warmup=1,
        noise_multiplier=1.0, max_grad_norm=1.0, methods=["nonprivate", "dpclip"], isolate=False,
        clock="cpu", reference=None,
    )
    dp, base = result.row("dpclip"), result.row("nonprivate")
    assert dp.step_time_s / base.step_time_s > 2.5  # what separate runs say
    assert 1.8 <= dp.time_ratio <= 2.3 and base.time_ratio == 1.0
