"""Bounded cost: inputs past what an accountant evaluates give a sound ε or a clear range error.

Each call runs in a subprocess with a memory cap and a timeout: the cap and the
timeout only guard the suite against the terabyte grids and the hangs these
inputs used to cause; they are not speed tests.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys

import pytest

import accounting as acc
from tests.accounting import oracle

GUARD_S = 120
GUARD_BYTES = 4 * 2**30


def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (GUARD_BYTES, GUARD_BYTES))


def _outcome(call: str) -> dict:
    """Run ``call`` (an expression over ``acc``) guarded; its value, or its exception type and message."""
    code = (
        "import json, accounting as acc\n"
        f"try:\n    out = {{'value': repr({call})}}\n"
        "except Exception as err:\n    out = {'error': type(err).__name__, 'message': str(err)}\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=GUARD_S,
                          preexec_fn=_cap_memory)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "method, sigma",
    [("prv", 1e-9), ("pld", 1e-9), ("prv", 0.1), ("pld", 1e-3)],
)
def test_an_epsilon_past_the_grid_is_refused_with_the_limit(method, sigma):
    out = _outcome(f"acc.epsilon_for({sigma}, delta=1e-5, sample_rate=0.01, steps=1000, method={method!r})")
    assert out.get("error") == "OutOfRangeError", out
    assert f"accountant {method!r} cannot evaluate" in out["message"]
    assert f"more than the {acc.accountant.MAX_GRID_POINTS:.0e} it allows" in out["message"]
    assert "'rdp'" in out["message"]


def test_rdp_gives_a_sound_epsilon_at_any_noise():
    # dp-accounting's RDP bound is cheap at any σ; the same number from dp-accounting itself.
    eps = acc.epsilon_for(1e-9, delta=1e-5, sample_rate=0.01, steps=1000, method="rdp")
    assert eps == oracle.rdp_epsilon(0.01, 1e-9, 1000, 1e-5)
    assert eps > 1e20 or math.isinf(eps)


def test_a_ledger_past_the_grid_raises_a_value_error_and_the_ledger_api_names_it():
    ledger = acc.Ledger()
    ledger.record(acc.PoissonGaussian(0.01, 1e-9), 1000)
    with pytest.raises(ValueError, match="more than the 1e\\+07"):
        ledger.epsilon(1e-5, "pld")
    with pytest.raises(ValueError, match="more than the 1e\\+07"):
        ledger.epsilon_curve(1e-5, "prv", points=3)


@pytest.mark.parametrize("target", [1e9, 1e3])
def test_calibration_refuses_targets_above_its_range_at_once(target):
    out = _outcome(f"acc.calibrate_noise({target}, 1e-5, 0.01, 1000)")
    assert out.get("error") == "ValueError", out
    assert "0 < target_epsilon <= 100" in out["message"]


def test_calibration_takes_the_top_of_its_range():
    sigma = acc.calibrate_noise(100.0, 1e-5, 0.01, 1000, method="rdp")
    assert oracle.rdp_epsilon(0.01, sigma, 1000, 1e-5) <= 100.0


def test_calibration_counts_an_unevaluable_sigma_as_missing_the_target(monkeypatch):
    real = acc.calibrate.epsilon_for

    def partly(sigma, **kwargs):  # as a numerical accountant whose grid runs out below σ = 0.6
        if sigma < 0.6:
            raise acc.accountant.OutOfRangeError("grid too large")
        return real(sigma, **kwargs)

    monkeypatch.setattr(acc.calibrate, "epsilon_for", partly)
    sigma = acc.calibrate_noise(8.0, 1e-5, 0.01, 1000, method="rdp")
    assert sigma >= 0.6  # never an unevaluated σ
    assert oracle.rdp_epsilon(0.01, sigma, 1000, 1e-5) <= 8.0
