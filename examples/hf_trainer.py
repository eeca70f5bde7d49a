"""Train a small ViT privately with the Hugging Face Trainer (dpclip's DPTrainer).

Run: python examples/hf_trainer.py [--epochs 3]
Needs: pip install 'dpclip[transformers]'

Nothing is downloaded: the model is built from a config and the data is
scikit-learn's digits (8x8 images), as a list of {"pixel_values", "labels"} rows.
A pretrained checkpoint is simulated by a short non-private `Trainer` run on a
"public" third of the training data; `DPTrainer` then fine-tunes on the other two
thirds, which the privacy report covers.

The lines that differ from non-private training: `DPTrainer` instead of `Trainer`,
with σ, δ (and optionally a cap on ε). TrainingArguments keep their meaning:
per_device_train_batch_size is the micro-batch B = 16, gradient_accumulation_steps
= 4 makes the expected logical batch L = 64 (Poisson sampling at q = L/N), and
max_grad_norm is the per-example clipping bound C.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import transformers
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dpclip.integrations.transformers import DPTrainer

DELTA = 1e-5


def digits() -> tuple[list[dict], list[dict]]:
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    train, test = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=labels)
    rows = lambda idx: [{"pixel_values": images[i], "labels": labels[i]} for i in idx]  # noqa: E731
    return rows(train), rows(test)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="private fine-tuning epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=3, help="non-private epochs on the public third")
    parser.add_argument("--noise-multiplier", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch B")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    train, test = digits()
    config = transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=10,
    )
    model = transformers.ViTForImageClassification(config)
    public, private = train[: len(train) // 3], train[len(train) // 3 :]
    accuracy = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}  # noqa: E731
    with tempfile.TemporaryDirectory() as output_dir:
        settings = dict(output_dir=output_dir, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
        pretraining = transformers.Trainer(
            model=model, train_dataset=public, compute_metrics=accuracy,
            args=transformers.TrainingArguments(
                per_device_train_batch_size=32, num_train_epochs=args.pretrain_epochs, learning_rate=2e-3,
                logging_strategy="no", **settings,
            ),
        )
        pretraining.train()
        before = pretraining.evaluate(eval_dataset=test)["eval_accuracy"]
        print(f"after public pretraining: test accuracy {before:.3f}")
        training_args = transformers.TrainingArguments(
            per_device_train_batch_size=args.batch_size,  # B
            gradient_accumulation_steps=4,    # k: L = 4·B
            max_grad_norm=1.0,                # C, per example
            num_train_epochs=args.epochs,
            logging_steps=10,
            **settings,
        )
        trainer = DPTrainer(
            model=model, args=training_args, train_dataset=private, compute_metrics=accuracy,
            optimizers=(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9), None),
            noise_multiplier=args.noise_multiplier, target_delta=DELTA,
        )
        trainer.train()
        metrics = trainer.evaluate(eval_dataset=test)
    print(f"test accuracy {metrics['eval_accuracy']:.3f}, "
          f"ε = {trainer.privacy_engine.get_epsilon(DELTA):.2f} (δ = {DELTA:g})")
    print()
    print(trainer.privacy_engine.report(delta=DELTA))


if __name__ == "__main__":
    main(sys.argv[1:])
