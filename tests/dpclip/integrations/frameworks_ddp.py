"""A framework's multi-process run, as its users launch it (2 gloo processes on CPU).

    python -m torch.distributed.run --nproc_per_node 2 frameworks_ddp.py trainer OUT SIGMA STEPS [RESUME]
    python frameworks_ddp.py lightning OUT SIGMA STEPS [RESUME]   (Lightning starts rank 1 itself)
    python -m torch.distributed.run --nproc_per_node 2 frameworks_ddp.py accelerate OUT SIGMA STEPS [RESUME]

Each rank saves OUT/rank{r}.pt: its parameters, the engine's steps and ε, and what the
framework logged. Float64 models; the sampling seed is fixed (7), the noise seed is not.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

N, B, K, C, LR, DELTA = 64, 4, 2, 0.5, 0.5, 1e-5


def trainer_run(out: str, sigma: float, steps: int, resume: str | None) -> None:
    import transformers

    from dpclip.integrations.transformers import DPTrainer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = bert().double()
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=B, gradient_accumulation_steps=K, learning_rate=LR,
        optim="sgd", lr_scheduler_type="constant", max_steps=steps, logging_steps=1, save_strategy="steps",
        save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, ddp_backend="gloo",
    )
    trainer = DPTrainer(
        model=model, args=args, train_dataset=examples(), noise_multiplier=sigma, target_delta=DELTA,
        max_grad_norm=C, accountant="rdp", sample_generator=torch.Generator().manual_seed(7),
    )
    trainer.train(resume_from_checkpoint=resume)
    logged = [(e["step"], e["epsilon"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    save(out, model, trainer.privacy_engine, logged)


def lightning_run(out: str, sigma: float, steps: int, resume: str | None) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from dpclip.integrations.lightning import DPCallback

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 3))
            self.criterion = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.criterion(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    torch.manual_seed(0)
    model = Classifier().double()
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(N, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N,), generator=gen))
    privacy = DPCallback(
        noise_multiplier=sigma, max_grad_norm=C, target_delta=DELTA, accountant="rdp",
        sample_generator=torch.Generator().manual_seed(7),
    )
    checkpoints = ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, accumulate_grad_batches=K,
        callbacks=[privacy, checkpoints], logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=B), ckpt_path=resume)
    save(out, model, privacy.privacy_engine, [])


def accelerate_run(out: str, sigma: float, steps: int, resume: str | None) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    import dpclip

    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
    assert dist.is_initialized() and dist.get_world_size() == 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 3)).double()
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(N, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N,), generator=gen))
    model = accelerator.prepare(model)  # DistributedDataParallel: before make_private
    engine = dpclip.PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(data, batch_size=B), noise_multiplier=sigma, max_grad_norm=C, accumulation_steps=K,
        sample_generator=torch.Generator().manual_seed(7),
    )
    optimizer, loader = accelerator.prepare(optimizer, loader)
    accelerator.register_for_checkpointing(engine)
    if resume:
        accelerator.load_state(resume)
    while engine.steps < steps:
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(criterion(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
            if engine.steps == 2 and not resume and optimizer.optimizer.micro_batches_accumulated == 0:
                accelerator.save_state(os.path.join(out, "state-2"))
            if engine.steps == steps:
                break
    save(out, model.module, engine, [])


def bert():
    import transformers

    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=8, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def examples() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (N, 8), generator=gen)
    labels = torch.randint(0, 3, (N,), generator=gen)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(N)]


def save(out: str, model: nn.Module, engine, logged) -> None:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "steps": engine.steps,
            "epsilon": engine.get_epsilon(DELTA),
            "sample_rate": engine.plan.sample_rate,
            "logged": logged,
            "world": dist.get_world_size() if dist.is_initialized() else 1,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    framework, out, sigma, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    resume = sys.argv[5] if len(sys.argv) > 5 else None
    torch.set_num_threads(1)
    {"trainer": trainer_run, "lightning": lightning_run, "accelerate": accelerate_run}[framework](out, sigma, steps, resume)
    import torch.distributed as dist

    if dist.is_initialized():  # left open, gloo's threads can abort the process at exit
        dist.barrier()
        dist.destroy_process_group()
    # (and they still could in the interpreter's teardown: leave without it)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
