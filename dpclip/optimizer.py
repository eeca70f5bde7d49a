"""The accumulating DP optimizer: one noisy, accounted update per logical batch.

Each micro-batch's clipped gradient sum goes into an accumulator that
``zero_grad()`` never touches. When the logical batch is complete, ``step()``
sets ``param.grad = (S + N(0, σ²C²·I)) / L``, runs the user's optimizer and
records one event in the ledger. L is the *expected* logical batch size:
dividing by the realised size would leak it (Abadi et al. 2016 normalise by
the expected lot size too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.profiler import record_function
from torch.optim import Optimizer

from accounting import Event, Ledger
from dpclip.clipping import NonFiniteNormError, PerSampleClipper
from dpclip.sampling import MicroBatchSchedule
from dpclip.secure import SecureRandom

__all__ = ["DPOptimizer", "LogicalBatchError", "private_gradient"]


class LogicalBatchError(RuntimeError):
    """``step()`` or ``backward()`` does not match the logical-batch boundary."""


def private_gradient(
    clipped_sum: torch.Tensor,
    *,
    noise_std: float,
    expected_batch_size: float,
    generator: torch.Generator | SecureRandom,
    inplace: bool = False,
) -> torch.Tensor:
    """The DP-SGD gradient (S + N(0, noise_std² I)) / L for one parameter.

    Args:
        clipped_sum: S, the sum of clipped per-sample gradients over the logical batch.
        noise_std: σ·C, the noise standard deviation in gradient units (0: no noise).
        expected_batch_size: L, the expected logical batch size (not the realised one).
        generator: where the noise comes from. A ``torch.Generator`` on another
            device than S draws the noise there and moves it. A
            ``SecureRandom`` (secure mode) draws from the OS's cryptographic
            generator, hardened against floating-point attacks, computed on
            S's device.
        inplace: write the result into ``clipped_sum`` and return it.
    """
    if not isinstance(generator, (torch.Generator, SecureRandom)):
        raise ValueError(
            "Expected generator to be a torch.Generator or a dpclip.secure.SecureRandom, "
            f"got {type(generator).__name__}"
        )
    if noise_std == 0.0:
        return clipped_sum.div_(expected_batch_size) if inplace else clipped_sum / expected_batch_size
    if isinstance(generator, SecureRandom):
        noise = generator.normal(
            clipped_sum.shape, noise_std, dtype=clipped_sum.dtype, device=clipped_sum.device
        )
    else:
        noise = torch.normal(
            0.0,
            noise_std,
            size=clipped_sum.shape,
            generator=generator,
            device=generator.device,
            dtype=clipped_sum.dtype,
        ).to(clipped_sum.device)
    if inplace:
        return clipped_sum.add_(noise).div_(expected_batch_size)
    return noise.add_(clipped_sum).div_(expected_batch_size)


class DPOptimizer(Optimizer):
    """Wraps a ``torch.optim`` optimizer; the training loop stays as it was.

    Two loop styles give the same updates:
    1. ``step()`` and ``zero_grad()`` after every micro-batch (BatchMemoryManager
       style): a ``step()`` inside a logical batch is skipped (returns None).
    2. ``backward()`` on every micro-batch, ``step()`` once the logical batch's
       micro-batches are all in (Hugging Face style).
    A ``step()`` that fits neither, or a ``backward()`` past the end of a
    logical batch, raises ``LogicalBatchError`` naming both counts and leaves
    the accumulator as it was.

    Args:
        optimizer: the user's optimizer over (a subset of) the model's trainable parameters.
        clipper: per-sample clipping of the model.
        noise_multiplier: σ, noise std divided by max_grad_norm (unitless, >= 0).
        max_grad_norm: C, per-sample L2 clipping bound.
        expected_batch_size: L, the expected logical batch size.
        schedule: micro-batches per logical batch.
        ledger: receives one event per optimizer step.
        step_event: the mechanism of a step, given how many micro-batches it
            summed (empty ones included).
        step_guard: called with a step's event before noise is drawn or any
            parameter changes; raising refuses the step (the budget cap).
        step_callbacks: called after each optimizer step, once it is recorded.
        generator: noise source.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        clipper: PerSampleClipper,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        schedule: MicroBatchSchedule,
        ledger: Ledger,
        step_event: Callable[[int], Event],
        generator: torch.Generator,
        step_guard: Callable[[Event], None] | None = None,
    ) -> None:
        # The wrapped optimizer keeps param_groups and state; no super().__init__ (as Opacus).
        self.original_optimizer = optimizer
        self.clipper = clipper
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.schedule = schedule
        self.ledger = ledger
        self.step_event = step_event
        self.step_guard = step_guard
        self.step_callbacks: list[Callable[[], None]] = []
        self.generator = generator
        self._accumulator: dict[torch.Tensor, torch.Tensor] = {}
        self._micro_batches = 0  # backward() calls in the current logical batch
        self._since_step_call = 0  # backward() calls since the last step() call
        self._planned: int | None = None  # micro-batches of the current logical batch
        self._pass = schedule.pass_id  # loader pass the current logical batch came from
        self._lost: str | None = None  # why the current logical batch cannot be applied

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters this optimizer updates."""
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.original_optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.original_optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.original_optimizer.defaults = defaults

    @property
    def micro_batches_accumulated(self) -> int:
        """Micro-batches in the accumulator since the last optimizer step."""
        return self._micro_batches

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise RuntimeError(
            "parameters cannot be added to a DP optimizer: clipping covers the model as it "
            "was made private; build the optimizer with all its parameters first"
        )

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``param.grad``; the accumulated clipped sum is kept until ``step()``."""
        self.original_optimizer.zero_grad(set_to_none)

    def accumulate(self, loss_per_sample: torch.Tensor) -> None:
        """Add this micro-batch's clipped gradient sum (called by the loss's ``backward()``).

        An empty micro-batch (B = 0) adds nothing but counts as a micro-batch.
        """
        planned = self._planned if self._planned is not None else self.schedule.next_logical_batch()
        if self._micro_batches >= planned:
            raise LogicalBatchError(
                f"backward() on micro-batch {self._micro_batches + 1} of a logical batch of "
                f"{planned} micro-batches: call optimizer.step() when the logical batch is complete"
            )
        if self._pass != self.schedule.pass_id and self._micro_batches > 0:
            raise LogicalBatchError(
                f"a new pass over the data loader began while the logical batch had "
                f"{self._micro_batches} of {planned} micro-batches: call optimizer.step() to "
                "apply it (one accounted step) before training on the new pass"
            )
        self._planned = planned
        self._pass = self.schedule.pass_id
        try:
            if loss_per_sample.numel() > 0:
                # S goes straight into the accumulator: no parameter-sized copy per micro-batch
                self.clipper.clipped_sum(loss_per_sample, out=self._accumulator)
            else:
                self.clipper.discard()
        except NonFiniteNormError:
            # Counted as an empty micro-batch: the logical-batch boundaries stay where the
            # sampler put them, and no non-finite value reaches the accumulator.
            self._micro_batches += 1
            self._since_step_call += 1
            raise
        except Exception as err:
            if self.clipper.writing:
                # part of S is in the accumulator and cannot be taken out: the logical batch
                # is lost; its step() says so instead of applying it (boundaries kept)
                self.clipper.writing = False
                self._lost = f"{type(err).__name__}: {err}"
                self._micro_batches += 1
                self._since_step_call += 1
            raise
        self._micro_batches += 1
        self._since_step_call += 1

    def _reset_logical_batch(self) -> None:
        self._accumulator = {}
        self._micro_batches = 0
        self._since_step_call = 0
        self._planned = None

    def add_empty_micro_batch(self) -> None:
        """Count a micro-batch with no examples without running the model.

        Poisson micro-batches can be empty; ``nn.MultiheadAttention`` cannot run
        a forward pass on an empty batch, so a loop over such a model calls this
        instead of ``criterion(model(x), y).backward()`` when ``len(y) == 0``.
        """
        self.accumulate(torch.empty(0))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply one DP update if the logical batch is complete, else skip (loop style 1).

        A logical batch cut short by a new pass over the loader (a ``break``)
        is applied as it is: a subset of one Poisson draw, accounted as one step.

        Returns the closure's loss (or None); None for a skipped step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        n, since = self._micro_batches, self._since_step_call
        interrupted = n > 0 and self._pass != self.schedule.pass_id
        if since == 0 and not interrupted:
            raise LogicalBatchError(
                "step() called with no backward() since the previous step(): "
                f"{n} micro-batches accumulated"
            )
        planned = int(self._planned)  # set by every backward(), and n > 0 or since > 0
        if n < planned and not interrupted:
            if since == 1:
                self._since_step_call = 0
                return None
            raise LogicalBatchError(
                f"step() after {n} micro-batches, but the logical batch has {planned} "
                f"micro-batches (step after every micro-batch, or once after all {planned})"
            )
        if self._lost is not None:
            reason, self._lost = self._lost, None
            self._reset_logical_batch()
            raise LogicalBatchError(
                "this logical batch was not applied: adding a micro-batch's clipped gradients "
                f"into the accumulator failed part-way ({reason}); no step was taken or "
                "recorded, and training can go on with the next logical batch"
            )
        event = self.step_event(n)
        if self.step_guard is not None:
            self.step_guard(event)  # may refuse: nothing has changed yet
        noise_std = self.noise_multiplier * self.max_grad_norm
        # the accumulator becomes the noisy gradient in place: from here on, whatever
        # happens (an error in the noise or in the user's step), it is never used again
        accumulator = self._accumulator
        self._reset_logical_batch()
        with record_function("dpclip.noise"):
            for p in self.params:
                s = accumulator.get(p)
                if s is None:
                    s = torch.zeros_like(p)
                p.grad = private_gradient(
                    s,
                    noise_std=noise_std,
                    expected_batch_size=self.expected_batch_size,
                    generator=self.generator,
                    inplace=True,
                )
        with record_function("dpclip.optimizer_step"):
            self.original_optimizer.step()
        self.ledger.record(event)
        for callback in self.step_callbacks:
            callback()
        return loss

    def __repr__(self) -> str:
        return (
            f"DPOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier}, "
            f"max_grad_norm={self.max_grad_norm}, expected_batch_size={self.expected_batch_size})"
        )
