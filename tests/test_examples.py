"""The examples run end to end (short settings), as a user would start them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.hf
def test_finetune_hf_with_lora_runs_and_prints_the_report(capsys):
    _load("finetune_hf").main(["--model", "vit", "--lora", "--epochs", "1", "--pretrain-epochs", "1"])
    out = capsys.readouterr().out
    assert "vit + LoRA" in out and "epoch 1: test accuracy" in out
    assert "dpclip privacy report" in out and "optimizer steps" in out


def test_ddp_example_runs_on_two_processes_and_reports_once():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLES / "ddp.py")],
        capture_output=True, text=True, timeout=300, cwd=EXAMPLES.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 processes, logical batch L = 128, replicas identical" in out.stdout
    assert out.stdout.count("dpclip privacy report") == 1  # rank 0 only
    assert "processes W              2" in out.stdout


@pytest.mark.hf
def test_hf_trainer_example_runs_and_prints_the_report(capsys):
    _load("hf_trainer").main(["--epochs", "1", "--pretrain-epochs", "1"])
    out = capsys.readouterr().out
    assert "after public pretraining" in out and "test accuracy" in out
    assert "dpclip privacy report" in out and "accumulation steps k     4" in out


def test_lightning_example_runs_and_prints_the_report(capsys):
    _load("lightning_module").main(["--epochs", "1"])
    out = capsys.readouterr().out
    assert "test accuracy" in out and "after 22 steps" in out
    assert "dpclip privacy report" in out and "accumulation steps k     4" in out


def test_accelerate_example_runs_and_prints_the_report(capsys):
    _load("accelerate_loop").main(["--epochs", "1"])
    out = capsys.readouterr().out
    assert "epoch 1: test accuracy" in out and "22 steps" in out
    assert "dpclip privacy report" in out and "accumulation steps k     4" in out
