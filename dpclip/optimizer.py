"""The accumulating DP optimizer: one noisy, accounted update per logical batch.

Each micro-batch's clipped gradient sum goes into an accumulator that
``zero_grad()`` never touches. When the logical batch is complete, ``step()``
sets ``param.grad = (S + N(0, σ²C²·I)) / L``, runs the user's optimizer and
records one event in the ledger. L is the *expected* logical batch size:
dividing by the realised size would leak it (Abadi et al. 2016 normalise by
the expected lot size too).

``step()`` refuses, before anything changes, a ``param.grad`` that dpclip did
not write (it would be overwritten) and a parameter that clipping does not
cover (it would move by noise alone). A frozen parameter of the model
(``requires_grad`` False: frozen at or after ``make_private``, such as a LoRA
model's base weights in an optimizer built from ``model.parameters()``) gets no
noise and no update.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.autograd.profiler import record_function
from torch.optim import Optimizer

from accounting import Event, Ledger
from dpclip.clipping import NonFiniteNormError, PerSampleClipper
from dpclip.distributed import World, all_reduce_sums
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

    A micro-batch whose backward raised ``NonFiniteNormError`` counts as an empty
    one: catch the error, carry on with the loop and call ``step()`` as usual. A
    loop that ``continue``s past its ``step()`` works too: inside a logical batch
    that ``step()`` would be a skip anyway, and when the failed micro-batch is the
    last of its logical batch, its ``backward()`` applies the logical batch (runs
    ``step()``) before raising, so that the next forward sees the new parameters;
    a ``step()`` right after that is a no-op.

    Gradients from outside dpclip are refused at ``step()`` (and ``zero_grad()``,
    which would drop them silently): a per-example loss term belongs in the
    private loss (``criterion(out, y) + aux``, aux of shape [B]); a
    data-independent regulariser is backpropagated inside ``public_gradient()``.

    Args:
        optimizer: the user's optimizer over (a subset of) the model's trainable parameters.
        clipper: per-sample clipping of the model.
        noise_multiplier: σ, noise std divided by max_grad_norm (unitless, >= 0).
        max_grad_norm: C, per-sample L2 clipping bound.
        expected_batch_size: L, the expected logical batch size.
        schedule: micro-batches per logical batch.
        ledger: receives one event per optimizer step.
        step_event: the mechanism of a step, given how many micro-batches it
            summed (empty ones included) and the dataset indices of its examples
            as the loader handed them out (None when some micro-batch did not
            come from the DP loader).
        step_guard: called with a step's event before noise is drawn or any
            parameter changes; raising refuses the step (the budget cap).
        step_callbacks: called after each optimizer step, once it is recorded.
        generator: noise source.
        world: the processes training together (``dpclip.distributed``): at each step
            rank 0 adds the noise to its clipped sum and one all-reduce sums them over
            the ranks; L is then the logical batch of all ranks.
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
        generator: torch.Generator | SecureRandom,
        step_guard: Callable[[Event], None] | None = None,
        world: World = World(),
        accumulation_steps: int | None = None,
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
        self.world = world
        #: k, micro-batches per logical batch; None where it varies (max_physical_batch_size)
        self.accumulation_steps = accumulation_steps
        self._accumulator: dict[torch.Tensor, torch.Tensor] = {}
        self._micro_batches = 0  # backward() calls in the current logical batch
        self._since_step_call = 0  # backward() calls since the last step() call
        self._planned: int | None = None  # micro-batches of the current logical batch
        self._pass = schedule.pass_id  # loader pass the current logical batch came from
        self._examples: list[int] | None = []  # dataset indices of the logical batch (None: unknown)
        self._lost: str | None = None  # why the current logical batch cannot be applied
        self._skipped_since_step = 0  # of _since_step_call: non-finite micro-batches
        # the last backward() raised NonFiniteNormError after applying its logical batch
        self._applied_on_skip = False
        self._public: dict[torch.Tensor, torch.Tensor] = {}  # public_gradient() sums
        self._covered = set(clipper.params)
        self._names = {p: n for n, p in clipper.module.named_parameters()}
        # the p.grad each parameter had when dpclip last wrote or saw it, and its version:
        # any other p.grad (or an in-place change of it) comes from outside dpclip
        self._grads_seen: dict[torch.Tensor, tuple[weakref.ref, int]] = {}
        self._see_gradients()

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
        """Clear ``param.grad``; the accumulated clipped sum is kept until ``step()``.

        Raises ``RuntimeError`` (clearing nothing) if some ``param.grad`` was written
        outside dpclip: clearing it would drop that gradient silently.
        """
        self._check_outside_gradients()
        self.original_optimizer.zero_grad(set_to_none)
        self._see_gradients()

    @contextmanager
    def public_gradient(self) -> Iterator[None]:
        """Gradients computed by ``backward()`` inside this block are public: at the step
        that applies the logical batch they are added, as they are (not clipped, not
        noised, not divided by L), to the private gradient (S + noise) / L.

        Only for terms that do not depend on the training data, such as a regulariser
        on the weights (dpclip cannot check this: a data-dependent term here is not
        private)::

            loss.backward()                          # the private, per-example loss
            with optimizer.public_gradient():
                (1e-4 * model.fc.weight.square().sum()).backward()
            optimizer.step()

        Public gradients add up, as ``param.grad`` does, until that step: in loop
        style 1 (``step()`` after every micro-batch) compute the regulariser once per
        logical batch. ``param.grad`` is as it was outside the block. A per-example
        term belongs in the private loss instead: ``criterion(out, y) + aux`` with
        ``aux`` of shape [B].
        """
        params = self.params
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            yield
            for p in params:
                if p.grad is not None:
                    total = self._public.get(p)
                    self._public[p] = p.grad if total is None else total.add_(p.grad)
        finally:
            for p, g in zip(params, saved):
                p.grad = g

    def _see_gradients(self) -> None:
        self._grads_seen = {
            p: (weakref.ref(p.grad), p.grad._version) for p in self.params if p.grad is not None
        }

    def _check_outside_gradients(self) -> None:
        """Refuse a ``param.grad`` that dpclip did not write: another loss's ``backward()``
        or an in-place change (zeros, as ``zero_grad(set_to_none=False)`` leaves, are fine)."""
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            seen = self._grads_seen.get(p)
            if seen is not None and seen[0]() is g and seen[1] == g._version:
                continue
            if not bool(g.any()):
                continue
            name = self._names.get(p, f"of shape {tuple(p.shape)}")
            raise RuntimeError(
                f"param.grad of parameter {name!r} was written outside dpclip since dpclip last "
                "set it (by backward() of another loss, or an in-place change such as "
                "clip_grad_norm_): step() would overwrite it, so it would be lost. The training "
                "loss must come from the criterion make_private returned, criterion(model(x), y): "
                "a model's own loss (Hugging Face's outputs.loss, from labels=...) is a mean over "
                "the batch, which cannot be clipped per example; pass the logits and labels to "
                "that criterion instead. A per-example "
                "term (depends on the data): add it to the private loss before backward(), as "
                "criterion(out, y) + aux with aux of shape [B]. A data-independent regulariser: "
                "backward() it inside `with optimizer.public_gradient():`. Or call "
                "optimizer.zero_grad() before the private backward() to drop it"
            )

    def _check_covered(self) -> None:
        # Left to pass: the model's frozen parameters (step() gives them no gradient)
        for p in self.params:
            if p in self._covered:
                continue
            name = self._names.get(p)
            if name is not None and p.requires_grad:
                raise RuntimeError(
                    f"the optimizer's param_groups hold parameter {name!r}, which requires grad "
                    "but was frozen when the model was made private, so per-example clipping "
                    "does not cover it: it would move by noise alone. Freeze it again "
                    "(requires_grad_(False)), or make a new model private with it trainable "
                    "from the start"
                )
            if name is None:  # not the model's: no clipping could ever cover it
                raise RuntimeError(
                    f"the optimizer's param_groups hold a parameter of shape {tuple(p.shape)} "
                    "that is not covered by per-example clipping (added after make_private, "
                    "e.g. with optimizer.original_optimizer.add_param_group): it would move by "
                    "noise alone. Build the optimizer with all its parameters, from the model's "
                    "trainable parameters, before make_private"
                )

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
        self._check_handed_out(loss_per_sample.shape[0])
        self._planned = planned
        self._pass = self.schedule.pass_id
        self._applied_on_skip = False
        try:
            if loss_per_sample.numel() > 0:
                # S goes straight into the accumulator: no parameter-sized copy per micro-batch
                self.clipper.clipped_sum(loss_per_sample, out=self._accumulator)
            else:
                self.clipper.discard()
        except NonFiniteNormError:
            # Counted as an empty micro-batch: the logical-batch boundaries stay where the
            # sampler put them, and no non-finite value reaches the accumulator.
            self._count_micro_batch()
            self._skipped_since_step += 1
            if self._micro_batches == planned:
                # the logical batch is complete; the loop may skip its step() with this
                # micro-batch, and its next forward must see the updated parameters
                self.step()
                self._applied_on_skip = True
            raise
        except Exception as err:
            if self.clipper.writing:
                # part of S is in the accumulator and cannot be taken out: the logical batch
                # is lost; its step() says so instead of applying it (boundaries kept)
                self.clipper.writing = False
                self._lost = f"{type(err).__name__}: {err}"
                self._count_micro_batch()
            raise
        self._count_micro_batch()

    def _check_handed_out(self, rows: int) -> None:
        """Refuse a loss with more rows than the DP loader handed out examples for this
        micro-batch (each row is clipped as one example), or one after an empty micro-batch
        the loop skipped; warn of fewer rows (a collate that drops examples, or a skipped
        micro-batch). Nothing is changed."""
        handed = self.schedule.upcoming()
        if handed is None or rows == len(handed) or rows == 0:
            return  # (an empty micro-batch counted for a handed-out one: add_empty_micro_batch)
        n = len(handed)
        if n == 0:
            raise LogicalBatchError(
                "the DP data loader handed out an empty micro-batch before this one, and the "
                "loop went past it without counting it: the logical batches would no longer be "
                "the ones the sampler drew, which the accountant assumes. Count it: run it through "
                "the model as any other, or call optimizer.add_empty_micro_batch() for it. "
                "Nothing was added"
            )
        skipped = (
            "A micro-batch the loader handed out and the loop skipped (except ...: continue) "
            "shifts the logical batches from the ones the sampler drew: count a skipped one with "
            "optimizer.add_empty_micro_batch()"
        )
        if rows < n:
            warnings.warn(
                f"the loss has {rows} per-example values but the DP data loader handed out {n} "
                f"examples for this micro-batch: fine if the collate function dropped examples. "
                f"{skipped}",
                stacklevel=4,
            )
            return
        forward = self.clipper.recorder.forward_batch
        per_token = ""
        if forward == n and rows % n == 0:
            per_token = (
                f" The model's forward had a batch of {n}: a loss per token (logits flattened to "
                "[B·T, V] with logits.view(-1, V), as Hugging Face's own loss does) keeps the batch "
                "dimension as nn.CrossEntropyLoss on logits.transpose(1, 2) with labels [B, T] "
                "(dpclip averages each sequence's tokens)."
            )
        raise RuntimeError(
            f"the loss has {rows} per-example values but the DP data loader handed out {n} "
            "examples for this micro-batch: dpclip clips each row of the loss as one example."
            f"{per_token} Several rows per example (two augmented views concatenated along the "
            "batch, torch.cat([x, flip(x)]), in the loop or in the model, as SimCLR or multi-crop "
            "training does) would move the update by more than its bound: keep one row per "
            "example (pass the views as one input [B, V, ...] and have the model's forward run "
            f"its layers on each view x[:, v]). {skipped}. Nothing was added"
        )

    def _count_micro_batch(self) -> None:
        self._micro_batches += 1
        self._since_step_call += 1
        taken = self.schedule.take()
        if taken is None or self._examples is None:
            self._examples = None
        else:
            self._examples.extend(taken)

    def _reset_logical_batch(self) -> None:
        self._accumulator = {}
        self._public = {}
        self._micro_batches = 0
        self._since_step_call = 0
        self._skipped_since_step = 0
        self._planned = None
        self._examples = []

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Opacus's BatchMemoryManager hook: refused, since dpclip needs no such manager."""
        raise RuntimeError(
            "dpclip needs no BatchMemoryManager (it called signal_skip_step): the data loader "
            "make_private returns already yields micro-batches (of max_physical_batch_size, or "
            "the logical batch over accumulation_steps), and step() applies once per logical "
            "batch. Iterate that loader directly"
        )

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

        A micro-batch that raised ``NonFiniteNormError`` needs no ``step()`` of its
        own (a loop may ``continue`` past it); a ``step()`` after one that completed
        its logical batch is a no-op: that backward() applied it.

        Returns the closure's loss (or None); None for a skipped step.

        Raises:
            LogicalBatchError: the step does not fit the logical batch (see message).
            RuntimeError: a ``param.grad`` written outside dpclip, or a parameter in
                ``param_groups`` that clipping does not cover; nothing changed.
        """
        self._check_covered()
        self._check_outside_gradients()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        n, since = self._micro_batches, self._since_step_call
        interrupted = n > 0 and self._pass != self.schedule.pass_id
        if since == 0 and not interrupted:
            if self._applied_on_skip:
                self._applied_on_skip = False
                return loss
            raise LogicalBatchError(
                "step() called with no backward() since the previous step(): "
                f"{n} micro-batches accumulated"
            )
        planned = int(self._planned)  # set by every backward(), and n > 0 or since > 0
        if n < planned and not interrupted:
            if since - self._skipped_since_step <= 1:
                self._since_step_call = 0
                self._skipped_since_step = 0
                return None
            raise LogicalBatchError(
                f"step() after {n} micro-batches, but the logical batch has {planned} "
                f"micro-batches (step after every micro-batch, or once after all {planned})"
            )
        lost, self._lost = self._lost, None
        if lost is not None and not self.world.distributed:
            self._reset_logical_batch()
            raise LogicalBatchError(_lost_message(lost))
        event = self.step_event(n, self._examples)
        if self.step_guard is not None:
            self.step_guard(event)  # may refuse: nothing has changed yet
        noise_std = self.noise_multiplier * self.max_grad_norm
        # the accumulator becomes the noisy gradient in place: from here on, whatever
        # happens (an error in the noise or in the user's step), it is never used again
        accumulator, public = self._accumulator, self._public
        self._reset_logical_batch()
        if not interrupted:
            self.schedule.stepped(n)
        with record_function("dpclip.noise"):
            sums = []
            for p in self.params:
                if not p.requires_grad:  # frozen: no noise, and torch optimizers skip it
                    continue
                s = None if lost is not None else accumulator.get(p)
                if s is None:  # in float32 at least, as the clipper accumulates
                    s = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                sums.append((p, s))
            if self.world.distributed:
                self._reduce(sums, noise_std, lost)
            else:
                for _, s in sums:
                    private_gradient(
                        s,
                        noise_std=noise_std,
                        expected_batch_size=self.expected_batch_size,
                        generator=self.generator,
                        inplace=True,
                    )
            for p in self.params:
                if not p.requires_grad:
                    p.grad = None
            for p, g in sums:
                if p in public:
                    g.add_(public[p].to(g.dtype))
                p.grad = g.to(p.dtype)  # no copy unless the parameter is half precision
        with record_function("dpclip.optimizer_step"):
            try:
                self.original_optimizer.step()
            finally:  # the gradients are dpclip's, also as the user's optimizer left them
                self._see_gradients()
        self.ledger.record(event)
        for callback in self.step_callbacks:
            callback()
        return loss

    def _reduce(self, sums: list[tuple[torch.Tensor, torch.Tensor]], noise_std: float, lost: str | None) -> None:
        """(S + noise) / L on every rank: rank 0 adds the noise to its sum, one all-reduce
        adds the ranks' sums, with three checks in the same message (every rank is at the
        same step, none lost its logical batch); then the division by L."""
        world = self.world
        if lost is None and world.rank == 0:
            for _, s in sums:
                private_gradient(s, noise_std=noise_std, expected_batch_size=1.0, generator=self.generator, inplace=True)
        # (the step modulo 4096: its sum over the ranks stays exact in float32)
        control = [1.0, float(self.ledger.steps % 4096), 0.0 if lost is None else 1.0]
        try:
            ranks, steps, lost_ranks = all_reduce_sums([s for _, s in sums], control)
        except Exception as err:
            raise RuntimeError(
                f"the all-reduce of the clipped sums over {world.size} processes failed on rank "
                f"{world.rank} ({type(err).__name__}: {err}); another rank raised or left. No "
                "parameter changed and the step was not recorded: stop every rank and resume from "
                "the last checkpoint"
            ) from err
        if ranks != world.size or steps != world.size * (self.ledger.steps % 4096):
            raise RuntimeError(
                f"the ranks are not at the same optimizer step (rank {world.rank} is at step "
                f"{self.ledger.steps}; the ranks' steps sum to {steps:g} over {ranks:g} ranks): a rank "
                "skipped or added a step, so their updates no longer match. Stop every rank and "
                "resume from the last checkpoint"
            )
        if lost_ranks:
            raise LogicalBatchError(_lost_message(lost or f"on {lost_ranks:g} other rank(s)"))
        for _, s in sums:
            s.div_(self.expected_batch_size)

    def __repr__(self) -> str:
        return (
            f"DPOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier}, "
            f"max_grad_norm={self.max_grad_norm}, expected_batch_size={self.expected_batch_size})"
        )


def _lost_message(reason: str) -> str:
    return (
        "this logical batch was not applied: adding a micro-batch's clipped gradients into the "
        f"accumulator failed part-way ({reason}); no step was taken or recorded, and training "
        "can go on with the next logical batch"
    )
