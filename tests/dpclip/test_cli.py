"""The command line, run as a subprocess; outputs parsed and recomputed independently."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import dpclip
from tests.accounting import oracle
from tests.dpclip.private_run import private_mlp, train


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dpclip", *map(str, args)], capture_output=True, text=True)


def test_every_command_has_help():
    for cmd in ("report", "calibrate", "budget", "epsilon"):
        out = _cli(cmd, "--help")
        assert out.returncode == 0 and "--json" in out.stdout


def test_calibrate_from_batch_sizes_and_epochs_meets_the_target():
    out = _cli("calibrate", "--target-epsilon", 3, "--delta", 1e-5, "--dataset-size", 1000,
               "--batch-size", 16, "--accumulation-steps", 4, "--epochs", 5, "--accountant", "rdp", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    q, steps = 64 / 1000, 5 * (1000 // 64)  # dpclip's sampler: N // L steps per epoch
    sigma = result["noise_multiplier"]
    assert oracle.rdp_epsilon(q, sigma, steps, 1e-5) <= 3.0 < oracle.rdp_epsilon(q, sigma * 0.99, steps, 1e-5)
    assert set(result["epsilon"]) == {"rdp", "prv", "pld", "gdp"}
    assert result["epsilon"]["rdp"] == pytest.approx(oracle.rdp_epsilon(q, sigma, steps, 1e-5), rel=1e-9)
    assert result["epsilon"]["pld"] == pytest.approx(oracle.pld_epsilon(q, sigma, steps, 1e-5), rel=1e-6)


def test_calibrate_text_labels_the_approximation():
    out = _cli("calibrate", "--target-epsilon", 2, "--delta", 1e-5, "--sample-rate", 0.01, "--steps", 500)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("noise_multiplier ")
    assert "epsilon[gdp]" in out.stdout and "approximation, not a bound" in out.stdout


def test_budget_is_the_most_steps_within_epsilon():
    out = _cli("budget", "--epsilon", 2, "--delta", 1e-5, "--sample-rate", 0.02, "--noise-multiplier", 1.1,
               "--accountant", "rdp", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    steps = result["steps"]
    assert oracle.rdp_epsilon(0.02, 1.1, steps, 1e-5) <= 2.0 < oracle.rdp_epsilon(0.02, 1.1, steps + 1, 1e-5)
    assert result["epsilon"] == pytest.approx(oracle.rdp_epsilon(0.02, 1.1, steps, 1e-5), rel=1e-9)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    engine, *run = private_mlp()
    train(engine, *run)
    folder = tmp_path_factory.mktemp("run")
    (folder / "report.json").write_text(engine.report(1e-5).to_json())
    (folder / "engine.json").write_text(json.dumps(engine.state_dict()))
    (folder / "malformed.json").write_text(json.dumps({"schema": "dpclip.engine/1"}))
    torch.save({"model": run[0].state_dict(), "privacy_engine": engine.state_dict()}, folder / "ckpt.pt")
    return engine, folder


def test_report_of_a_saved_report(saved):
    engine, folder = saved
    out = _cli("report", folder / "report.json", "--json")
    assert out.returncode == 0, out.stderr
    assert dpclip.PrivacyReport.from_dict(json.loads(out.stdout)) == dpclip.PrivacyReport.from_json(
        (folder / "report.json").read_text()
    )
    text = _cli("report", folder / "report.json")
    assert "dpclip privacy report" in text.stdout and "epsilon [rdp]" in text.stdout


@pytest.mark.parametrize("name", ["engine.json", "ckpt.pt"])
def test_report_of_an_engine_checkpoint_recomputes_from_its_ledger(saved, name, tmp_path):
    engine, folder = saved
    plot = tmp_path / "eps.png"
    out = _cli("report", folder / name, "--delta", 1e-6, "--json", "--plot", plot)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["delta"] == 1e-6 and result["steps"] == engine.steps
    for method in ("rdp", "pld", "prv"):
        assert result["epsilon"][method] == pytest.approx(engine.ledger.epsilon(1e-6, method), rel=1e-9)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    markdown = _cli("report", folder / name, "--delta", 1e-6, "--markdown")
    assert markdown.stdout.startswith("| quantity | value |")


@pytest.mark.parametrize(
    "args",
    [
        ("report", "/no/such/file.json"),
        ("report", "{folder}/report.json", "--delta", "1e-6"),
        ("report", "{folder}/engine.json"),  # no --delta and no budget
        ("budget", "--epsilon", "lots", "--delta", "1e-5", "--sample-rate", "0.1", "--noise-multiplier", "1"),
        ("budget", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "3", "--noise-multiplier", "1"),
        ("calibrate", "--target-epsilon", "1e-6", "--delta", "1e-10", "--sample-rate", "1", "--steps", "1000000",
         "--accountant", "rdp"),
        ("calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.1"),  # no length
        ("calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--steps", "10"),  # no rate
        ("frobnicate",),
        ("report", "{folder}/malformed.json", "--delta", "1e-5"),
        ("calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--dataset-size", "1000", "--batch-size", "10",
         "--epochs", "-5"),
        ("calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--epochs", "1e308"),
        ("calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "100",
         "--accountant", "gdp"),
        ("budget", "--epsilon", "1000", "--delta", "1e-5", "--sample-rate", "0.01", "--noise-multiplier", "5"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(saved, args):
    _, folder = saved
    out = _cli(*[a.format(folder=folder) for a in args])
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr and "error:" in out.stderr


def test_json_output_stays_json_when_epsilon_is_infinite():
    out = _cli("epsilon", "--noise-multiplier", 0, "--delta", 1e-5, "--sample-rate", 0.01, "--steps", 10, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["epsilon"] == {"gdp": "inf", "pld": "inf", "prv": "inf", "rdp": "inf"}
