"""Hugging Face models as a user builds them, tiny and randomly initialised from a
config (nothing is downloaded), wrapped so that a plain training loop works: a
module whose ``forward`` takes the batch tensors and returns logits, a criterion
with one loss per example, and generators of inputs and labels.

``reference_update`` is the clipped update computed one example at a time with
plain autograd on a copy of the model: independent of dpclip and of
``torch.func`` (Hugging Face attention kernels do not vmap well).

Imports transformers and peft: only the ``hf`` tests use this module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import peft
import torch
import torch.nn as nn
import transformers

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CLASSES = 96, 32, 2, 4, 2, 64, 3
PAD, BOS, EOS = 0, 1, 2  # special token ids; ordinary tokens are drawn from 3..VOCAB-1
IMAGE_CHANNELS, PATCH = 3, 4


class TokenCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy of logits [B, T, V] against labels [B, T]. With
    ``reduction="none"`` (what ``dpclip.DPCriterion`` sets) it returns one loss
    per token, [B, T]; DPCriterion averages them per sequence, as "mean" does for
    one sequence, so the privacy unit is one sequence."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.transpose(1, 2), labels)


class SequenceClassifier(nn.Module):
    """Token ids [B, T] (0 = padding) → class logits [B, CLASSES]."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids, attention_mask=(ids != PAD).long()).logits


class ImageClassifier(nn.Module):
    """Pixels [B, C, H, W] → class logits [B, CLASSES]."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixels).logits


class CausalLM(nn.Module):
    """Token ids [B, T] → next-token logits [B, T, V]."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids).logits


class Seq2SeqLM(nn.Module):
    """Source ids [B, S] (0 = padding) and decoder input ids [B, T] → logits [B, T, V]."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, src: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(
            input_ids=src, attention_mask=(src != PAD).long(), decoder_input_ids=decoder_ids
        ).logits


# --- inputs and labels: (inputs, labels) for n examples of length seq ---------------------

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


def _tokens(n: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(EOS + 1, VOCAB, (n, seq), generator=gen)


def _padded_tails(
    ids: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids with each example cut to a random length in [seq/2, seq], padding after it;
    the lengths [n, 1])."""
    n, seq = ids.shape
    lengths = torch.randint(seq // 2, seq + 1, (n, 1), generator=gen)
    return ids.masked_fill(torch.arange(seq) >= lengths, PAD), lengths


def classification_batch(n: int, seq: int, gen: torch.Generator) -> Batch:
    ids, _ = _padded_tails(_tokens(n, seq, gen), gen)
    return (ids,), torch.randint(0, CLASSES, (n,), generator=gen)


def eos_classification_batch(n: int, seq: int, gen: torch.Generator) -> Batch:
    """As ``classification_batch`` with <eos> as each example's last token: BART's head
    reads the hidden state at the last <eos>, and every example needs the same count."""
    ids, lengths = _padded_tails(_tokens(n, seq, gen), gen)
    ids = ids.scatter(1, lengths - 1, EOS)
    return (ids,), torch.randint(0, CLASSES, (n,), generator=gen)


def causal_lm_batch(n: int, seq: int, gen: torch.Generator) -> Batch:
    """seq input tokens and, as labels, the seq tokens that follow each one."""
    ids = _tokens(n, seq + 1, gen)
    return (ids[:, :-1],), ids[:, 1:]


def seq2seq_batch(n: int, seq: int, gen: torch.Generator) -> Batch:
    """Padded source; target labels with <eos> last, decoder input = labels shifted right."""
    src, _ = _padded_tails(_tokens(n, seq, gen), gen)
    labels = _tokens(n, seq, gen)
    labels[:, -1] = EOS
    decoder_ids = torch.cat([torch.full((n, 1), PAD), labels[:, :-1]], dim=1)
    return (src, decoder_ids), labels


def image_batch(n: int, seq: int, gen: torch.Generator) -> Batch:
    """Square images of ``seq`` patches (seq a square number), PATCH pixels a side."""
    side = PATCH * round(seq**0.5)
    pixels = torch.randn(n, IMAGE_CHANNELS, side, side, generator=gen)
    return (pixels,), torch.randint(0, CLASSES, (n,), generator=gen)


# --- models: build(seq) → wrapped model with positions for sequences of length seq --------

_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert(seq: int) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=seq, num_labels=CLASSES,
        pad_token_id=PAD, **_NO_DROPOUT,
    )
    return SequenceClassifier(transformers.BertForSequenceClassification(config))


def roberta(seq: int) -> nn.Module:
    # RoBERTa numbers positions from pad_token_id + 1
    config = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=seq + PAD + 1, num_labels=CLASSES,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **_NO_DROPOUT,
    )
    return SequenceClassifier(transformers.RobertaForSequenceClassification(config))


def distilbert(seq: int) -> nn.Module:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
        max_position_embeddings=seq, num_labels=CLASSES, pad_token_id=PAD,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
    )
    return SequenceClassifier(transformers.DistilBertForSequenceClassification(config))


def gpt2(seq: int) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
        n_positions=seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=BOS, eos_token_id=EOS,
    )
    return CausalLM(transformers.GPT2LMHeadModel(config))


def t5(seq: int) -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
        num_heads=HEADS, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
    )
    return Seq2SeqLM(transformers.T5ForConditionalGeneration(config))


def bart(seq: int) -> nn.Module:
    # BART's learned positions are offset by 2
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN, max_position_embeddings=seq, num_labels=CLASSES,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, classifier_dropout=0.0,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
    )
    return SequenceClassifier(transformers.BartForSequenceClassification(config))


def vit(seq: int) -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, image_size=PATCH * round(seq**0.5), patch_size=PATCH,
        num_channels=IMAGE_CHANNELS, num_labels=CLASSES, **_NO_DROPOUT,
    )
    return ImageClassifier(transformers.ViTForImageClassification(config))


def _decoder_config(cls: type, seq: int) -> transformers.PretrainedConfig:
    return cls(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=seq,
        attention_dropout=0.0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )


def llama(seq: int) -> nn.Module:
    return CausalLM(transformers.LlamaForCausalLM(_decoder_config(transformers.LlamaConfig, seq)))


def qwen2(seq: int) -> nn.Module:
    return CausalLM(transformers.Qwen2ForCausalLM(_decoder_config(transformers.Qwen2Config, seq)))


def _lora(task_type: peft.TaskType, target_modules: list[str]) -> peft.LoraConfig:
    # init_lora_weights=False: B starts random rather than zero, so that A's per-example
    # gradients are not all zero at the first step and the comparison covers them too
    return peft.LoraConfig(
        task_type=task_type, r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=target_modules, init_lora_weights=False,
    )


def bert_lora(seq: int) -> nn.Module:
    """LoRA on the query/value projections; the classifier head trains in full
    (peft's modules_to_save for sequence classification); the rest is frozen."""
    base = bert(seq).hf
    return SequenceClassifier(
        peft.get_peft_model(base, _lora(peft.TaskType.SEQ_CLS, ["query", "value"]))
    )


def llama_lora(seq: int) -> nn.Module:
    """LoRA on the q/v projections; everything else frozen."""
    base = llama(seq).hf
    return CausalLM(peft.get_peft_model(base, _lora(peft.TaskType.CAUSAL_LM, ["q_proj", "v_proj"])))


@dataclass(frozen=True)
class HFCase:
    """One model: ``build(seq)`` gives the wrapped model, ``batch(n, seq, generator)``
    its (inputs, labels), ``criterion()`` the loss module the user passes to make_private."""

    build: Callable[[int], nn.Module]
    batch: Callable[[int, int, torch.Generator], Batch]
    criterion: Callable[[], nn.Module]
    #: sequence length of the float64 comparison (ViT: patches, a square number)
    seq: int = 8


CASES: dict[str, HFCase] = {
    "bert": HFCase(bert, classification_batch, nn.CrossEntropyLoss),
    "roberta": HFCase(roberta, classification_batch, nn.CrossEntropyLoss),
    "distilbert": HFCase(distilbert, classification_batch, nn.CrossEntropyLoss),
    "gpt2": HFCase(gpt2, causal_lm_batch, TokenCrossEntropy),
    "t5": HFCase(t5, seq2seq_batch, TokenCrossEntropy),
    "bart": HFCase(bart, eos_classification_batch, nn.CrossEntropyLoss),
    "vit": HFCase(vit, image_batch, nn.CrossEntropyLoss, seq=4),
    "llama": HFCase(llama, causal_lm_batch, TokenCrossEntropy),
    "qwen2": HFCase(qwen2, causal_lm_batch, TokenCrossEntropy),
    "bert_lora": HFCase(bert_lora, classification_batch, nn.CrossEntropyLoss),
    "llama_lora": HFCase(llama_lora, causal_lm_batch, TokenCrossEntropy),
}


def per_example_loss(
    criterion: nn.Module, logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """ℓ for one example: the criterion's per-element losses (reduction "none") averaged,
    i.e. the token cross-entropy averaged over the sequence (what DPCriterion does
    with a "mean" criterion)."""
    criterion = copy.copy(criterion)
    criterion.reduction = "none"
    return criterion(logits, labels).mean()


def reference_update(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    criterion: nn.Module,
    max_grad_norm: float,
    logical_batch: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(Σ_i min(1, C/‖g_i‖) g_i / L per trainable parameter name, the norms ‖g_i‖).

    g_i is the gradient of example i's loss with respect to every parameter with
    ``requires_grad``, from a forward and backward of example i alone (batch of one)
    on a deep copy of ``model`` (``model`` itself is not touched; pass it before
    ``make_private`` adds hooks). C = ``max_grad_norm``, L = ``logical_batch``.
    """
    model = copy.deepcopy(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(labels.shape[0]):
        logits = model(*(x[i : i + 1] for x in inputs))
        loss = per_example_loss(criterion, logits, labels[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = torch.clamp(max_grad_norm / norm, max=1.0)
        for t, g in zip(total, grads):
            t.add_(factor * g)
        norms.append(norm)
    return {n: t / logical_batch for (n, _), t in zip(named, total)}, torch.stack(norms)
