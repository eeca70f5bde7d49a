"""Hugging Face models as benchmark workloads (``dpclip.workloads.Workload``), tiny and
randomly initialised from a config: nothing is downloaded.

Each factory takes no argument, so that ``dpclip compare --model
benchmarks.hf_workloads:gpt2`` and ``dpclip.compare.run("benchmarks.hf_workloads:gpt2", ...)``
load it in every measuring process. Sizes are the performance issue's (issue 14):
hidden 64, 2 layers, 4 heads (2 key/value heads for Llama and Qwen2), FFN 256,
vocabulary 1000, sequences of 64 tokens; ViT on 3×32×32 images in 4×4 patches
(64 patches). ``gpt2_small`` is GPT-2 small (124M parameters) for an accelerator.

The model is the Hugging Face model as a user builds it, behind a wrapper whose
``forward`` takes one batch tensor and returns logits (what ``dpclip.compare``
trains); LoRA models are ``peft.get_peft_model`` of the same configs. Language
models use ``SequenceCrossEntropy``: the privacy unit is one sequence for both
dpclip and Opacus.

Imports transformers and peft (the ``examples`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import peft
import torch
import torch.nn as nn
import transformers
from torch.utils.data import TensorDataset

from dpclip.workloads import Workload

__all__ = [
    "MODELS", "SequenceCrossEntropy", "bart", "bert", "bert_lora", "distilbert", "gpt2", "gpt2_small",
    "llama", "llama_lora", "qwen2", "roberta", "t5", "vit",
]

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CLASSES, SEQ = 1000, 64, 2, 4, 2, 256, 2, 64
PAD, BOS, EOS = 0, 1, 2  # special token ids; ordinary tokens are drawn from 3..VOCAB-1
CHANNELS, IMAGE, PATCH = 3, 32, 4
#: examples in each dataset: the benchmark's logical batch of 64 is q = 1/16
SIZE = 1024


class SequenceCrossEntropy(nn.CrossEntropyLoss):
    """Token cross-entropy of logits [B, T, V] against labels [B, T], averaged over each
    sequence: [B] with ``reduction="none"`` (one loss per sequence, what both dpclip's
    and Opacus's ghost-clipping criteria take), their mean with "mean"."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_sequence = nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
        if self.reduction == "none":
            return per_sequence
        return per_sequence.sum() if self.reduction == "sum" else per_sequence.mean()


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
    """Pairs [B, 2, T] of source ids (0 = padding) and decoder input ids → logits [B, T, V].
    One tensor per batch, since ``dpclip.compare`` feeds the model one input."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        src, decoder_ids = pairs.unbind(1)
        return self.hf(input_ids=src, attention_mask=(src != PAD).long(), decoder_input_ids=decoder_ids).logits


# ---- data: (inputs, labels) tensors for n examples, from a fixed seed -----------------------


def _tokens(n: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(EOS + 1, VOCAB, (n, seq), generator=gen)


def _padded(n: int, gen: torch.Generator, eos_last: bool = False) -> torch.Tensor:
    """Ids cut to a random length in [SEQ/2, SEQ], padded after it; with ``eos_last``
    <eos> is each example's last token (BART's head reads the last <eos>)."""
    lengths = torch.randint(SEQ // 2, SEQ + 1, (n, 1), generator=gen)
    ids = _tokens(n, SEQ, gen).masked_fill(torch.arange(SEQ) >= lengths, PAD)
    return ids.scatter(1, lengths - 1, EOS) if eos_last else ids


def _classification(n: int, gen: torch.Generator, eos_last: bool = False) -> TensorDataset:
    return TensorDataset(_padded(n, gen, eos_last), torch.randint(0, CLASSES, (n,), generator=gen))


def _causal_lm(n: int, gen: torch.Generator, vocab: int = VOCAB) -> TensorDataset:
    ids = torch.randint(EOS + 1, vocab, (n, SEQ + 1), generator=gen)
    return TensorDataset(ids[:, :-1], ids[:, 1:])


def _seq2seq(n: int, gen: torch.Generator) -> TensorDataset:
    src = _padded(n, gen)
    labels = _tokens(n, SEQ, gen)
    labels[:, -1] = EOS
    decoder_ids = torch.cat([torch.full((n, 1), PAD), labels[:, :-1]], dim=1)
    return TensorDataset(torch.stack([src, decoder_ids], dim=1), labels)


def _images(n: int, gen: torch.Generator) -> TensorDataset:
    pixels = torch.randn(n, CHANNELS, IMAGE, IMAGE, generator=gen)
    return TensorDataset(pixels, torch.randint(0, CLASSES, (n,), generator=gen))


# ---- models ----------------------------------------------------------------------------------

_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=SEQ, num_labels=CLASSES, pad_token_id=PAD,
        **_NO_DROPOUT,
    )
    return SequenceClassifier(transformers.BertForSequenceClassification(config))


def _roberta() -> nn.Module:
    # RoBERTa numbers positions from pad_token_id + 1
    config = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=SEQ + PAD + 1, num_labels=CLASSES,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **_NO_DROPOUT,
    )
    return SequenceClassifier(transformers.RobertaForSequenceClassification(config))


def _distilbert() -> nn.Module:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
        max_position_embeddings=SEQ, num_labels=CLASSES, pad_token_id=PAD,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
    )
    return SequenceClassifier(transformers.DistilBertForSequenceClassification(config))


def _gpt2(config: transformers.GPT2Config | None = None) -> nn.Module:
    config = config or transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=SEQ,
        bos_token_id=BOS, eos_token_id=EOS,
    )
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(config, name, 0.0)
    return CausalLM(transformers.GPT2LMHeadModel(config))


def _t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
        num_heads=HEADS, dropout_rate=0.0, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
    )
    return Seq2SeqLM(transformers.T5ForConditionalGeneration(config))


def _bart() -> nn.Module:
    # BART's learned positions are offset by 2
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN, max_position_embeddings=SEQ, num_labels=CLASSES,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, classifier_dropout=0.0,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
    )
    return SequenceClassifier(transformers.BartForSequenceClassification(config))


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS, num_labels=CLASSES, **_NO_DROPOUT,
    )
    return ImageClassifier(transformers.ViTForImageClassification(config))


def _decoder(cls: type, config_cls: type) -> nn.Module:
    config = config_cls(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ,
        attention_dropout=0.0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    return CausalLM(cls(config))


def _lora(task_type: peft.TaskType, target_modules: list[str]) -> peft.LoraConfig:
    return peft.LoraConfig(task_type=task_type, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target_modules)


def _bert_lora() -> nn.Module:
    """LoRA on the query/value projections, the classifier head in full (peft's
    ``modules_to_save`` for sequence classification), the rest frozen."""
    return SequenceClassifier(peft.get_peft_model(_bert().hf, _lora(peft.TaskType.SEQ_CLS, ["query", "value"])))


def _llama_lora() -> nn.Module:
    """LoRA on the q/v projections, everything else frozen."""
    base = _decoder(transformers.LlamaForCausalLM, transformers.LlamaConfig).hf
    return CausalLM(peft.get_peft_model(base, _lora(peft.TaskType.CAUSAL_LM, ["q_proj", "v_proj"])))


def _workload(build: Callable[[], nn.Module], data: Callable[[int, torch.Generator], TensorDataset],
              criterion: nn.Module, n: int, seed: int) -> Workload:
    return Workload(build, data(n, torch.Generator().manual_seed(seed)), criterion)


def bert(n: int = SIZE, seed: int = 0) -> Workload:
    return _workload(_bert, _classification, nn.CrossEntropyLoss(), n, seed)


def roberta(n: int = SIZE, seed: int = 0) -> Workload:
    return _workload(_roberta, _classification, nn.CrossEntropyLoss(), n, seed)


def distilbert(n: int = SIZE, seed: int = 0) -> Workload:
    return _workload(_distilbert, _classification, nn.CrossEntropyLoss(), n, seed)


def gpt2(n: int = SIZE, seed: int = 0) -> Workload:
    return _workload(_gpt2, _causal_lm, SequenceCrossEntropy(), n, seed)


def gpt2_small(n: int = SIZE, seed: int = 0) -> Workload:
    """GPT-2 small (12 layers, hidden 768, vocabulary 50257), sequences of 64 tokens."""
    vocab = transformers.GPT2Config().vocab_size
    return _workload(partial(_gpt2, transformers.GPT2Config()), partial(_causal_lm, vocab=vocab),
                     SequenceCrossEntropy(), n, seed)


def t5(n: int = SIZE, seed: int = 0) -> Workload:
    return _workload(_t5, _seq2seq, SequenceCrossEntropy(), n, seed)


def bart(n: int = SIZE, seed: int = 0) -> Workload:
    return _workload(_bart, partial(_classification, eos_last=True), nn.CrossEntropyLoss(), n, seed)


def vit(n: int = SIZE, seed: int = 0) -> Workload:
    return _workload(_vit, _images, nn.CrossEntropyLoss(), n, seed)


def llama(n: int = SIZE, seed: int = 0) -> Workload:
    build = partial(_decoder, transformers.LlamaForCausalLM, transformers.LlamaConfig)
    return _workload(build, _causal_lm, SequenceCrossEntropy(), n, seed)


def qwen2(n: int = SIZE, seed: int = 0) -> Workload:
    build = partial(_decoder, transformers.Qwen2ForCausalLM, transformers.Qwen2Config)
    return _workload(build, _causal_lm, SequenceCrossEntropy(), n, seed)


def bert_lora(n: int = SIZE, seed: int = 0) -> Workload:
    return _workload(_bert_lora, _classification, nn.CrossEntropyLoss(), n, seed)


def llama_lora(n: int = SIZE, seed: int = 0) -> Workload:
    return _workload(_llama_lora, _causal_lm, SequenceCrossEntropy(), n, seed)


#: The benchmark's models by name (``gpt2_small`` is left out: it is for an accelerator).
MODELS: dict[str, Callable[[], Workload]] = {
    "bert": bert, "roberta": roberta, "distilbert": distilbert, "gpt2": gpt2, "t5": t5, "bart": bart,
    "vit": vit, "llama": llama, "qwen2": qwen2, "bert_lora": bert_lora, "llama_lora": llama_lora,
}
