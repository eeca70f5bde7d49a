"""Every name in ``__all__`` resolves; the command line runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import accounting
import dpclip


@pytest.mark.parametrize("module", [dpclip, accounting])
def test_all_names_resolve(module):
    for name in module.__all__:
        assert getattr(module, name) is not None


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dpclip", *args], capture_output=True, text=True)


def test_cli_help_lists_working_commands():
    out = _cli("--help")
    assert out.returncode == 0 and "calibrate" in out.stdout and "epsilon" in out.stdout
    for cmd in ("calibrate", "epsilon"):
        assert _cli(cmd, "--help").returncode == 0


def test_cli_calibrate_prints_a_sigma_that_meets_the_target():
    out = _cli("calibrate", "--target-epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.02",
               "--steps", "500", "--accountant", "rdp", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    eps = accounting.epsilon_for(result["noise_multiplier"], delta=1e-5, sample_rate=0.02, steps=500, method="rdp")
    assert eps <= 3.0 and result["epsilon"]["rdp"] == pytest.approx(eps)


def test_cli_bad_argument_exits_2_with_one_line():
    out = _cli("epsilon", "--noise-multiplier", "-1", "--delta", "1e-5", "--sample-rate", "0.1", "--steps", "3")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "noise_multiplier" in out.stderr
