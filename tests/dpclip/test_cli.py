"""The command line, run as a subprocess; outputs parsed and recomputed independently."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dpclip
from dpclip.cli import main
from tests.accounting import oracle
from tests.dpclip.private_run import private_mlp, train

#: Only a guard against the hangs and the runaway allocations these commands once had.
GUARD_S = 180


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dpclip", *map(str, args)], capture_output=True, text=True,
                          timeout=GUARD_S)


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
    state = engine.state_dict()
    for name, mutate in (
        ("no_plan.json", lambda s: s.pop("plan")),
        ("wrong_type.json", lambda s: s.update(noise_multiplier="1.0")),
        ("plan_list.json", lambda s: s.update(plan=[1, 2])),
        ("count_huge.json", lambda s: s["ledger"]["entries"][0].update(count=10**30)),
        ("tiny_rate.json", lambda s: s["ledger"]["entries"][0]["params"].update(sample_rate=0.0)),
        ("budget_delta.json", lambda s: s.update(budget={"delta": [1]})),
    ):
        bad = copy.deepcopy(state)
        mutate(bad)
        (folder / name).write_text(json.dumps(bad))
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    report = json.loads(engine.report(1e-5).to_json())
    report["steps"] = "ten"
    (folder / "bad_report.json").write_text(json.dumps(report))
    torch.save({"model": run[0].state_dict(), "privacy_engine": engine.state_dict()}, folder / "ckpt.pt")
    # the engine state under a key of the user's choosing (the report said it was neither)
    torch.save({"model": run[0].state_dict(), "dp": engine.state_dict()}, folder / "own_key.pt")
    torch.save({"model": run[0].state_dict(), "step": 3}, folder / "no_engine.pt")
    return engine, folder


def test_report_of_a_saved_report(saved):
    engine, folder = saved
    out = _cli("report", folder / "report.json", "--json")
    assert out.returncode == 0, out.stderr
    saved_report = dpclip.PrivacyReport.from_json((folder / "report.json").read_text())
    assert saved_report.checked  # written by the live engine
    shown = dpclip.PrivacyReport.from_dict(json.loads(out.stdout))
    assert shown.checked is False  # but read back from a file, nothing checked it
    assert shown.epsilon == saved_report.epsilon and shown.ledger == saved_report.ledger
    text = _cli("report", folder / "report.json")
    assert "dpclip privacy report" in text.stdout and "epsilon [rdp]" in text.stdout
    assert "UNCHECKED" in text.stdout


def test_report_of_a_checkpoint_without_an_engine_state_names_its_keys(saved):
    _, folder = saved
    out = _cli("report", folder / "no_engine.pt", "--delta", 1e-6)
    assert out.returncode != 0
    assert "under any key (this one's keys: 'model', 'step')" in out.stderr


@pytest.mark.parametrize("name", ["engine.json", "ckpt.pt", "own_key.pt"])
def test_report_of_an_engine_checkpoint_recomputes_from_its_ledger(saved, name, tmp_path):
    engine, folder = saved
    plot = tmp_path / "eps.png"
    out = _cli("report", folder / name, "--delta", 1e-6, "--json", "--plot", plot)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["delta"] == 1e-6 and result["steps"] == engine.steps
    assert result["checked"] is False
    for method in ("rdp", "pld", "prv"):
        assert result["epsilon"][method] == pytest.approx(engine.ledger.epsilon(1e-6, method), rel=1e-9)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    markdown = _cli("report", folder / name, "--delta", 1e-6, "--markdown")
    assert markdown.stdout.startswith("| quantity | value |")
    assert "UNCHECKED, figures read from a file, not checked against a training run" in markdown.stdout


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
        ("calibrate", "--target-epsilon", "1", "--delta", "1e-5", "--dataset-size", "1000", "--batch-size", "10",
         "--accumulation-steps", "0", "--steps", "10"),
        ("compare", "--model", "tiny", "--logical-batch", "4", "--micro-batch", "8", "--steps", "1"),
        ("report", "{folder}/no_plan.json", "--delta", "1e-5"),
        ("report", "{folder}/wrong_type.json", "--delta", "1e-5"),
        ("report", "{folder}/plan_list.json", "--delta", "1e-5"),
        ("report", "{folder}/count_huge.json", "--delta", "1e-5"),
        ("report", "{folder}/tiny_rate.json", "--delta", "1e-5"),
        ("report", "{folder}/budget_delta.json"),
        ("report", "{folder}/deep.json"),
        ("report", "{folder}/bad_report.json"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(saved, args, capsys):
    # in this process (an uncaught exception fails the test as a traceback would): a
    # subprocess per case cost minutes of torch imports; the entry point is run above
    _, folder = saved
    try:
        code = main([a.format(folder=folder) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    assert code == 2
    assert out.out == ""
    assert len(out.err.strip().splitlines()) == 1, out.err
    assert "error:" in out.err


def test_json_output_stays_json_when_epsilon_is_infinite():
    out = _cli("epsilon", "--noise-multiplier", 0, "--delta", 1e-5, "--sample-rate", 0.01, "--steps", 10, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["epsilon"] == {"gdp": "inf", "pld": "inf", "prv": "inf", "rdp": "inf"}


@pytest.mark.parametrize("target", ["1e9", "1e3"])
def test_calibrate_refuses_a_target_above_its_range_in_one_line(target):
    out = _cli("calibrate", "--target-epsilon", target, "--delta", 1e-5, "--sample-rate", 0.01, "--steps", 1000)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "0 < target_epsilon <= 100" in out.stderr


def test_epsilon_at_tiny_noise_gives_the_rdp_bound_and_says_why_the_grids_cannot():
    out = _cli("epsilon", "--noise-multiplier", 1e-9, "--delta", 1e-5, "--sample-rate", 0.01, "--steps", 1000,
               "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["epsilon"]["rdp"] == oracle.rdp_epsilon(0.01, 1e-9, 1000, 1e-5)
    assert result["epsilon"]["prv"] is None and result["epsilon"]["pld"] is None
    assert "1e+07" in result["unavailable"]["prv"] and "1e+07" in result["unavailable"]["pld"]
    text = _cli("epsilon", "--noise-multiplier", 1e-9, "--delta", 1e-5, "--sample-rate", 0.01, "--steps", 1000)
    assert "epsilon[prv] n/a (accountant 'prv' cannot evaluate" in text.stdout
    assert "epsilon[pld] n/a (accountant 'pld' cannot evaluate" in text.stdout


def test_budget_without_noise_says_zero_steps_and_infinite_epsilon():
    args = ("budget", "--epsilon", 2, "--delta", 1e-5, "--sample-rate", 0.01, "--noise-multiplier", 0)
    out = _cli(*args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("steps 0  (a single step already spends epsilon inf > 2")
    assert "no privacy" in out.stdout and "epsilon 0 " not in out.stdout
    result = json.loads(_cli(*args, "--json").stdout)
    assert result["steps"] == 0 and result["one_step_epsilon"] == "inf"


def test_a_reader_that_closes_the_pipe_gets_one_line_not_a_traceback(saved):
    _, folder = saved
    proc = subprocess.Popen([sys.executable, "-m", "dpclip", "report", folder / "report.json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `| head` does once it has its lines
    _, err = proc.communicate(timeout=GUARD_S)
    assert proc.returncode == 2
    assert "Traceback" not in err and err.count("\n") == 1 and "closed the pipe" in err


# ---- fuzz: a mutated state file gives a report or one line and exit 2 ----------------

_ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([10**30, 2**53, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-9, 1e-300, 0.5, 1.0]),
    st.text(max_size=5), st.sampled_from(["poisson", "shuffled", "PoissonGaussian", "rdp", "inf"]),
    st.lists(st.integers(0, 2), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(0, 2), max_size=2),
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def states(saved):
    engine, folder = saved
    return engine.state_dict(), json.loads((folder / "report.json").read_text())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_report_of_a_mutated_state_file_is_a_report_or_one_line(states, data, tmp_path_factory, capsys):
    base = copy.deepcopy(data.draw(st.sampled_from(states)))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_paths(base))[1:]))
        *parents, last = path
        target = base
        for key in parents:
            target = target[key]
        if data.draw(st.booleans()) and isinstance(target, dict):
            del target[last]
        else:
            target[last] = data.draw(_ODD)
    file = tmp_path_factory.mktemp("fuzz") / "state.json"
    file.write_text(json.dumps(base))
    capsys.readouterr()
    try:
        status = main(["report", str(file), "--delta", "1e-5"] if base.get("schema") == "dpclip.engine/1"
                      else ["report", str(file)])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    if status == 0:
        assert out.startswith("dpclip privacy report") and "UNCHECKED" in out and err == ""
    else:
        assert status == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("dpclip report: error: "), err


def test_report_refuses_a_state_whose_ledger_its_own_plan_never_records(saved, tmp_path):
    # the item-6 symptom: a ledger claiming a tiny sample rate reported ε ≈ 0
    engine, _ = saved
    state = engine.state_dict()
    state["ledger"]["entries"][0]["params"]["sample_rate"] = 1e-9
    path = tmp_path / "forged.json"
    path.write_text(json.dumps(state))
    out = _cli("report", str(path), "--delta", "1e-5")
    assert out.returncode == 2
    assert "never records" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_report_reads_a_version_1_engine_state(saved, tmp_path):
    engine, _ = saved
    state = engine.state_dict()
    state["schema"] = "dpclip.engine/1"
    for key in ("rng", "example_uses"):
        state.pop(key)
    state["plan"].pop("index_set")
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(state))
    out = _cli("report", str(path), "--delta", "1e-5", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["checked"] is False
