"""Per-step ε logging (CSV, TensorBoard-like writers) and the live tqdm bar."""

from __future__ import annotations

import csv
import io

import pytest

import dpclip
from tests.accounting import oracle
from tests.dpclip.private_run import private_mlp, train


def test_csv_logger_writes_epsilon_after_every_step(tmp_path):
    engine, *run = private_mlp()
    path = tmp_path / "privacy.csv"
    engine.add_step_callback(dpclip.callbacks.CSVLogger(path, delta=1e-5))
    train(engine, *run, epochs=2)
    rows = list(csv.DictReader(path.open()))
    assert [int(r["step"]) for r in rows] == list(range(1, engine.steps + 1))
    for r in rows:
        assert float(r["epsilon"]) == pytest.approx(oracle.rdp_epsilon(0.2, 1.0, int(r["step"]), 1e-5), rel=1e-9)
        assert (float(r["delta"]), r["method"]) == (1e-5, "rdp")


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_tensorboard_logger_every_n_steps_through_any_writer():
    engine, *run = private_mlp()
    writer = FakeWriter()
    engine.add_step_callback(dpclip.callbacks.TensorBoardLogger(writer, delta=1e-5, every=2, method="pld"))
    train(engine, *run, epochs=2)
    assert [s for _, _, s in writer.scalars] == [2, 4, 6, 8, 10]
    assert all(tag == "privacy/epsilon" for tag, _, _ in writer.scalars)
    assert writer.scalars[-1][1] == pytest.approx(oracle.pld_epsilon(0.2, 1.0, 10, 1e-5), rel=1e-6)


def test_loggers_check_their_arguments():
    with pytest.raises(ValueError, match="every"):
        dpclip.callbacks.TensorBoardLogger(FakeWriter(), delta=1e-5, every=0)
    with pytest.raises(ValueError, match="add_scalar"):
        dpclip.callbacks.TensorBoardLogger(object(), delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        dpclip.callbacks.CSVLogger("x.csv", delta=0.0)


def test_progress_bar_shows_live_epsilon_and_steps():
    engine, model, opt, crit, loader = private_mlp()
    out = io.StringIO()
    seen = 0
    for x, y in dpclip.progress(loader, engine, delta=1e-5, file=out, refresh_s=0.0, mininterval=0):
        crit(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        seen += 1
    assert seen == len(loader)
    final = out.getvalue().split("\r")[-1]
    assert f"steps={engine.steps}" in final
    assert f"eps={engine.get_epsilon(1e-5):.3f}" in final
