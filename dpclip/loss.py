"""The criterion ``make_private`` returns: per-sample losses whose ``backward()``
clips and accumulates instead of writing ``param.grad``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from dpclip.independence import ExamplesMixedError, Outcome, RandomState, check_independent

if TYPE_CHECKING:
    from dpclip.optimizer import DPOptimizer

__all__ = ["DPCriterion", "DPLoss"]


class DPLoss:
    """A micro-batch's loss. ``backward()`` adds the clipped per-sample gradient
    sum to the optimizer's accumulator (``param.grad`` is not touched).

    Don't scale it for accumulation (no ``loss / k``): the optimizer divides by
    the expected logical batch size L.
    """

    def __init__(self, loss_per_sample: torch.Tensor, optimizer: "DPOptimizer", reduction: str):
        #: ℓ_i for each example of the micro-batch, shape [B]
        self.loss_per_sample = loss_per_sample
        self._optimizer = optimizer
        self._reduction = reduction

    def backward(self) -> None:
        """Clip each example's gradient to max_grad_norm and accumulate the sum."""
        self._optimizer.accumulate(self.loss_per_sample)

    def detach(self) -> torch.Tensor:
        """The loss reduced as the user's criterion would ("mean" or "sum"); NaN-free for B=0."""
        losses = self.loss_per_sample.detach()
        if self._reduction == "sum" or losses.numel() == 0:
            return losses.sum()
        return losses.mean()

    def item(self) -> float:
        return self.detach().item()

    def __float__(self) -> float:
        return self.item()

    def __repr__(self) -> str:
        return f"DPLoss({self.item():.4f}, batch={self.loss_per_sample.shape[0]})"


class DPCriterion:
    """Calls the user's loss module with ``reduction="none"`` and wraps the result.

    Per-sample losses with more than one dimension (e.g. per token) are reduced
    over the non-batch dimensions with the criterion's own reduction, so the
    privacy unit is one example (one sequence).

    The first call with at least 2 examples is probed (``dpclip.independence``,
    unless the clipper's ``check_independence`` is off): the criterion runs once
    more with example 0's inputs and targets changed, and the other examples'
    losses must not move; a loss over the batch raises ``ExamplesMixedError``
    before any loss is returned.
    """

    def __init__(self, criterion: nn.Module, optimizer: "DPOptimizer") -> None:
        self.criterion = criterion
        self.optimizer = optimizer
        self._probe_pending = optimizer.clipper.check_independence

    def __call__(self, *args: Any, **kwargs: Any) -> DPLoss:
        random_state = RandomState.capture() if self._probe_pending else None
        losses = self._per_example(args, kwargs)
        if random_state is not None:
            try:
                outcome = check_independent(
                    self._per_example, args, kwargs, losses, losses.shape[0], random_state,
                    subject=f"the criterion ({type(self.criterion).__name__})",
                    module=self.criterion,
                )
                self._probe_pending = outcome is Outcome.UNPROBED
            except ExamplesMixedError:
                self.optimizer.clipper.discard()  # the refused micro-batch's forward
                raise
        return DPLoss(losses, self.optimizer, self.criterion.reduction)

    def _per_example(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """ℓ_i for each example, shape [B]."""
        reduction = self.criterion.reduction
        self.criterion.reduction = "none"
        try:
            losses = self.criterion(*args, **kwargs)
        finally:
            self.criterion.reduction = reduction
        if not isinstance(losses, torch.Tensor) or losses.dim() == 0:
            raise ValueError(
                "the criterion returned a scalar with reduction='none': dpclip needs one loss "
                "per example (shape [B, ...])"
            )
        if losses.dim() > 1:
            dims = tuple(range(1, losses.dim()))
            losses = losses.sum(dim=dims) if reduction == "sum" else losses.mean(dim=dims)
        return losses

    def __repr__(self) -> str:
        return f"DPCriterion({self.criterion!r})"
