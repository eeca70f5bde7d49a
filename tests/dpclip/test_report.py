"""PrivacyReport: numbers from accounting on the run's ledger, formats, and every warning."""

from __future__ import annotations

import json
import math

import pytest

import accounting as acc
import dpclip
from dpclip.report import REPORT_SCHEMA, make_report
from tests.accounting import oracle
from tests.dpclip.private_run import private_mlp, train


@pytest.fixture(scope="module")
def trained():
    run = private_mlp()
    train(*run, epochs=2)
    return run[0]


def test_report_numbers_are_accounting_on_the_same_ledger(trained):
    report = trained.report(1e-5)
    assert trained.steps == report.steps == 10  # (80 // 16) steps per epoch, 2 epochs
    ledger = acc.Ledger()
    ledger.load_state_dict(report.ledger)
    for method in ("prv", "pld", "rdp", "gdp"):
        assert report.epsilon[method] == ledger.epsilon(1e-5, method)
    assert report.epsilon["rdp"] == pytest.approx(oracle.rdp_epsilon(16 / 80, 1.0, 10, 1e-5), rel=1e-9)
    assert report.approximate == ("gdp",)
    assert (report.delta, report.epochs, report.dataset_size) == (1e-5, 2.0, 80)
    assert (report.sample_rate, report.logical_batch_size, report.micro_batch_size) == (0.2, 16, 8)
    assert (report.accumulation_steps, report.noise_multiplier, report.max_grad_norm) == (2, 1.0, 1.0)
    assert (report.sampling, report.secure_mode, report.accountant) == ("poisson", False, "rdp")
    assert (report.max_epsilon, report.steps_remaining) == (None, None)
    assert set(report.versions) == {"dpclip", "opacus", "torch"}
    assert report.warnings == ()


def test_json_round_trip_and_schema(trained):
    report = trained.report(1e-5)
    data = json.loads(report.to_json())
    assert data["schema"] == REPORT_SCHEMA
    assert set(data["epsilon"]) == {"prv", "pld", "rdp", "gdp"}
    assert dpclip.PrivacyReport.from_json(report.to_json()) == report
    with pytest.raises(ValueError, match="schema"):
        dpclip.PrivacyReport.from_dict({**data, "schema": "dpclip.report/0"})


def test_infinite_epsilon_survives_json():
    engine, *rest = private_mlp(noise_multiplier=0.0)
    train(engine, *rest)
    report = engine.report(1e-5)
    assert report.epsilon["prv"] == math.inf
    assert "inf" in report.to_json()
    assert dpclip.PrivacyReport.from_json(report.to_json()) == report


def test_text_and_markdown_show_every_accountant_and_label_the_approximation(trained):
    report = trained.report(1e-5)
    text, markdown = str(report), report.to_markdown()
    for method in ("prv", "pld", "rdp", "gdp"):
        assert f"{report.epsilon[method]:.4f}" in text and f"{report.epsilon[method]:.4f}" in markdown
    assert "approximation, not a bound" in text and "approximation, not a bound" in markdown
    assert markdown.startswith("| quantity | value |")


def test_plot_is_a_png_with_one_curve_per_accountant_and_the_budget_line(tmp_path):
    engine, *rest = private_mlp(max_epsilon=20.0, target_delta=1e-5)
    train(engine, *rest)
    path = tmp_path / "eps.png"
    fig = engine.report().plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = fig.axes[0].get_lines()
    labels = [line.get_label() for line in lines]
    assert labels == ["prv", "pld", "rdp", "gdp (approximation)", "budget ε = 20"]
    for line in lines[:4]:
        assert list(line.get_xdata())[-1] == engine.steps
    assert lines[2].get_ydata()[-1] == pytest.approx(engine.ledger.epsilon(1e-5, "rdp"))


# ---- warnings: each set up by its condition, and absent without it --------------------


def _warnings(report, needle):
    return [w for w in report.warnings if needle in w]


def test_warning_sampling_not_poisson():
    engine, *rest = private_mlp(poisson_sampling=False)
    train(engine, *rest)
    report = engine.report(1e-5)
    assert _warnings(report, "not Poisson")
    assert report.epsilon_no_amplification == pytest.approx(
        engine.ledger.epsilon(1e-5, "pld", no_amplification=True)
    )
    assert report.epsilon_no_amplification > report.epsilon["pld"]


def test_warning_delta_at_least_one_over_n(trained):
    assert _warnings(trained.report(1 / 80), "1/N")
    assert not _warnings(trained.report(1 / 81), "1/N")


def test_warnings_budget_exceeded_or_nearly(trained):
    state = trained.state_dict()
    eps = trained.get_epsilon(1e-5)
    for cap, needle in ((eps / 2, "budget exceeded"), (eps * 1.05, "nearly"), (eps * 2, None)):
        state["budget"] = {"max_epsilon": cap, "delta": 1e-5, "steps_remaining": 0}
        report = make_report(state, 1e-5)
        found = [w for w in report.warnings if "budget" in w]
        assert (found and needle in found[0]) if needle else not found


def test_warning_small_noise_multiplier():
    engine, *rest = private_mlp(noise_multiplier=0.4)
    train(engine, *rest)
    assert _warnings(engine.report(1e-5), "noise_multiplier=0.4 < 0.5")
    engine, *rest = private_mlp(noise_multiplier=0.5)
    assert not _warnings(engine.report(1e-5), "< 0.5")


def test_an_accountant_that_fails_on_tiny_noise_is_reported_not_raised():
    engine, *rest = private_mlp(noise_multiplier=0.1, batch_size=20)
    train(engine, *rest, epochs=2)
    report = engine.report(1e-5)  # prv cannot discretise here; the report still comes
    assert report.epsilon["prv"] is None
    assert any("'prv' could not compute" in w for w in report.warnings)
    assert report.epsilon["rdp"] == engine.ledger.epsilon(1e-5, "rdp")


def test_warning_k_times_b_differs_from_the_logical_batch():
    engine, *_ = private_mlp(batch_size=20, accumulation_steps=None, max_physical_batch_size=8)
    assert _warnings(engine.report(1e-5), "k·B differs")
    engine, *_ = private_mlp(batch_size=16, accumulation_steps=None, max_physical_batch_size=8)
    assert not _warnings(engine.report(1e-5), "k·B differs")


def test_report_needs_a_delta_without_a_budget(trained):
    with pytest.raises(ValueError, match="delta"):
        trained.report()


def test_a_live_engine_report_is_checked_and_one_from_a_state_file_says_unchecked(trained):
    live = trained.report(1e-5)
    assert live.checked and json.loads(live.to_json())["checked"] is True
    assert "UNCHECKED" not in str(live) and "UNCHECKED" not in live.to_markdown()
    from_file = make_report(trained.state_dict(), 1e-5, checked=False)
    assert not from_file.checked and json.loads(from_file.to_json())["checked"] is False
    for text in (str(from_file), from_file.to_markdown()):
        assert "UNCHECKED, figures read from a file, not checked against a training run" in text
    assert from_file.epsilon == live.epsilon


def test_a_saved_report_without_the_checked_field_reads_as_unchecked(trained):
    data = json.loads(trained.report(1e-5).to_json())
    del data["checked"]  # as written before the field existed
    assert dpclip.PrivacyReport.from_dict(data).checked is False


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("steps", "10", "steps"),
        ("steps", True, "steps"),
        ("epsilon", {"rdp": "big"}, "epsilon"),
        ("epsilon", [1.0], "epsilon"),
        ("delta", 2.0, "delta"),
        ("sample_rate", 1e3, "sample_rate"),
        ("warnings", "none", "warnings"),
        ("secure_mode", 1, "secure_mode"),
        ("checked", "yes", "checked"),
        ("sampling", "random", "sampling"),
        ("ledger", {"version": 1, "entries": [], "x": 1}, "keys"),
        ("surprise", 1, "unknown fields"),
    ],
)
def test_a_saved_report_with_a_wrong_field_is_refused_by_name(trained, field, value, needle):
    data = json.loads(trained.report(1e-5).to_json())
    data[field] = value
    with pytest.raises(ValueError, match=needle):
        dpclip.PrivacyReport.from_dict(data)


@pytest.mark.parametrize(
    "path, value, needle",
    [
        (("plan",), None, "plan"),
        (("plan", "dataset_size"), 0, "dataset_size"),
        (("plan", "sampling"), 3, "sampling"),
        (("noise_multiplier",), "1", "noise_multiplier"),
        (("accountant",), "moments", "accountant"),
        (("budget",), {"max_epsilon": 1.0}, "budget is missing"),
        (("ledger", "entries"), [{"event": "PoissonGaussian"}], "keys"),
    ],
)
def test_an_engine_state_with_a_wrong_field_is_refused_by_name(trained, path, value, needle):
    state = trained.state_dict()
    *parents, last = path
    target = state
    for key in parents:
        target = target[key]
    target[last] = value
    with pytest.raises(ValueError, match=needle):
        make_report(state, 1e-5, checked=False)
