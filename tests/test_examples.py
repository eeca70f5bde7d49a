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
