"""DP training with the Hugging Face ``Trainer``: ``DPTrainer``.

The user's ``TrainingArguments`` keep their meaning: ``per_device_train_batch_size``
is the micro-batch B, ``gradient_accumulation_steps`` is k (expected logical batch
L = k·B, sample rate q = L/N), ``max_grad_norm`` is the per-example clipping bound C
(the Trainer's own clipping of the summed gradient is switched off: it would be a
second, non-private clipping). The train loader is dpclip's Poisson sampler over
the train dataset, with the Trainer's collator.

Each example's loss comes from the model's logits and the batch's ``labels``
(``PerExampleLoss``: language modelling, masked/token/seq2seq, sequence
classification), or from ``per_example_loss(outputs, labels) -> [B]``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader, IterableDataset

import accounting
from dpclip.distributed import stop_ddp_sync, world_of
from dpclip.engine import PrivacyEngine, plan_logical_batches
from dpclip.optimizer import DPOptimizer

__all__ = ["DPTrainer", "PerExampleLoss", "ENGINE_STATE_NAME"]

#: the privacy state's file in a Trainer checkpoint folder
ENGINE_STATE_NAME = "dpclip_engine.json"

_KINDS = ("causal_lm", "tokens", "regression", "single_label", "multi_label")


class PerExampleLoss(nn.Module):
    """ℓ_i of each example from a model's ``logits`` and ``labels``, as the model's own
    loss computes it, but per example.

    Args:
        kind: "causal_lm" (next-token cross-entropy: logits at t predict labels at
            t+1), "tokens" (cross-entropy per position: masked LM, token
            classification, seq2seq), "regression" (squared error),
            "single_label" (cross-entropy) or "multi_label" (binary cross-entropy
            with logits).
        ignore_index: labels with this value are left out ("causal_lm", "tokens").
        label_smoothing: the cross-entropy kinds' smoothing (``TrainingArguments``'
            ``label_smoothing_factor``, as the Trainer's ``LabelSmoother``).

    Token losses are the mean over the example's own labelled tokens (not over the
    batch's tokens, which would make one example's weight depend on the others);
    an example with no labelled token has loss 0.
    """

    def __init__(
        self, kind: str, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"Expected kind to be one of {_KINDS}, got {kind!r}")
        if label_smoothing and kind in ("regression", "multi_label"):
            raise ValueError(f"label smoothing applies to cross-entropy losses, not to a {kind} head")
        self.kind, self.ignore_index, self.reduction = kind, ignore_index, reduction
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _reduce(self._per_example(logits, labels), self.reduction)

    def _per_example(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = logits.shape[0]
        # half-precision logits (bf16 autocast) are upcast, as the models' own losses do
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.kind in ("causal_lm", "tokens"):
            if self.kind == "causal_lm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            token = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=self.ignore_index, reduction="none", label_smoothing=self.label_smoothing,
            ).view(batch, -1)
            counted = (labels != self.ignore_index).reshape(batch, -1).sum(dim=1)
            return token.sum(dim=1) / counted.clamp(min=1)
        if self.kind == "regression":
            squared = F.mse_loss(logits.reshape(labels.shape), labels.to(logits.dtype), reduction="none")
            return squared.reshape(batch, -1).mean(dim=1)
        if self.kind == "single_label":
            return F.cross_entropy(
                logits.reshape(batch, -1), labels.reshape(batch), reduction="none",
                label_smoothing=self.label_smoothing,
            )
        bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return bce.reshape(batch, -1).mean(dim=1)


def _base_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)  # a peft model
    return get() if callable(get) else model


def loss_kind(model: nn.Module, labels: torch.Tensor | None = None) -> str:
    """The ``PerExampleLoss`` kind of a Hugging Face model's own loss.

    Raises:
        ValueError: the model's head is none of the kinds (pass ``per_example_loss``).
    """
    from transformers.models.auto import modeling_auto as auto

    base = _base_model(model)
    name = type(base).__name__
    loss_type = getattr(base, "loss_type", None)
    if name in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or loss_type == "ForCausalLM":
        return "causal_lm"
    token_heads = (
        *auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.values(),
        *auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values(),
        *auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values(),
    )
    if name in token_heads or loss_type in ("ForMaskedLM", "ForTokenClassification", "ForConditionalGeneration"):
        return "tokens"
    classifiers = (
        *auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values(),
        *auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values(),
        *auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES.values(),
    )
    if name in classifiers or loss_type in ("ForSequenceClassification", "ForImageClassification"):
        config = base.config
        if config.problem_type is not None:
            return {"regression": "regression", "single_label_classification": "single_label",
                    "multi_label_classification": "multi_label"}[config.problem_type]
        if config.num_labels == 1:
            return "regression"
        if labels is not None and labels.dtype in (torch.long, torch.int):
            return "single_label"
        return "multi_label" if labels is not None else "single_label"
    raise ValueError(
        f"DPTrainer cannot tell which per-example loss a {name} computes: pass "
        "per_example_loss=fn, with fn(outputs, labels) returning one loss per example (shape [B])"
    )


class _CallableLoss(nn.Module):
    """A user's ``per_example_loss(outputs, labels) -> [B]`` as a criterion module."""

    def __init__(self, fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn, self.reduction = fn, "mean"

    def forward(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        return _reduce(self.fn(outputs, labels), self.reduction)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-example losses [B] reduced as a loss module's ``reduction`` says."""
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


class _PrivacySteps(transformers.TrainerCallback):
    """Stops training at the step after which the budget cap allows no other, and
    counts epochs in passes of dpclip's loader (a resumed pass goes on from where the
    checkpoint was, which the Trainer's own count, restarting the pass, does not know)."""

    def __init__(self, engine: PrivacyEngine) -> None:
        self.engine = engine

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.engine.plan is None:
            return control
        state.epoch = state.global_step / self.engine.plan.steps_per_epoch
        if self.engine.steps_remaining == 0:
            control.should_training_stop = True
        return control


class DPTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with DP-SGD: per-example clipping to
    ``max_grad_norm``, Gaussian noise once per optimizer step, Poisson logical batches,
    and the privacy spent logged with the loss.

    Takes the ``Trainer``'s arguments, plus (keyword only):

    Args:
        noise_multiplier: σ, noise std divided by max_grad_norm. Or:
        target_epsilon: the ε to reach at ``target_delta`` by the end of training
            (``num_train_epochs`` or ``max_steps``); σ is calibrated to it.
        target_delta: δ, at which ε is logged (required).
        max_grad_norm: C, the per-example clipping bound (L2). Default: the
            ``TrainingArguments``' ``max_grad_norm``; given both, they must agree.
        accountant: "prv" (default), "pld", "rdp" or "gdp".
        max_epsilon: a budget cap at ``target_delta``: training stops at the last
            step that stays within it.
        per_example_loss: ``fn(outputs, labels) -> [B]`` for a model head
            ``PerExampleLoss`` does not know (default: from the model's class).
        clipping, memory, noise_generator, sample_generator: as in ``make_private``.

    ``trainer.privacy_engine`` is the ``dpclip.PrivacyEngine`` (``report(delta)``,
    ``get_epsilon``); checkpoints carry its state in ``dpclip_engine.json``, and
    ``train(resume_from_checkpoint=...)`` continues bit-exactly.

    Logged with each training loss: ``epsilon`` (at ``target_delta``, this accountant),
    ``privacy_steps`` (optimizer steps accounted) and, with a cap,
    ``privacy_steps_remaining``. The logged loss is the mean loss over each logical
    batch's examples.
    """

    def __init__(
        self,
        *args: Any,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        max_grad_norm: float | None = None,
        accountant: str = "prv",
        max_epsilon: float | None = None,
        per_example_loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
        clipping: str | Mapping[str, str] = "auto",
        memory: str = "auto",
        noise_generator: torch.Generator | None = None,
        sample_generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                "DPTrainer needs exactly one of noise_multiplier (σ) and target_epsilon, got "
                f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}"
            )
        if target_delta is None:
            raise ValueError("DPTrainer needs target_delta (δ), at which ε is calibrated and logged")
        if per_example_loss is not None and not callable(per_example_loss):
            raise ValueError(f"Expected per_example_loss to be callable, got {type(per_example_loss).__name__}")
        if kwargs.get("model_init") is not None:
            raise ValueError(
                "DPTrainer does not take model_init (a new model per train() or trial): pass the model"
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "DPTrainer does not take compute_loss_func (a loss over the whole batch): pass "
                "per_example_loss=fn, with fn(outputs, labels) -> one loss per example"
            )
        optimizers = kwargs.get("optimizers")
        if optimizers is not None and isinstance(optimizers[0], DPOptimizer):
            raise ValueError("pass the plain torch optimizer to DPTrainer: it makes it private")
        self.privacy_engine = PrivacyEngine(accountant=accountant)
        super().__init__(*args, **kwargs)
        args_ = self.args
        if args_.n_gpu > 1:
            raise ValueError(
                f"DPTrainer does not take nn.DataParallel over {args_.n_gpu} GPUs in one process: "
                "launch one process per device (torchrun), which DPTrainer trains as one DP run"
            )
        if args_.fp16:
            raise ValueError(
                "DPTrainer does not take fp16=True (its loss scaler would rescale dpclip's "
                "clipped sums): use bf16=True, or float32"
            )
        trainer_bound = args_.max_grad_norm
        if max_grad_norm is None:
            if not trainer_bound or trainer_bound <= 0:
                raise ValueError(
                    "DPTrainer needs a per-example clipping bound: pass max_grad_norm=C, or set "
                    f"TrainingArguments(max_grad_norm=C) (it is {trainer_bound!r})"
                )
            max_grad_norm = float(trainer_bound)
        elif trainer_bound and trainer_bound > 0 and trainer_bound != max_grad_norm:
            default = type(args_).__dataclass_fields__["max_grad_norm"].default
            if trainer_bound != default:
                raise ValueError(
                    f"two clipping bounds: DPTrainer(max_grad_norm={max_grad_norm}) and "
                    f"TrainingArguments(max_grad_norm={trainer_bound}). dpclip clips each example "
                    "to one bound C and the Trainer's clipping of the summed gradient is off: "
                    "give C once"
                )
        # a copy: the Trainer must not clip the noisy sum again, and must not skip batches on
        # resume (dpclip's state continues the pass where it stopped)
        self.args = copy.copy(args_)
        self.args.max_grad_norm = 0.0
        self.args.ignore_data_skip = True
        self._privacy = dict(
            noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, target_delta=target_delta,
            max_grad_norm=max_grad_norm, max_epsilon=max_epsilon, clipping=clipping, memory=memory,
            noise_generator=noise_generator, sample_generator=sample_generator,
        )
        self._per_example_loss = per_example_loss
        self._dp_criterion: Any = None
        self._dp_loader: DataLoader | None = None
        self._logical_loss = [0.0, 0]  # Σ ℓ_i and example count of the logical batch so far
        self.add_callback(_PrivacySteps(self.privacy_engine))

    @property
    def target_delta(self) -> float:
        return self._privacy["target_delta"]

    def get_train_dataloader(self) -> DataLoader:
        """dpclip's Poisson loader over the train dataset (made private on first call,
        with the model and the Trainer's optimizer)."""
        if self._dp_loader is not None:
            return self._dp_loader
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "DPTrainer needs a map-style train_dataset (with __len__): Poisson sampling draws "
                "each example independently from the whole dataset"
            )
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        loader = DataLoader(
            dataset, batch_size=self._train_batch_size, collate_fn=collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )
        optimizer = self.create_optimizer()
        criterion = self._make_criterion()
        settings = dict(self._privacy)
        target_epsilon, target_delta = settings.pop("target_epsilon"), settings.pop("target_delta")
        sigma = settings.pop("noise_multiplier")
        k = self.args.gradient_accumulation_steps
        if target_epsilon is not None:
            plan = plan_logical_batches(
                loader, accumulation_steps=k, max_physical_batch_size=None, poisson_sampling=True,
                world_size=world_of(self.model).size,
            )
            sigma = accounting.calibrate_noise(
                target_epsilon=target_epsilon, delta=target_delta, sample_rate=plan.sample_rate,
                steps=self._planned_steps(plan.steps_per_epoch), method=self.privacy_engine.accountant,
            )
        _, dp_optimizer, dp_criterion, dp_loader = self.privacy_engine.make_private(
            module=self.model, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=sigma, accumulation_steps=k,
            target_delta=None if settings["max_epsilon"] is None else target_delta, **settings,
        )
        self.optimizer, self._dp_criterion, self._dp_loader = dp_optimizer, dp_criterion, dp_loader
        self._dp_optimizer = dp_optimizer
        return dp_loader

    def _planned_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run (max_steps, or num_train_epochs passes), for
        calibrating σ to target_epsilon."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        return math.ceil(self.args.num_train_epochs * steps_per_epoch)

    def _make_criterion(self) -> nn.Module:
        if self._per_example_loss is not None:
            if self.args.label_smoothing_factor:
                raise ValueError(
                    "label_smoothing_factor with per_example_loss: smooth the labels in your "
                    "per_example_loss (the Trainer's smoother works on the whole batch)"
                )
            return _CallableLoss(self._per_example_loss)
        return _LazyKind(self.model, self.args.label_smoothing_factor)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One micro-batch: forward, per-example losses, dpclip's clipped backward.

        Returns the logical batch's mean loss on its last micro-batch and 0 on the
        others, so that the Trainer's logged loss is the mean per-example loss."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError(
                "DPTrainer needs the batch's 'labels' for the per-example losses; the collator "
                f"gave {sorted(inputs)}. A head whose targets have other names (question "
                "answering's start_positions and end_positions) trains when the dataset gives them "
                "as one 'labels' tensor ([B, 2]), with TrainingArguments(label_names=['labels']) "
                "(the Trainer drops a column the model's forward does not take and label_names "
                "does not list) and per_example_loss=fn, fn(outputs, labels) -> one loss per "
                "example (shape [B])"
            )
        if labels.shape[0] == 0:  # an empty Poisson micro-batch: counted, nothing to clip
            self._dp_optimizer.add_empty_micro_batch()
            return self._logged_loss()
        base = _base_model(model)
        if (
            "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs
            and hasattr(base, "prepare_decoder_input_ids_from_labels")
        ):
            inputs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
        # with several processes the Trainer wraps the model in DistributedDataParallel after
        # make_private: its own all-reduce stays off (accelerate's no_sync restores the flag)
        stop_ddp_sync(model)
        outputs = model(**inputs)
        if self._per_example_loss is not None:
            loss = self._dp_criterion(outputs, labels)
        else:
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
            loss = self._dp_criterion(logits, labels)
        loss.backward()
        self._logical_loss[0] += float(loss.loss_per_sample.detach().sum())
        self._logical_loss[1] += loss.loss_per_sample.shape[0]
        return self._logged_loss()

    def _logged_loss(self) -> torch.Tensor:
        """0 inside a logical batch; on its last micro-batch, its mean per-example loss."""
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        totals = torch.tensor(self._logical_loss, dtype=torch.float64)
        self._logical_loss = [0.0, 0]
        if self._dp_optimizer.world.distributed:  # the logical batch is spread over the ranks
            torch.distributed.all_reduce(totals)
        return torch.tensor(float(totals[0] / totals[1].clamp(min=1)), device=self.args.device)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # the Trainer reads it before optimizer.step(), when dpclip has not yet written any
        # gradient: it would log 0. The update's norm is not logged.
        return None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with ε at target_delta and the steps accounted added to the
        training logs."""
        engine = self.privacy_engine
        if engine.plan is not None and ("loss" in logs or "train_loss" in logs):
            logs["epsilon"] = engine.get_epsilon(self.target_delta)
            logs["privacy_steps"] = engine.steps
            remaining = engine.steps_remaining
            if remaining is not None:
                logs["privacy_steps_remaining"] = remaining
        super().log(logs, start_time)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.privacy_engine.plan is not None and self.args.should_save:
            path = os.path.join(output_dir, ENGINE_STATE_NAME)
            with open(path + ".tmp", "w") as f:
                json.dump(self.privacy_engine.state_dict(), f)
            os.replace(path + ".tmp", path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ENGINE_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"the checkpoint {checkpoint} has no {ENGINE_STATE_NAME} (dpclip's privacy state: "
                "ledger, noise and sampling generators): resuming from it would start ε at 0. "
                "Resume from a DPTrainer checkpoint"
            )
        with open(path) as f:
            state = json.load(f)
        self.privacy_engine.load_state_dict(state)


class _LazyKind(nn.Module):
    """``PerExampleLoss`` of the kind the model's head computes, chosen at the first
    call (sequence classification needs the labels' dtype)."""

    def __init__(self, model: nn.Module, label_smoothing: float) -> None:
        super().__init__()
        self.reduction = "mean"
        self._model = [model]  # not a submodule
        self._label_smoothing = label_smoothing
        self._loss: PerExampleLoss | None = None

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._loss is None:
            kind = loss_kind(self._model[0], labels)
            self._loss = PerExampleLoss(kind, label_smoothing=self._label_smoothing)
        self._loss.reduction = self.reduction
        return self._loss(logits, labels)
