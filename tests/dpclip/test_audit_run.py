"""The canary audit (dpclip.audit.run) on the built-in MLP: a correct run stays under
its claim on 3 seeds; two deliberately broken runs (the noise cut 10× while the ledger
keeps σ, each example's clipped gradient counted twice) are caught. The breaks are
made here, by patching dpclip, never through the public API."""

from __future__ import annotations

import json

import pytest
import torch
import dpclip.clipping.clipper as clipper_module
import dpclip.optimizer as optimizer_module
from dpclip import audit
from dpclip.cli import main
from dpclip.workloads import Workload, mlp

# 10 000 canaries, q ≈ 0.64 of 512 examples + ~5 000 included canaries, 2 steps at σ = 3:
# claimed ε ≈ 1.3 at δ = 1e-5 (about 5 s an audit on 2 cores).
SETTINGS = {"noise_multiplier": 3.0, "logical_batch": 3500, "steps": 2, "canaries": 10_000}


def audit_mlp(seed: int = 0) -> audit.AuditResult:
    return audit.run(mlp(n=512, seed=seed), seed=seed, **SETTINGS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_correct_run_is_consistent_with_its_claim(seed):
    result = audit_mlp(seed)
    assert result.claimed_epsilon == pytest.approx(1.3, abs=0.1)
    assert 0 < result.epsilon_lower_bound <= result.claimed_epsilon
    assert result.epsilon_lower_bound_any_mechanism <= result.epsilon_lower_bound
    assert result.noise_multiplier_bound >= SETTINGS["noise_multiplier"]
    assert result.consistent
    # the guesses are better than chance: the canaries are seen through the noise
    assert all(v > r / 2 for r, v in zip(result.guesses, result.correct))


def test_noise_cut_tenfold_is_caught(monkeypatch):
    real = optimizer_module.private_gradient

    def quieter(clipped_sum, *, noise_std, **kwargs):
        return real(clipped_sum, noise_std=noise_std / 10, **kwargs)

    monkeypatch.setattr(optimizer_module, "private_gradient", quieter)
    result = audit_mlp()
    assert result.epsilon_lower_bound > result.claimed_epsilon
    assert result.noise_multiplier_bound < SETTINGS["noise_multiplier"] / 2
    assert not result.consistent


def test_an_example_counted_twice_is_caught(monkeypatch):
    # Each example's clipped gradient added twice (the double-backward bug): sensitivity 2C
    # while the ledger assumes C.
    real = clipper_module.clip_factors
    monkeypatch.setattr(clipper_module, "clip_factors", lambda norms, c: 2 * real(norms, c))
    result = audit_mlp()
    assert result.epsilon_lower_bound > result.claimed_epsilon
    assert not result.consistent


def test_command_line_json(capsys):
    code = main(["audit", "--model", "tiny", "--noise-multiplier", "2", "--logical-batch", "200",
                 "--steps", "2", "--canaries", "400", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("claimed_epsilon", "epsilon_lower_bound", "delta", "confidence", "canaries"):
        assert key in out
    assert out["canaries"] == 400 and out["delta"] == 1e-5 and out["confidence"] == 0.95
    assert out["epsilon_lower_bound"] <= out["claimed_epsilon"] and out["consistent"] is True


def test_command_line_text(capsys):
    main(["audit", "--model", "tiny", "--noise-multiplier", "2", "--logical-batch", "200",
          "--steps", "1", "--canaries", "400"])
    text = capsys.readouterr().out
    assert "claimed ε" in text and "empirical ε lower bound" in text and "400" in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier > 0"),
        ({"canaries": 99}, "canaries"),
        ({"logical_batch": 10**6}, "exceeds the audit's dataset size"),
        ({"steps": 0}, "steps"),
        ({"confidence": 1.0}, "confidence"),
        ({"delta": 0.0}, "delta"),
        ({"micro_batch": 60}, "micro_batch=60 <= logical_batch=50"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    settings = {"noise_multiplier": 1.0, "logical_batch": 50, "steps": 1, "canaries": 100, **kwargs}
    with pytest.raises(ValueError, match=message):
        audit.run("tiny", **settings)


def test_a_workload_outside_the_convention_is_refused_before_training():
    tiny = mlp(n=8)
    as_dicts = Workload(tiny.model_fn, [{"x": x, "y": y} for x, y in tiny.dataset], tiny.criterion)
    with pytest.raises(ValueError, match=r"\(x, y\) pairs"):
        audit.run(as_dicts, noise_multiplier=1.0, logical_batch=50, steps=1, canaries=100)
    as_function = Workload(tiny.model_fn, tiny.dataset, torch.nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="loss module with reduction"):
        audit.run(as_function, noise_multiplier=1.0, logical_batch=50, steps=1, canaries=100)
    as_instance = Workload(tiny.model_fn(), tiny.dataset, tiny.criterion)
    with pytest.raises(ValueError, match="build a fresh model"):
        audit.run(as_instance, noise_multiplier=1.0, logical_batch=50, steps=1, canaries=100)
    empty = Workload(tiny.model_fn, [], tiny.criterion)
    with pytest.raises(ValueError, match="at least one example"):
        audit.run(empty, noise_multiplier=1.0, logical_batch=50, steps=1, canaries=100)


class PerTokenFlattened(torch.nn.CrossEntropyLoss):
    """The usual language-model loss: [B, T, V] logits flattened to [B·T, V]."""

    def forward(self, logits, labels):
        return super().forward(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def test_a_loss_per_token_instead_of_per_example_is_refused_with_the_fix():
    tokens = torch.randint(0, 7, (64, 5))
    data = torch.utils.data.TensorDataset(tokens, tokens)

    def model():
        return torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7))

    flattened = Workload(model, data, PerTokenFlattened())
    with pytest.raises(ValueError, match="one loss per example.*transpose"):
        audit.run(flattened, noise_multiplier=1.0, logical_batch=50, steps=1, canaries=100)
    # the fix the message names: class scores second, [B, V, T], losses [B, T] per example
    per_token = Workload(lambda: torch.nn.Sequential(model(), Transposed()), data, torch.nn.CrossEntropyLoss())
    assert audit.run(per_token, noise_multiplier=1.0, logical_batch=50, steps=1, canaries=100).steps == 1


class Transposed(torch.nn.Module):
    def forward(self, logits):
        return logits.transpose(1, 2)
