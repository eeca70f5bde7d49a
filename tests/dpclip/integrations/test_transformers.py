"""DPTrainer as a Hugging Face user runs it: tiny models from configs, their usual
TrainingArguments, k = 4.

References: the update of dpclip's own hand-written loop on the same logical batch,
and one example at a time with the model's own loss (``outputs.loss`` of a forward
with that example's labels), plain autograd; ε against dp-accounting."""

from __future__ import annotations

import itertools
import json
import os

import dp_accounting
import peft
import pytest
import torch
import transformers
from torch.utils.data import DataLoader

import dpclip
from dpclip.integrations.transformers import ENGINE_STATE_NAME, DPTrainer, PerExampleLoss, loss_kind

pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB, SEQ, N, B, K, C = 40, 8, 64, 4, 4, 0.5
_TINY = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert_classifier(num_labels: int = 3, problem_type: str | None = None, dropout: float = 0.0):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=SEQ, num_labels=num_labels,
        problem_type=problem_type, hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def bert_mlm():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=SEQ, **_TINY,
    )
    return transformers.BertForMaskedLM(config)


def bert_tokens():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=SEQ, num_labels=5, **_TINY,
    )
    return transformers.BertForTokenClassification(config)


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=SEQ, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(config)


def gpt2_lora():
    config = peft.LoraConfig(r=2, lora_alpha=4, task_type=peft.TaskType.CAUSAL_LM, target_modules=["c_attn"])
    return peft.get_peft_model(gpt2(), config)


def t5():
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=4, relative_attention_max_distance=8, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


def vit():
    config = transformers.ViTConfig(
        image_size=4, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTForImageClassification(config)


def dataset(kind: str, n: int = N, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Examples as a Hugging Face dataset yields them: dicts of tensors, with 'labels'."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=gen)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=gen)
    for i, length in enumerate(lengths.tolist()):  # padded tails of different lengths
        ids[i, length:], mask[i, length:] = 0, 0
    if kind == "image":
        images = torch.rand(n, 1, 4, 4, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 3, (n,), generator=gen)
        return [{"pixel_values": images[i], "labels": labels[i]} for i in range(n)]
    if kind == "single_label":
        labels = torch.randint(0, 3, (n,), generator=gen)
    elif kind == "regression":
        labels = torch.randn(n, generator=gen)
    elif kind == "multi_label":
        labels = (torch.rand(n, 3, generator=gen) < 0.5).float()
    elif kind == "token_class":
        labels = torch.randint(0, 5, (n, SEQ), generator=gen).masked_fill(mask == 0, -100)
    else:  # language modelling: the padded tail is not predicted
        labels = ids.masked_fill(mask == 0, -100)
    if kind == "mlm":  # predict a few positions only
        labels = labels.masked_fill(torch.rand(n, SEQ, generator=gen) < 0.5, -100)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


MODELS = {
    "single_label": lambda: bert_classifier(),
    "regression": lambda: bert_classifier(num_labels=1),
    "multi_label": lambda: bert_classifier(problem_type="multi_label_classification"),
    "token_class": bert_tokens,
    "mlm": bert_mlm,
    "causal": gpt2,
    "seq2seq": t5,
    "causal_lora": gpt2_lora,
    "image": vit,
}
DATA_KIND = {"causal_lora": "causal"}
# Hugging Face's causal-LM loss computes in float32 (``logits.float()``) even for a float64
# model, so the reference is good to float32's rounding there, float64's elsewhere
RTOL = {"causal": 1e-6, "causal_lora": 1e-6}
# and its multi-label loss returns the float32 labels' dtype
LOSS_RTOL = {**RTOL, "multi_label": 1e-6}


def training_args(tmp_path, **overrides) -> transformers.TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=B, gradient_accumulation_steps=K,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_steps=1, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def own_loss(model, example: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss on one example (its forward with labels)."""
    return model(**{k: v.unsqueeze(0) for k, v in example.items()}).loss


def reference_update(model, examples, logical_batch: float) -> dict[str, torch.Tensor]:
    """Σ_i min(1, C/‖g_i‖) g_i / L, g_i of the model's own loss on example i alone."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for _, p in named]
    for example in examples:
        grads = torch.autograd.grad(own_loss(model, example), [p for _, p in named], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        for t, g in zip(total, grads):
            t.add_(torch.clamp(C / norm, max=1.0) * g)
    return {n: t / logical_batch for (n, _), t in zip(named, total)}


def hand_loop(model, data, seed: int, kind: str):
    """dpclip's own loop over one logical batch; returns the examples it trained on."""
    engine = dpclip.PrivacyEngine(accountant="rdp")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loader = DataLoader(data, batch_size=B, collate_fn=transformers.default_data_collator)
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=optimizer, criterion=PerExampleLoss(kind), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=C, accumulation_steps=K,
        sample_generator=torch.Generator().manual_seed(seed),
    )
    seen = []
    for batch in itertools.islice(loader, K):
        labels = batch.pop("labels")
        seen += [{**{k: v[i] for k, v in batch.items()}, "labels": labels[i]} for i in range(labels.shape[0])]
        if "decoder_input_ids" not in batch and hasattr(model, "prepare_decoder_input_ids_from_labels"):
            batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        criterion(model(**batch).logits, labels).backward()
    optimizer.step()
    return seen


@pytest.mark.parametrize("case", list(MODELS))
def test_one_step_equals_the_hand_loop_and_the_per_example_reference(case, tmp_path):
    torch.manual_seed(0)
    model = MODELS[case]().double()
    data = dataset(DATA_KIND.get(case, case))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    by_hand = _copy(model)
    seen = hand_loop(by_hand, data, seed=7, kind=loss_kind(by_hand, data[0]["labels"].unsqueeze(0)))
    assert len(seen) > 0
    reference = reference_update(_copy(model), seen, logical_batch=K * B)

    trainer = DPTrainer(
        model=model, args=training_args(tmp_path), train_dataset=data, noise_multiplier=0.0,
        target_delta=1e-5, max_grad_norm=C, accountant="rdp", sample_generator=torch.Generator().manual_seed(7),
    )
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.privacy_engine.steps == 1
    hand = dict(by_hand.named_parameters())
    scale = max(float(r.abs().max()) for r in reference.values())
    moved = 0
    for name, p in model.named_parameters():
        assert torch.equal(p, hand[name]), name  # same draw, same arithmetic
        if name in reference:
            update = (start[name] - p.detach()) / 0.5
            rtol = RTOL.get(case, 1e-9)
            atol = rtol * scale  # entries whose true gradient is 0 (attention key bias)
            torch.testing.assert_close(update, reference[name], rtol=rtol, atol=atol, msg=name)
            moved += int(update.abs().max() > 0)
        else:  # frozen (LoRA's base weights)
            assert torch.equal(p, start[name]), name
    assert moved > 0


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("case", ["single_label", "regression", "multi_label", "token_class", "mlm", "causal", "seq2seq"])
def test_per_example_loss_is_the_models_own_loss_one_example_at_a_time(case):
    torch.manual_seed(0)
    model = MODELS[case]().double()
    data = dataset(case, n=6)
    batch = transformers.default_data_collator(data)
    labels = batch.pop("labels")
    if case == "seq2seq":
        batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
    losses = PerExampleLoss(loss_kind(model, labels), reduction="none")(model(**batch).logits, labels)
    expected = torch.stack([own_loss(model, example) for example in data])
    torch.testing.assert_close(losses, expected.to(losses.dtype), rtol=LOSS_RTOL.get(case, 1e-10), atol=1e-12)


def test_loss_kind_refuses_a_head_it_does_not_know():
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    ))
    with pytest.raises(ValueError, match="per_example_loss=fn"):
        loss_kind(model)


def rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)


def test_logged_epsilon_and_steps_are_the_ledgers_and_dp_accountings(tmp_path):
    torch.manual_seed(0)
    data = dataset("single_label")
    trainer = DPTrainer(
        model=bert_classifier(), args=training_args(tmp_path, max_steps=3), train_dataset=data,
        noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=C, accountant="rdp",
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    for entry in logs:
        assert entry["privacy_steps"] == entry["step"]
        expected = rdp_epsilon(K * B / N, 1.0, entry["step"], 1e-5)
        assert entry["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert trainer.privacy_engine.ledger.steps == 3
    assert trainer.privacy_engine.get_epsilon(1e-5) == logs[-1]["epsilon"]


def test_logged_loss_is_the_mean_per_example_loss_of_each_logical_batch(tmp_path):
    torch.manual_seed(0)
    data = dataset("single_label")
    model = bert_classifier().double()
    losses: list[float] = []
    trainer = DPTrainer(
        model=model, args=training_args(tmp_path, max_steps=2, learning_rate=0.0), train_dataset=data,
        noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=C, accountant="rdp",
        sample_generator=torch.Generator().manual_seed(3),
    )
    trainer.train()
    # the same draws, through the sampler alone; the model does not move (lr = 0)
    sampler = dpclip.PoissonMicroBatchSampler(
        num_samples=len(data), sample_rate=K * B / N, micro_batches=K, steps=N // (K * B),
        generator=torch.Generator().manual_seed(3),
    )
    batches = iter(sampler)
    with torch.no_grad():
        for _ in range(2):
            indices = [i for _ in range(K) for i in next(batches)]
            losses.append(sum(own_loss(model, data[i]).item() for i in indices) / max(len(indices), 1))
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, rel=1e-6)


def test_resume_from_a_trainer_checkpoint_mid_epoch_is_bit_exact(tmp_path):
    def run(output_dir, resume=None):
        torch.manual_seed(0)
        model = bert_classifier(dropout=0.1)  # dropout: the Trainer's RNG state matters too
        args = training_args(
            output_dir, max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch",
            learning_rate=1e-2, lr_scheduler_type="linear",
        )
        trainer = DPTrainer(
            model=model, args=args, train_dataset=dataset("single_label"), noise_multiplier=1.0,
            target_delta=1e-5, max_grad_norm=C, accountant="rdp",
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    full, full_model = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-2"
    with open(checkpoint / ENGINE_STATE_NAME) as f:
        assert json.load(f)["ledger"]  # the privacy state is in the checkpoint
    resumed, resumed_model = run(tmp_path / "b", resume=str(checkpoint))
    assert resumed.state.global_step == 4
    for (name, p), q in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name
    assert resumed.privacy_engine.state_dict() == full.privacy_engine.state_dict()
    logged = [(e["step"], e["epoch"], e["epsilon"]) for e in full.state.log_history if "loss" in e]
    again = [(e["step"], e["epoch"], e["epsilon"]) for e in resumed.state.log_history if "loss" in e]
    assert again == logged and [e[1] for e in logged] == [0.25, 0.5, 0.75, 1.0]


def test_resume_refuses_a_checkpoint_without_the_privacy_state(tmp_path):
    torch.manual_seed(0)
    data = dataset("single_label")
    plain = transformers.Trainer(
        model=bert_classifier(), args=training_args(tmp_path / "plain", max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=data,
    )
    plain.train()
    trainer = DPTrainer(
        model=bert_classifier(), args=training_args(tmp_path / "dp", max_steps=4), train_dataset=data,
        noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=C,
    )
    with pytest.raises(ValueError, match="no dpclip_engine.json"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))
    assert trainer.privacy_engine.steps == 0


def test_target_epsilon_is_reached_at_the_end_and_a_cap_stops_training(tmp_path):
    torch.manual_seed(0)
    data = dataset("single_label")
    trainer = DPTrainer(
        model=bert_classifier(), args=training_args(tmp_path, max_steps=6, logging_steps=6),
        train_dataset=data, target_epsilon=8.0, target_delta=1e-5, max_grad_norm=C, accountant="rdp",
    )
    trainer.train()
    assert trainer.privacy_engine.steps == 6
    assert trainer.privacy_engine.get_epsilon(1e-5) == pytest.approx(8.0, rel=0.02)
    assert trainer.privacy_engine.get_epsilon(1e-5) <= 8.0 + 1e-9

    capped = DPTrainer(
        model=bert_classifier(), args=training_args(tmp_path / "cap", max_steps=20), train_dataset=data,
        noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=C, accountant="rdp", max_epsilon=4.0,
    )
    capped.train()
    steps = capped.privacy_engine.steps
    assert 0 < steps < 20 and capped.state.global_step == steps
    assert rdp_epsilon(K * B / N, 1.0, steps, 1e-5) <= 4.0 < rdp_epsilon(K * B / N, 1.0, steps + 1, 1e-5)
    assert capped.state.log_history[-2]["privacy_steps_remaining"] == 0


def test_the_trainers_max_grad_norm_is_the_clipping_bound_and_its_own_clipping_is_off(tmp_path):
    data = dataset("single_label")
    args = training_args(tmp_path, max_grad_norm=0.25)
    trainer = DPTrainer(model=bert_classifier(), args=args, train_dataset=data, noise_multiplier=1.0, target_delta=1e-5)
    trainer.get_train_dataloader()
    assert trainer.privacy_engine.optimizer.max_grad_norm == 0.25
    assert trainer.args.max_grad_norm == 0 and args.max_grad_norm == 0.25  # the user's args untouched
    with pytest.raises(ValueError, match="two clipping bounds"):
        DPTrainer(model=bert_classifier(), args=args, train_dataset=data, noise_multiplier=1.0,
                  target_delta=1e-5, max_grad_norm=1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_delta=1e-5), "exactly one of noise_multiplier"),
        (dict(noise_multiplier=1.0, target_epsilon=2.0, target_delta=1e-5), "exactly one of noise_multiplier"),
        (dict(noise_multiplier=1.0), "needs target_delta"),
        (dict(noise_multiplier=1.0, target_delta=1e-5, compute_loss_func=lambda *a, **k: 0), "per_example_loss"),
        (dict(noise_multiplier=1.0, target_delta=1e-5, per_example_loss="ce"), "callable"),
    ],
)
def test_bad_privacy_arguments_are_refused(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        DPTrainer(model=bert_classifier(), args=training_args(tmp_path), train_dataset=dataset("single_label"), **kwargs)


def test_a_per_example_loss_of_the_users_own(tmp_path):
    torch.manual_seed(0)
    data = dataset("single_label")
    calls = []

    def loss(outputs, labels):
        calls.append(labels.shape[0])
        return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="none")

    trainer = DPTrainer(model=bert_classifier(), args=training_args(tmp_path), train_dataset=data,
                        noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=C, per_example_loss=loss)
    trainer.train()
    assert trainer.privacy_engine.steps == 1 and len(calls) >= K
    assert os.path.isdir(tmp_path)


def test_empty_poisson_micro_batches_are_counted_without_a_forward(tmp_path):
    torch.manual_seed(3)
    model = bert_classifier()
    forwards = []
    model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    # B = 1, k = 4: L = 4, q = 1/16, so many logical batches have fewer than 4 examples
    trainer = DPTrainer(
        model=model, args=training_args(tmp_path, per_device_train_batch_size=1, max_steps=6),
        train_dataset=dataset("single_label"), noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=C,
        sample_generator=torch.Generator().manual_seed(3),
    )
    trainer.train()
    assert trainer.privacy_engine.steps == trainer.state.global_step == 6
    assert 0 not in forwards and len(forwards) < 6 * K  # the empty ones ran no forward


@pytest.mark.parametrize("case", ["single_label", "causal"])
def test_label_smoothing_is_the_trainers_per_example(case, tmp_path):
    # the Trainer's LabelSmoother on one example at a time is the reference
    torch.manual_seed(0)
    model = MODELS[case]().double()
    data = dataset(case, n=5)
    batch = transformers.default_data_collator(data)
    labels = batch.pop("labels")
    losses = PerExampleLoss(loss_kind(model, labels), reduction="none", label_smoothing=0.3)(model(**batch).logits, labels)
    smoother = transformers.trainer_pt_utils.LabelSmoother(epsilon=0.3)
    expected = torch.stack([
        smoother(model(**{k: v.unsqueeze(0) for k, v in example.items() if k != "labels"}),
                 example["labels"].unsqueeze(0), shift_labels=case == "causal")
        for example in data
    ])
    torch.testing.assert_close(losses, expected.to(losses.dtype), rtol=1e-6, atol=1e-9)
    trainer = DPTrainer(model=model, args=training_args(tmp_path, label_smoothing_factor=0.3), train_dataset=dataset(case),
                        noise_multiplier=0.0, target_delta=1e-5, max_grad_norm=C)
    trainer.get_train_dataloader()
    assert trainer._dp_criterion.criterion(model(**batch).logits, labels).item() == pytest.approx(
        float(losses.mean()), rel=1e-9)
