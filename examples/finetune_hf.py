"""Fine-tune a small Hugging Face model privately, with gradient accumulation (and LoRA).

Run: python examples/finetune_hf.py [--model vit|roberta] [--lora] [--epochs 3]
Needs: pip install 'dpclip[transformers,peft]' (peft only for --lora).

Nothing is downloaded: the model is built from a config and the data is
scikit-learn's digits, which ships inside scikit-learn. A pretrained checkpoint
is simulated by a short non-private training on a "public" third of the data;
the private fine-tuning then uses the other two thirds, with the privacy report
covering them. For the text model each 8x8 image becomes a sequence of 64 "pixel
tokens" (intensities 0..16), so the model really is a sequence classifier fed
token ids; for ViT the images stay images.

The model and its forward call are used as built: the only dpclip lines are the
engine, make_private and the report. The loader's batch is the micro-batch B = 16;
accumulation_steps = 4 makes the expected logical batch L = 64, drawn by Poisson
sampling at q = L/N.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

import dpclip

DELTA = 1e-5


class Classifier(nn.Module):
    """The user's usual wrapper: tensors in, logits out."""

    def __init__(self, hf_model: nn.Module, text: bool) -> None:
        super().__init__()
        self.hf = hf_model
        self.text = text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.text:
            return self.hf(input_ids=x, attention_mask=torch.ones_like(x)).logits
        return self.hf(pixel_values=x).logits


def build(name: str) -> Classifier:
    import transformers

    if name == "roberta":
        config = transformers.RobertaConfig(
            vocab_size=20, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=72, num_labels=10,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        model = transformers.RobertaForSequenceClassification(config)
    elif name == "vit":
        config = transformers.ViTConfig(
            image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128, num_labels=10,
        )
        model = transformers.ViTForImageClassification(config)
    else:
        raise ValueError(f"Expected --model to be roberta or vit, got {name!r}")
    return Classifier(model, text=name == "roberta")


def add_lora(model: Classifier, name: str) -> Classifier:
    """LoRA adapters on the attention's query and value projections; the head trains in full."""
    import peft

    task = "SEQ_CLS" if name == "roberta" else None
    model.hf = peft.get_peft_model(
        model.hf,
        peft.LoraConfig(r=8, lora_alpha=16, task_type=task,
                        target_modules=["query", "value"] if task else ["q_proj", "v_proj"],
                        modules_to_save=None if task else ["classifier"]),
    )
    return model


def pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """Non-private training on public data: the stand-in for a pretrained checkpoint."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True):
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            optimizer.zero_grad()


def data(text: bool):
    digits = load_digits()
    if text:  # pixel intensities as tokens; ids 0..16, plus 2 so that 0/1 stay free
        x = torch.tensor(digits.images.reshape(len(digits.images), -1), dtype=torch.long) + 2
    else:
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    return train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():  # evaluation records nothing
        correct = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return correct


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit", choices=["vit", "roberta"])
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (and the head) only")
    parser.add_argument("--epochs", type=int, default=3, help="private fine-tuning epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=8, help="non-private epochs on the public third")
    parser.add_argument("--noise-multiplier", type=float, default=0.8)
    parser.add_argument("--lr", type=float, help="SGD learning rate (default 0.3 with --lora, else 0.1)")
    args = parser.parse_args(argv)
    lr = args.lr if args.lr is not None else (0.3 if args.lora else 0.1)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x_train, x_test, y_train, y_test = data(args.model == "roberta")
    public = len(x_train) // 3
    model = build(args.model)
    pretrain(model, x_train[:public], y_train[:public], args.pretrain_epochs)
    x_train, y_train = x_train[public:], y_train[public:]  # the private data
    if args.lora:
        model = add_lora(model, args.model)
    print(f"after public pretraining: test accuracy {accuracy(model, x_test, y_test):.3f}")
    # from model.parameters(), as usual: frozen base weights (LoRA) get no noise and no update
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    engine = dpclip.PrivacyEngine(accountant="prv")
    model, optimizer, criterion, train_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x_train, y_train), batch_size=16),
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=1.0,
        accumulation_steps=4,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model}{' + LoRA' if args.lora else ''}: {trainable} trainable parameters, "
          f"N={engine.plan.dataset_size}, L={engine.plan.logical_batch_size}, q={engine.plan.sample_rate:.4f}")
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for i, (xb, yb) in enumerate(train_loader):  # micro-batches; loop style 2
            if len(yb):
                criterion(model(xb), yb).backward()
            else:
                optimizer.add_empty_micro_batch()  # an empty Poisson micro-batch
            if (i + 1) % 4 == 0:
                optimizer.step()
                optimizer.zero_grad()
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, x_test, y_test):.3f}, "
              f"ε = {engine.get_epsilon(DELTA):.2f} (δ = {DELTA:g}), {time.perf_counter() - start:.0f} s")
    print()
    print(engine.report(delta=DELTA))


if __name__ == "__main__":
    main(sys.argv[1:])
