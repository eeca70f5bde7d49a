"""Hugging Face models a new user might try, beyond ``hf_models``: built tiny from a
config (nothing is downloaded), wrapped the README's way (tensors in, logits out), and
made private as built; and the ordinary mistakes of such a user's loop.

Each working model: with σ = 0 the update of k = 2 micro-batches of B = 3 equals the
clipped update computed one example at a time (``reference_update``), float64, 1e-9
relative; in float32 a step is taken without refusal. Models dpclip cannot take are
refused loudly, naming the module and the cause, before anything is added; each
mistake either trains correctly or is refused with a message that names the fix.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import transformers as tf
from torch.utils.data import DataLoader, TensorDataset

import dpclip
from tests.dpclip.hf_models import reference_update

pytestmark = [pytest.mark.hf]

VOCAB, HIDDEN, SEQ, CLASSES, PAD = 500, 32, 32, 3, 0
K, B = 2, 3
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# --- the user's code --------------------------------------------------------------------------


class Classifier(nn.Module):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids, attention_mask=(ids != PAD).long()).logits


class LanguageModel(nn.Module):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids).logits


class ImageModel(nn.Module):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixels).logits


class TokenCrossEntropy(nn.CrossEntropyLoss):
    """The README's token loss: logits [B, T, V] against labels [B, T]."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.transpose(1, 2), labels)


def _text(cls, config_cls, **kw):
    return lambda: Classifier(cls(config_cls(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=CLASSES, **NO_DROPOUT, **kw)))


def _causal(cls, config_cls, **kw):
    return lambda: LanguageModel(cls(config_cls(
        vocab_size=VOCAB, hidden_size=HIDDEN, max_position_embeddings=SEQ, **kw)))


def _image(cls, config_cls, **kw):
    return lambda: ImageModel(cls(config_cls(num_channels=3, num_labels=CLASSES, **kw)))


TEXT = {
    # ALBERT shares one layer's parameters across the depth: each is used by both layers
    "albert": _text(tf.AlbertForSequenceClassification, tf.AlbertConfig, embedding_size=16,
                    max_position_embeddings=SEQ, classifier_dropout_prob=0.0),
    "electra": _text(tf.ElectraForSequenceClassification, tf.ElectraConfig, embedding_size=16,
                     max_position_embeddings=SEQ),
    "xlm_roberta": _text(tf.XLMRobertaForSequenceClassification, tf.XLMRobertaConfig,
                         max_position_embeddings=SEQ + 2),
    # NoNorm (weight * x + bias) and bottlenecks
    "mobilebert": _text(tf.MobileBertForSequenceClassification, tf.MobileBertConfig,
                        embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                        num_feedforward_networks=2, max_position_embeddings=SEQ,
                        classifier_dropout=0.0),
    # relative position bias: a [T, T] bucket lookup without the batch
    "mpnet": _text(tf.MPNetForSequenceClassification, tf.MPNetConfig, max_position_embeddings=SEQ + 2,
                   pad_token_id=PAD),
    "deberta_v2": _text(tf.DebertaV2ForSequenceClassification, tf.DebertaV2Config,
                        max_position_embeddings=SEQ, relative_attention=True, position_buckets=8,
                        max_relative_positions=SEQ, pos_att_type=["p2c", "c2p"],
                        pooler_dropout=0.0),
}
CAUSAL = {
    "gpt_neo": _causal(tf.GPTNeoForCausalLM, tf.GPTNeoConfig, num_layers=2, num_heads=4,
                       attention_types=[[["global", "local"], 1]], window_size=8,
                       intermediate_size=64, embed_dropout=0.0, attention_dropout=0.0,
                       resid_dropout=0.0, bos_token_id=1, eos_token_id=2),
    "mistral": _causal(tf.MistralForCausalLM, tf.MistralConfig, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       sliding_window=8),
    "phi": _causal(tf.PhiForCausalLM, tf.PhiConfig, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, partial_rotary_factor=0.5, resid_pdrop=0.0,
                   embd_pdrop=0.0, attention_dropout=0.0),
    # rotary on half the head, parallel residual
    "gpt_neox": _causal(tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, rotary_pct=0.5,
                        use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0),
    # ALiBi, head tied to the embedding
    "bloom": _causal(tf.BloomForCausalLM, tf.BloomConfig, n_layer=2, n_head=4, hidden_dropout=0.0,
                     attention_dropout=0.0),
    # FalconLinear (x @ W.T + b) and mlp_output += attention_output in place
    "falcon": _causal(tf.FalconForCausalLM, tf.FalconConfig, num_hidden_layers=2,
                      num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                      alibi=False, hidden_dropout=0.0, attention_dropout=0.0),
    # RMSNorm scaled by (1 + w) in float32, a scaled embedding subclass tied to the head
    "gemma": _causal(tf.GemmaForCausalLM, tf.GemmaConfig, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, intermediate_size=64, pad_token_id=PAD),
    "opt": _causal(tf.OPTForCausalLM, tf.OPTConfig, num_hidden_layers=2, num_attention_heads=4,
                   ffn_dim=64, word_embed_proj_dim=HIDDEN, dropout=0.0, attention_dropout=0.0,
                   pad_token_id=PAD),
}
IMAGE = {
    # LayerNorm over channels: its channels-first LayerNorm (F.layer_norm in its own
    # forward) is recorded by operation
    "convnext": _image(tf.ConvNextForImageClassification, tf.ConvNextConfig, patch_size=2,
                       num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=16),
    "swin": _image(tf.SwinForImageClassification, tf.SwinConfig, image_size=16, patch_size=2,
                   embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, mlp_ratio=2.0,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   drop_path_rate=0.0),
    "resnet": _image(tf.ResNetForImageClassification, tf.ResNetConfig, embedding_size=8,
                     hidden_sizes=[8, 16], depths=[1, 1]),
}
CHOICE = {
    # [B, C, T] folded to [B·C, T] inside: its position embeddings [1, T, H] met the folded
    # batch in an add, where dpclip expanded them over B and the forward crashed
    "bert_multiple_choice": lambda: Classifier(tf.BertForMultipleChoice(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=SEQ, **NO_DROPOUT))),
}


def _adapted(config) -> nn.Module:
    """A tiny Llama with a peft adapter; its trainable weights moved off their initial
    values (LoRA's B starts at zero), so that every one gets a gradient."""
    import peft

    base = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=SEQ))
    model = LanguageModel(peft.get_peft_model(base, config))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _adapter(kind: str):
    import peft

    return lambda: _adapted({
        "lora_embedding": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                          lora_dropout=0.0),
        "ia3": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
    }[kind])


# peft adapters that keep their weights in a ParameterDict (never called itself: the layer
# holding it uses them in its own forward). They were refused ("already used by a
# backward()", "gets gradient from outside its own module's forward") or crashed (KeyError:
# LoRA's embedding looks up F.embedding(x, A.T)); they train on the exact graph path
ADAPTERS = {f"adapter_{kind}": _adapter(kind) for kind in ("lora_embedding", "ia3", "loha")}
CAUSAL.update(ADAPTERS)
BUILD = {**TEXT, **CAUSAL, **IMAGE, **CHOICE}

WORKING = [
    "albert", "electra", "xlm_roberta", "mobilebert", "mpnet", "gpt_neo", "mistral", "phi", "gpt_neox",
    "bloom", "falcon", "gemma", "convnext",
]
#: refused at the first backward(): the module named and why (see the test)
REFUSED = {
    # relative-position embeddings [1, 2k, H] projected by pos_key_proj, without the batch
    "deberta_v2": ("hf.deberta.encoder.layer.0.attention.self.pos_key_proj", "without the batch"),
    # the feed-forward runs on hidden states reshaped to [B·T, H]
    "opt": ("hf.model.decoder.layers.0.final_layer_norm", "folds the batch"),
    # window attention on [B·windows, tokens, C]
    "swin": ("hf.swin.encoder.layers.0.blocks.0.attention.q_proj", "folds the batch"),
    "bert_multiple_choice": ("hf.bert.embeddings.LayerNorm", "folds the batch"),
}


def criterion_for(name: str) -> nn.Module:
    return TokenCrossEntropy() if name in CAUSAL else nn.CrossEntropyLoss()


def make_data(name: str, n: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if name in IMAGE:
        return torch.randn(n, 3, 16, 16, generator=gen, dtype=dtype), torch.randint(0, CLASSES, (n,), generator=gen)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=gen)
    if name in CAUSAL:
        return ids, ids.roll(-1, 1)
    if name in CHOICE:
        ids = torch.randint(3, VOCAB, (n, CLASSES, SEQ), generator=gen)
        return ids, torch.randint(0, CLASSES, (n,), generator=gen)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=gen)
    ids[torch.arange(SEQ) >= lengths[:, None]] = PAD
    return ids, torch.randint(0, CLASSES, (n,), generator=gen)


def make_private(model, name, x, y, *, noise_multiplier=0.0, max_grad_norm=1.0, batch_size=B,
                 criterion=None, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=1.0)
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=optimizer, criterion=criterion or criterion_for(name),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, accumulation_steps=K,
        poisson_sampling=False, noise_generator=torch.Generator().manual_seed(1),
    )
    return engine, model, optimizer, criterion, loader


def train(model, optimizer, criterion, loader, steps=1, zero_grad=True) -> None:
    for i, (x, y) in enumerate(loader):
        criterion(model(x), y).backward()
        if (i + 1) % K == 0:
            optimizer.step()
            if zero_grad:
                optimizer.zero_grad()
            if (i + 1) // K == steps:
                return


def build(name: str, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return BUILD[name]().to(dtype)


def relative_difference(before, model, expected) -> float:
    """‖Δ − ref‖ / ‖ref‖ over the trainable parameters, Δ = the update taken."""
    params = dict(model.named_parameters())
    diff = sum((before[n] - params[n].detach() - e).pow(2).sum() for n, e in expected.items())
    size = sum(e.pow(2).sum() for e in expected.values())
    assert size > 0
    return float((diff / size).sqrt())


def private_update_and_reference(name: str, *, steps_model=None, zero_grad=True):
    """(the update of one logical batch at σ = 0, C = the median norm, vs the reference)."""
    model = build(name)
    x, y = make_data(name, K * B)
    pristine = copy.deepcopy(model)
    criterion = criterion_for(name)
    _, norms = reference_update(pristine, (x,), y, criterion, 1.0, 1.0)
    max_grad_norm = float(norms.median())  # about half the examples are clipped
    expected, _ = reference_update(pristine, (x,), y, criterion, max_grad_norm, K * B)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, model, optimizer, criterion, loader = make_private(
        model, name, x, y, max_grad_norm=max_grad_norm)
    train(model, optimizer, criterion, loader, zero_grad=zero_grad)
    assert engine.steps == 1
    return relative_difference(before, model, expected), engine


# --- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKING)
def test_update_equals_one_example_at_a_time_reference_and_no_layer_takes_the_graph_path(name):
    relative, engine = private_update_and_reference(name)
    assert relative < 1e-9
    assert engine.clipping_plan().slow_layers() == ()


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_weights_in_a_parameter_dict_train_exactly_on_the_graph_path(name):
    relative, engine = private_update_and_reference(name)
    assert relative < 1e-9
    assert engine.clipping_plan().slow_layers() != ()


@pytest.mark.parametrize("name", WORKING)
def test_float32_takes_a_noisy_step(name):
    model = build(name, torch.float32)
    x, y = make_data(name, 2 * K * 8, torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, model, optimizer, criterion, loader = make_private(
        model, name, x, y, noise_multiplier=1.0, batch_size=8)
    train(model, optimizer, criterion, loader, steps=2)
    assert engine.steps == 2
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[n]), n


def test_batch_norm_model_is_refused_with_the_fix():
    model = build("resnet")
    x, y = make_data("resnet", K * B)
    with pytest.raises(ValueError, match=r"BatchNorm2d\) mixes examples.*replace it with nn.GroupNorm"):
        make_private(model, "resnet", x, y)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_model_that_hides_the_batch_is_refused_naming_module_and_cause(name):
    module, cause = REFUSED[name]
    model = build(name)
    x, y = make_data(name, K * B)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, model, optimizer, criterion, loader = make_private(model, name, x, y)
    x0, y0 = next(iter(loader))
    loss = criterion(model(x0), y0)
    with pytest.raises(RuntimeError, match=rf"module '{module}'.*{cause}.*not supported as built"):
        loss.backward()
    assert engine.steps == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --- a user's mistakes ----------------------------------------------------------------------------


def _albert_run(**kw):
    model = build("albert")
    x, y = make_data("albert", 2 * K * B)
    return make_private(model, "albert", x, y, noise_multiplier=1.0, **kw)


def test_hugging_face_outputs_loss_is_refused_at_step_naming_the_criterion():
    engine, model, optimizer, criterion, loader = _albert_run()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i, (x, y) in enumerate(loader):
        model.hf(input_ids=x, attention_mask=(x != PAD).long(), labels=y).loss.backward()
        if i + 1 == K:
            break
    with pytest.raises(RuntimeError, match=r"outputs\.loss.*pass the logits and labels to that criterion"):
        optimizer.step()
    assert engine.steps == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# GPT-Neo's learned positions are a lookup without the batch (position ids [1, T]): the
# loss's batch must be checked before that lookup's gradient is split by example
@pytest.mark.parametrize("name", ["mistral", "gpt_neo"])
def test_flattened_token_logits_are_refused_naming_the_criterion(name):
    model = build(name)
    x, y = make_data(name, K * B)
    engine, model, optimizer, criterion, loader = make_private(
        model, name, x, y, criterion=nn.CrossEntropyLoss())
    xb, yb = next(iter(loader))
    logits = model(xb)
    loss = criterion(logits.view(-1, logits.shape[-1]), yb.view(-1))  # the Hugging Face way
    with pytest.raises(RuntimeError, match=rf"the loss has {B * SEQ} per-example values but the DP data loader "
                       rf"handed out {B} examples.*forward had a batch of {B}: a loss per token.*"
                       rf"transpose\(1, 2\)"):
        loss.backward()


def test_forgetting_zero_grad_gives_the_same_update():
    relative, _ = private_update_and_reference("electra", zero_grad=False)
    assert relative < 1e-9


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_reducing_the_private_loss_is_refused_with_the_fix(reduce):
    engine, model, optimizer, criterion, loader = _albert_run()
    x, y = next(iter(loader))
    loss = criterion(model(x), y)
    with pytest.raises(AttributeError, match=rf"no attribute '{reduce}'.*Call loss.backward\(\) on it as it is"):
        getattr(loss, reduce)()
    loss.backward()  # the loss is still usable: nothing was consumed
    assert optimizer._micro_batches == 1


@pytest.mark.parametrize(
    "take", [
        lambda loss, params: torch.autograd.grad(loss, params),
        lambda loss, params: torch.autograd.backward(loss),
        lambda loss, params: loss[0],
    ],
    ids=["autograd.grad", "autograd.backward", "index"],
)
def test_autograd_functions_on_the_private_loss_are_refused_with_the_fix(take):
    engine, model, optimizer, criterion, loader = _albert_run()
    x, y = next(iter(loader))
    loss = criterion(model(x), y)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(TypeError, match=r"a DPLoss is not a tensor.*Call loss.backward\(\)"):
        take(loss, params)
    assert all(p.grad is None for p in params)
    loss.backward()  # nothing was consumed
    assert optimizer._micro_batches == 1


@pytest.mark.parametrize(
    "scale, message",
    [
        (lambda l: l / (K + 1), rf"divided by {K + 1}, but the logical batch has k = {K} micro-batches"),
        (lambda l: l / 0.5, "don't multiply it, or divide it by anything but the accumulation steps"),
        (lambda l: l * 0.5, "don't multiply it, or divide it by anything but the accumulation steps"),
        (lambda l: 0.5 * l, "don't multiply it, or divide it by anything but the accumulation steps"),
        (lambda l: l / True, "don't multiply it, or divide it by anything but the accumulation steps"),
    ],
)
def test_scaling_the_private_loss_is_refused_with_the_fix(scale, message):
    engine, model, optimizer, criterion, loader = _albert_run()
    x, y = next(iter(loader))
    with pytest.raises(TypeError, match=message):
        scale(criterion(model(x), y))


@pytest.mark.parametrize("divisor", [K, 1, float(K)])
def test_dividing_by_the_accumulation_steps_changes_nothing(divisor):
    # the framework convention (accelerator.backward divides by k): dpclip's division by
    # L = k·B already averages the k micro-batches
    updates = []
    for scaled in (False, True):
        torch.manual_seed(0)
        engine, model, optimizer, criterion, loader = _albert_run()  # seeded noise, fixed batches
        for x, y in loader:
            loss = criterion(model(x), y)
            (loss / divisor if scaled else loss).backward()
            optimizer.step()
            optimizer.zero_grad()
        updates.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*updates))


@pytest.mark.parametrize("criterion_too", [False, True])
def test_forward_under_no_grad_is_refused_naming_no_grad(criterion_too):
    engine, model, optimizer, criterion, loader = _albert_run()
    x, y = next(iter(loader))
    with torch.no_grad():
        logits = model(x)
        loss = criterion(logits, y) if criterion_too else None
    loss = loss if criterion_too else criterion(logits, y)
    with pytest.raises(RuntimeError, match=r"torch\.no_grad\(\).*gradients enabled"):
        loss.backward()
    assert optimizer._micro_batches == 0
    criterion(model(x), y).backward()  # the loop can go on, with gradients
    assert optimizer._micro_batches == 1


def test_eval_mode_mid_run_trains_on():
    engine, model, optimizer, criterion, loader = _albert_run()
    model.eval()  # dropout off: still per-example, still private
    train(model, optimizer, criterion, loader, steps=2)
    assert engine.steps == 2


def test_frozen_embeddings_in_the_optimizer_get_no_update():
    model = build("albert")
    for p in model.hf.albert.embeddings.parameters():
        p.requires_grad_(False)
    x, y = make_data("albert", 2 * K * B)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine, model, optimizer, criterion, loader = make_private(
        model, "albert", x, y, noise_multiplier=1.0, optimizer=adamw)
    train(model, optimizer, criterion, loader, steps=2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (not p.requires_grad), n


class DictClassifier(nn.Module):
    """The user's model takes the batch as one dict, as a collated dataset of
    {"input_ids", "attention_mask"} gives it: ``model(batch)``."""

    def __init__(self) -> None:
        super().__init__()
        config = tf.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=2 * HIDDEN, max_position_embeddings=SEQ, num_labels=CLASSES,
                               **NO_DROPOUT)
        self.hf = tf.BertForSequenceClassification(config)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.hf(**batch).logits


class AsTensors(nn.Module):
    """The same model called with tensors, for the one-example-at-a-time reference."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model({"input_ids": ids, "attention_mask": mask})


def test_a_model_taking_one_dict_of_tensors_is_clipped_exactly():
    # The batch is found inside the dict (before: its ids were taken for a lookup table
    # without a batch dimension, and the first backward was refused).
    torch.manual_seed(0)
    model = DictClassifier().double()
    ids = torch.randint(1, VOCAB, (K * B, SEQ))
    mask = torch.ones_like(ids)
    mask[::2, SEQ // 2:] = 0
    y = torch.randint(0, CLASSES, (K * B,))
    criterion = nn.CrossEntropyLoss()
    _, norms = reference_update(AsTensors(model), (ids, mask), y, criterion, 1.0, 1.0)
    max_grad_norm = float(norms.median())
    expected, _ = reference_update(AsTensors(model), (ids, mask), y, criterion, max_grad_norm, K * B)
    before = [p.detach().clone() for p in model.parameters()]
    data = [({"input_ids": i, "attention_mask": m}, t) for i, m, t in zip(ids, mask, y)]
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, dp_criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=criterion,
        data_loader=DataLoader(data, batch_size=B), noise_multiplier=0.0, max_grad_norm=max_grad_norm,
        accumulation_steps=K, poisson_sampling=False,
    )
    for batch, target in loader:
        dp_criterion(model(batch), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert engine.steps == 1
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    reference = torch.cat([g.flatten() for g in expected.values()])
    assert float((update - reference).norm() / reference.norm()) < 1e-9
