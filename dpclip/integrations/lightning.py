"""DP training with PyTorch Lightning: ``DPCallback``.

A ``LightningModule`` trains privately with its usual ``training_step`` (returning
the mean loss of the batch, computed with its loss module ``self.criterion``) and
the ``Trainer``'s usual ``accumulate_grad_batches=k``::

    trainer = L.Trainer(accumulate_grad_batches=4,
                        callbacks=[DPCallback(noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-5)])
    trainer.fit(module, train_dataloaders=loader)   # loader's batch_size: the micro-batch B

At fit start the callback makes the module, its one optimizer, ``self.criterion``
and the train loader private (dpclip's Poisson loader; L = k·B). The criterion then
returns a scalar tensor whose ``backward()`` clips each example's gradient; the
optimizer adds the noise once per step. ε is logged with ``self.log``; checkpoints
carry the privacy state (the callback's state) and resume bit-exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import GradientAccumulationScheduler
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from dpclip.distributed import stop_ddp_sync
from dpclip.engine import PrivacyEngine
from dpclip.loss import DPCriterion

__all__ = ["DPCallback"]


class _TensorCriterion(nn.Module):
    """The private criterion, returning ``DPLoss.as_tensor()`` (Lightning takes tensors)."""

    def __init__(self, criterion: DPCriterion, original: nn.Module) -> None:
        super().__init__()
        self.dp_criterion = criterion
        self.original = original

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.dp_criterion(*args, **kwargs).as_tensor()


class _Batches:
    """dpclip's loader as a plain iterable of micro-batches, one pass a Lightning epoch.

    Its length is always a whole pass: after a resume inside a pass, dpclip's loader
    yields the rest of that pass while Lightning counts on from the restored batch
    index, so the epoch ends where the uninterrupted one would."""

    def __init__(self, loader: DataLoader, micro_batches_per_pass: int) -> None:
        self.loader = loader
        self.micro_batches_per_pass = micro_batches_per_pass

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        return self.micro_batches_per_pass


class DPCallback(pl.Callback):
    """Makes a Lightning fit differentially private (DP-SGD with ordinary accumulation).

    Args:
        noise_multiplier: σ, noise std divided by max_grad_norm.
        max_grad_norm: C, the per-example clipping bound (L2).
        target_delta: δ at which ε is logged and a cap is kept.
        accountant: "prv" (default), "pld", "rdp" or "gdp".
        max_epsilon: a budget cap at ``target_delta``: training stops at the last
            step that stays within it.
        criterion: the module attribute holding the loss module that
            ``training_step`` calls (``nn.CrossEntropyLoss()`` etc., reduction
            "mean" or "sum").
        clipping, memory, noise_generator, sample_generator: as in ``make_private``.

    The ``Trainer``'s ``accumulate_grad_batches`` is k; the loader's batch size is B.
    ``callback.privacy_engine`` is the ``dpclip.PrivacyEngine`` (``report(delta)``).
    Logged at each optimizer step (every ``log_every_n_steps``): ``epsilon`` and
    ``privacy_steps``.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        target_delta: float,
        accountant: str = "prv",
        max_epsilon: float | None = None,
        criterion: str = "criterion",
        clipping: str | Mapping[str, str] = "auto",
        memory: str = "auto",
        noise_generator: torch.Generator | None = None,
        sample_generator: torch.Generator | None = None,
    ) -> None:
        import accounting

        accounting.accountant.validate_delta(target_delta)
        if not isinstance(criterion, str):
            raise ValueError(
                f"Expected criterion to be the name of the module's loss attribute, got {criterion!r}"
            )
        self.privacy_engine = PrivacyEngine(accountant=accountant)
        self.target_delta = target_delta
        self._criterion_name = criterion
        self._settings = dict(
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, max_epsilon=max_epsilon,
            target_delta=None if max_epsilon is None else target_delta, clipping=clipping, memory=memory,
            noise_generator=noise_generator, sample_generator=sample_generator,
        )
        self._pending_state: dict[str, Any] | None = None
        self._boundary_state: dict[str, Any] | None = None  # the state at the last applied step
        self._logged_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "DPCallback needs automatic optimization: with manual optimization, use dpclip's "
                "make_private in your own loop (the optimizer and loss it returns)"
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip the noisy "
                "gradient a second time, without privacy: leave it unset and give the per-example "
                "bound as DPCallback(max_grad_norm=C)"
            )
        k = trainer.accumulate_grad_batches
        if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):
            raise ValueError(
                "a GradientAccumulationScheduler changes accumulate_grad_batches during the fit, "
                "and DPCallback's logical batch (k·B, what ε is accounted for) is fixed when the "
                "fit starts: give a constant Trainer(accumulate_grad_batches=k) instead"
            )
        limit = trainer.limit_train_batches
        if (isinstance(limit, int) and limit % k) or (isinstance(limit, float) and limit != 1.0):
            raise ValueError(
                f"Trainer(limit_train_batches={limit!r}) with accumulate_grad_batches={k}: Lightning "
                "would step after a partial logical batch at each epoch's end, and dpclip refuses "
                "a step that does not complete its logical batch. Give limit_train_batches as a "
                f"whole number of logical batches (a multiple of {k}), or max_steps"
            )
        if "16" in str(trainer.precision) and "bf16" not in str(trainer.precision):
            why = (
                "its loss scaler would rescale dpclip's clipped sums" if "mixed" in str(trainer.precision)
                else "float16 weights are not taken by the callback"
            )
            raise ValueError(
                f"DPCallback does not take precision={trainer.precision!r} ({why}): use 'bf16-mixed' or 32"
            )
        if not isinstance(getattr(pl_module, self._criterion_name, None), nn.Module):
            raise ValueError(
                f"DPCallback needs the loss module training_step uses as self.{self._criterion_name} "
                "(e.g. self.criterion = nn.CrossEntropyLoss()); name another attribute with "
                "DPCallback(criterion=...)"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.privacy_engine.plan is not None:
            raise RuntimeError("this DPCallback already made a fit private: use a new one per fit")
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"DPCallback takes one optimizer (configure_optimizers gave {len(trainer.optimizers)})"
            )
        if trainer.ckpt_path is not None and self._pending_state is None:
            raise ValueError(
                f"the checkpoint {trainer.ckpt_path} has no dpclip privacy state (it is not from a "
                "fit with DPCallback): resuming from it would start ε at 0"
            )
        source = trainer.fit_loop._data_source
        loader = source.dataloader()
        criterion = getattr(pl_module, self._criterion_name)
        _, optimizer, dp_criterion, dp_loader = self.privacy_engine.make_private(
            module=pl_module, optimizer=trainer.optimizers[0], criterion=criterion, data_loader=loader,
            accumulation_steps=trainer.accumulate_grad_batches, **self._settings,
        )
        trainer.strategy.optimizers = [optimizer]
        setattr(pl_module, self._criterion_name, _TensorCriterion(dp_criterion, criterion))
        # not a DataLoader to Lightning: it would replace the sampler with a DistributedSampler
        # (dpclip draws one global logical batch and gives each rank its share)
        plan = self.privacy_engine.plan
        source.instance = _Batches(dp_loader, plan.steps_per_epoch * plan.accumulation_steps)
        # the strategy wrapped the module in DistributedDataParallel: its own all-reduce stays
        # off (its no_sync() during accumulation restores the flag)
        stop_ddp_sync(trainer.strategy.model)
        if self._pending_state is not None:
            self.privacy_engine.load_state_dict(self._pending_state)
            self._pending_state = None
        self._boundary_state = self.privacy_engine.state_dict()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        engine = self.privacy_engine
        step = engine.steps
        if step == self._logged_step:
            return
        self._logged_step = step
        if engine.optimizer.micro_batches_accumulated == 0:
            self._boundary_state = engine.state_dict()
        if step % trainer.log_every_n_steps == 0:
            pl_module.log("epsilon", engine.get_epsilon(self.target_delta), on_step=True, on_epoch=False)
            pl_module.log("privacy_steps", float(step), on_step=True, on_epoch=False)
        if engine.steps_remaining == 0:
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapped = getattr(pl_module, self._criterion_name, None)
        if isinstance(wrapped, _TensorCriterion):  # the module leaves with its own loss
            setattr(pl_module, self._criterion_name, wrapped.original)

    def state_dict(self) -> dict[str, Any]:
        engine = self.privacy_engine
        if engine.plan is None:
            return {}
        in_progress = engine.optimizer.micro_batches_accumulated
        if in_progress == 0:
            return {"engine": engine.state_dict(), "micro_batches_in_progress": 0}
        # A checkpoint inside a logical batch (ModelCheckpoint(every_n_train_steps) saves again
        # at the first batch after a resume): its clipped sums cannot be saved. Saving goes on;
        # resuming from it is refused (load_state_dict).
        return {"engine": self._boundary_state, "micro_batches_in_progress": in_progress}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "engine" not in state_dict:
            raise ValueError(
                "the checkpoint has no dpclip privacy state for this DPCallback: resuming from it "
                "would start ε at 0. Resume from a checkpoint of a private fit"
            )
        if state_dict.get("micro_batches_in_progress"):
            raise ValueError(
                f"the checkpoint was written {state_dict['micro_batches_in_progress']} micro-batch(es) "
                "into a logical batch, whose clipped sums a checkpoint cannot hold: resume from a "
                "checkpoint written at an optimizer step (as ModelCheckpoint(every_n_train_steps=...) "
                "writes them, except right after a resume)"
            )
        self._pending_state = state_dict["engine"]
