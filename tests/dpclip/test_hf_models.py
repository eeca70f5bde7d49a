"""Hugging Face models as built train exactly with accumulation (issue 14).

Each model of ``tests.dpclip.hf_models`` is made private as it is (no change to
the model or to its forward call) and trained by a plain loop: with σ = 0 the
update of k = 2 micro-batches of B = 3 equals the clipped per-example update
computed one example at a time (``reference_update``), in float64, in both loop
styles; in float32 at B = 16 and 64 positions a step is taken without refusal.

Every model of ``CASES`` is in ``WORKING`` (a test checks that none is left out).

Select these tests with ``-m hf``.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from tests.dpclip.hf_models import CASES, HFCase, reference_update

pytestmark = [
    pytest.mark.hf,
    # peft calls a transformers method that transformers 5 deprecates
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

WORKING = [
    "bert", "roberta", "distilbert", "gpt2", "t5", "bart", "vit", "llama", "qwen2", "bert_lora",
    "llama_lora",
]

K, B = 2, 3  # the float64 comparison: k micro-batches of B examples, one logical batch


def test_every_model_is_working():
    assert sorted(WORKING) == sorted(CASES)


def _data(case: HFCase, n: int, seq: int, dtype: torch.dtype, seed: int = 0):
    inputs, labels = case.batch(n, seq, torch.Generator().manual_seed(seed))
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs), labels


def _make_private(model, case, inputs, labels, *, batch_size, noise_multiplier, max_grad_norm,
                  optimizer=None, poisson_sampling=False, memory="auto"):
    """The user's lines: an optimizer from model.parameters(), make_private, as built."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=1.0)
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=case.criterion(),
        data_loader=DataLoader(TensorDataset(*inputs, labels), batch_size=batch_size),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        accumulation_steps=K,
        poisson_sampling=poisson_sampling,
        memory=memory,
        noise_generator=torch.Generator().manual_seed(1),
        sample_generator=torch.Generator().manual_seed(2),
    )
    return engine, model, optimizer, criterion, loader


def _train(model, optimizer, criterion, loader, style: int, steps: int = 1) -> None:
    """Loop style 1 (step/zero_grad every micro-batch) or 2 (every K), ``steps`` logical batches."""
    for i, (*inputs, labels) in enumerate(loader):
        criterion(model(*inputs), labels).backward()
        if style == 1 or (i + 1) % K == 0:
            optimizer.step()
            optimizer.zero_grad()
        if i + 1 == K * steps:
            return


def _compare_with_reference(name: str, style: int, memory: str = "auto", checkpointing: bool = False):
    """(relative difference ‖Δ − ref‖ / ‖ref‖ over all trainable parameters, the model,
    its parameters before); raises what dpclip raises. ``checkpointing``: the Hugging Face
    model's non-reentrant gradient checkpointing, on for dpclip (the reference runs without)."""
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build(case.seq).double()
    inputs, labels = _data(case, K * B, case.seq, torch.float64)
    criterion = case.criterion()
    pristine = copy.deepcopy(model)  # before make_private adds hooks
    _, norms = reference_update(pristine, inputs, labels, criterion, 1.0, 1.0)
    max_grad_norm = float(norms.median())  # about half the examples are clipped
    expected, _ = reference_update(pristine, inputs, labels, criterion, max_grad_norm, K * B)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if checkpointing:
        model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    _, model, optimizer, criterion, loader = _make_private(
        model, case, inputs, labels, batch_size=B, noise_multiplier=0.0,
        max_grad_norm=max_grad_norm, memory=memory,
    )
    _train(model, optimizer, criterion, loader, style)
    params = dict(model.named_parameters())
    diff = torch.sqrt(
        sum((before[n] - params[n].detach() - e).pow(2).sum() for n, e in expected.items())
    )
    size = torch.sqrt(sum(e.pow(2).sum() for e in expected.values()))
    assert size > 0
    return float(diff / size), model, before, set(expected)


@pytest.mark.parametrize("style", [1, 2])
@pytest.mark.parametrize("name", WORKING)
def test_update_equals_one_example_at_a_time_reference(name, style):
    relative, model, before, trainable = _compare_with_reference(name, style)
    assert relative < 1e-9
    for n, p in model.named_parameters():  # frozen weights (LoRA's base model) stay as they were
        if n not in trainable:
            assert torch.equal(p, before[n]) and p.grad is None, n


@pytest.mark.parametrize("memory", ["fast", "low"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "t5", "vit", "llama", "llama_lora"])
def test_gradient_checkpointing_update_equals_the_reference(name, memory):
    # the forward that checkpointing runs again inside dpclip's backward records nothing,
    # and gives the same tensors autograd saved
    relative, *_ = _compare_with_reference(name, 2, memory=memory, checkpointing=True)
    # (T5's and Llama's RMSNorm compute in float32: "low" backpropagates c_i·ℓ_i through it)
    assert relative < (1e-7 if memory == "low" and name in ("t5", "llama", "llama_lora") else 1e-9)


@pytest.mark.parametrize("name", WORKING)
def test_float32_at_batch_16_and_64_positions_takes_a_step(name):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build(64)
    inputs, labels = _data(case, 4 * K * 16, 64, torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, model, optimizer, criterion, loader = _make_private(
        model, case, inputs, labels, batch_size=16, noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=True,  # q = 1/4: micro-batches of 16 expected
    )
    _train(model, optimizer, criterion, loader, style=2)
    assert engine.steps == 1
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, before[n]) != p.requires_grad, n  # trainable moved, frozen not


def test_vit_embeddings_take_the_broadcast_rule_not_the_graph_path():
    # ViTEmbeddings owns cls_token.expand(B, -1, -1) and + position_embeddings [1, T+1, D]:
    # parameters broadcast over the batch, recorded by operation (exactness: the test above)
    case = CASES["vit"]
    torch.manual_seed(0)
    model = case.build(case.seq)
    inputs, labels = _data(case, K * B, case.seq, torch.float32)
    engine, model, optimizer, criterion, loader = _make_private(
        model, case, inputs, labels, batch_size=B, noise_multiplier=1.0, max_grad_norm=1.0,
    )
    _train(model, optimizer, criterion, loader, style=2)
    plan = engine.clipping_plan()
    assert plan.slow_layers() == ()
    embeddings = next(lp for lp in plan.layers if lp.type == "ViTEmbeddings")
    assert embeddings.rule == "broadcast"
    assert set(embeddings.parameters) == {"cls_token", "position_embeddings"}


# --- PEFT: frozen base weights in an optimizer built from model.parameters() ----------------


@pytest.mark.parametrize("name", ["bert_lora", "llama_lora"])
def test_frozen_base_weights_get_no_noise_and_no_update(name):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build(case.seq).double()
    inputs, labels = _data(case, 2 * K * B, case.seq, torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and len(frozen) < len(before)
    # AdamW's weight decay would move any parameter that had a gradient
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine, model, optimizer, criterion, loader = _make_private(
        model, case, inputs, labels, batch_size=B, noise_multiplier=1.0, max_grad_norm=1.0,
        optimizer=adamw,
    )
    _train(model, optimizer, criterion, loader, style=2, steps=2)
    assert engine.steps == 2
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]) and p.grad is None, n
        else:
            assert not torch.equal(p, before[n]), n


def test_optimizer_parameter_outside_the_module_is_refused():
    case = CASES["bert_lora"]
    model = case.build(case.seq).double()
    inputs, labels = _data(case, K * B, case.seq, torch.float64)
    stray = nn.Parameter(torch.zeros(3, dtype=torch.float64), requires_grad=False)
    optimizer = torch.optim.SGD([*model.parameters(), stray], lr=1.0)
    refused = r"parameter of shape \(3,\) that is not a parameter of module"
    with pytest.raises(ValueError, match=refused):
        _make_private(model, case, inputs, labels, batch_size=B, noise_multiplier=1.0,
                      max_grad_norm=1.0, optimizer=optimizer)
    # nothing was claimed or hooked: the same model and optimizer can be made private
    _make_private(model, case, inputs, labels, batch_size=B, noise_multiplier=1.0,
                  max_grad_norm=1.0, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))


def test_base_weight_unfrozen_after_make_private_is_refused_at_step():
    case = CASES["llama_lora"]
    torch.manual_seed(0)
    model = case.build(case.seq).double()
    inputs, labels = _data(case, K * B, case.seq, torch.float64)
    engine, model, optimizer, criterion, loader = _make_private(
        model, case, inputs, labels, batch_size=B, noise_multiplier=1.0, max_grad_norm=1.0,
    )
    for *xb, yb in loader:
        criterion(model(*xb), yb).backward()
    name, weight = next((n, p) for n, p in model.named_parameters() if not p.requires_grad)
    weight.requires_grad_(True)  # not covered by clipping: it would move by noise alone
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=rf"parameter '{re.escape(name)}', which requires grad"):
        optimizer.step()
    assert engine.steps == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_import_dpclip_imports_neither_transformers_nor_peft():
    code = "import sys, dpclip; print(sorted({'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
