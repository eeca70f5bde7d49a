"""The criterion ``make_private`` returns: per-sample losses whose ``backward()``
clips and accumulates instead of writing ``param.grad``."""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from dpclip.clipping.clipper import COMPILED_ADVICE
from dpclip.independence import ExamplesMixedError, Outcome, RandomState, check_independent

if TYPE_CHECKING:
    from dpclip.optimizer import DPOptimizer

__all__ = ["REDUCTIONS", "DPCriterion", "DPLoss", "per_example_losses"]

#: The criterion reductions dpclip takes: each example's loss is the criterion's on that
#: example alone ("batchmean", nn.KLDivLoss's, is its sum)
REDUCTIONS = ("mean", "sum", "batchmean")


class DPLoss:
    """A micro-batch's loss. ``backward()`` adds the clipped per-sample gradient
    sum to the optimizer's accumulator (``param.grad`` is not touched).

    It needs no scaling for accumulation: the optimizer divides by the expected
    logical batch size L = k·B. ``loss / k`` (k = accumulation steps, as
    ``accelerator.backward`` divides) is accepted and changes nothing; any other
    scaling is refused.

    One ``backward()`` per forward pass: the forward's recorded layer calls are
    used up by it. Several losses of one forward are added first, per example:
    ``loss_a + loss_b`` (two ``DPLoss`` of the same forward) or ``loss + aux``
    with ``aux`` a tensor of shape [B] (e.g. ``0.1 * out.square().sum(dim=1)``)
    give a ``DPLoss`` whose example i has loss ℓ_i + aux_i, clipped as one.
    """

    def __init__(self, loss_per_sample: torch.Tensor, optimizer: "DPOptimizer", reduction: str):
        #: ℓ_i for each example of the micro-batch, shape [B]
        self.loss_per_sample = loss_per_sample
        self._optimizer = optimizer
        self._reduction = reduction
        # the clipper's records this loss is made from; a backward() uses them up. None:
        # there were none left (a forward already used up by a backward())
        clipper = optimizer.clipper
        fresh = clipper.recorded_calls > 0 or loss_per_sample.numel() == 0
        self._generation = clipper.generation if fresh else None
        # the forward it comes from, for adding losses: records grow with each forward
        self._forward = (self._generation, clipper.recorded_calls)

    def backward(
        self,
        gradient: torch.Tensor | None = None,
        retain_graph: bool | None = None,
        create_graph: bool = False,
        inputs: Any = None,
    ) -> None:
        """Clip each example's gradient to max_grad_norm and accumulate the sum.

        Takes ``torch.Tensor.backward``'s arguments: ``retain_graph`` is accepted and
        has no effect (dpclip's one backward pass frees what it used; a second
        ``backward()`` on this forward is refused either way). ``gradient``,
        ``create_graph=True`` and ``inputs`` would change the gradient and are
        refused (``ValueError``). Raises ``RuntimeError`` if this loss's forward was
        already used by a ``backward()``; both refusals change nothing.
        """
        for name, value, default in (
            ("gradient", gradient, None),
            ("create_graph", create_graph, False),
            ("inputs", inputs, None),
        ):
            if value is not default:
                raise ValueError(
                    f"DPLoss.backward() does not take {name}={value!r}: dpclip clips the "
                    "gradient of every trainable parameter for the unscaled per-example losses; "
                    f"call backward() without {name}"
                )
        if self.loss_per_sample.numel() and not self.loss_per_sample.requires_grad:
            raise RuntimeError(
                "the loss does not require grad: the model's forward (or the criterion) ran "
                "under torch.no_grad() or torch.inference_mode() (or its layers ran inside "
                "reentrant gradient checkpointing on inputs that do not require grad), so there "
                "is nothing to differentiate. Run the training forward and the criterion with "
                "gradients enabled (keep no_grad for evaluation; checkpoint with "
                "use_reentrant=False). Nothing was added"
            )
        if self._generation is None or self._generation != self._optimizer.clipper.generation:
            recorder = self._optimizer.clipper.recorder
            if recorder.compiled:  # (its hooks recorded nothing)
                raise RuntimeError(
                    f"the model's forward ran under torch.compile after make_private. {COMPILED_ADVICE}. "
                    "Nothing was added"
                )
            if recorder.dropped or self._generation in recorder.dropped_generations:
                raise RuntimeError(
                    "this loss's forward pass is no longer recorded: another forward of the model "
                    "with gradients enabled started before this backward() (an evaluation without "
                    "torch.no_grad()), and dpclip keeps one forward's records. Evaluate under "
                    "torch.no_grad(), or after backward(). Nothing was added"
                )
            raise RuntimeError(
                "this loss's forward pass was already used by a backward() (of this loss, or "
                "of another loss computed from the same forward): dpclip takes one backward() "
                "per forward, and each counts as a micro-batch. Nothing was added. To combine "
                "several losses of one forward, add them per example before the one backward(): "
                "(loss_a + loss_b).backward(), or (loss + aux).backward() with aux of shape [B]"
            )
        self._optimizer.accumulate(self.loss_per_sample)

    def __add__(self, other: Any) -> "DPLoss":
        """ℓ_i + other_i per example: ``other`` is a ``DPLoss`` of the same forward or a
        tensor of shape [B]."""
        shape = tuple(self.loss_per_sample.shape)
        if isinstance(other, DPLoss):
            if other._optimizer is not self._optimizer or other._forward != self._forward:
                raise ValueError(
                    "adding two DPLoss objects needs both from the same forward pass (made "
                    "since the last backward()); this one comes from another forward"
                )
            other = other.loss_per_sample
        if not isinstance(other, torch.Tensor) or tuple(other.shape) != shape:
            got = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise ValueError(
                f"Expected a per-example tensor of shape [{shape[0]}] (or a DPLoss of the same "
                f"forward) to add to the private loss, got {got}: a term for each example is "
                "clipped with it; a data-independent regulariser on the weights is not a "
                "per-example loss: backward() it inside `with optimizer.public_gradient():`"
            )
        combined = DPLoss(self.loss_per_sample + other, self._optimizer, self._reduction)
        combined._generation, combined._forward = self._generation, self._forward
        return combined

    __radd__ = __add__

    def __getattr__(self, name: str) -> Any:
        # a tensor method on the private loss (loss.mean(), loss.sum()) would reduce over the
        # examples, which dpclip must keep apart to clip each one
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"'DPLoss' object has no attribute {name!r}: the criterion returned by make_private "
            "gives a DPLoss, which keeps one loss per example (loss_per_sample, shape [B]) so "
            "that backward() can clip each example. Call loss.backward() on it as it is (no "
            ".mean() or .sum() first); loss.item() or loss.detach() give the reduced value"
        )

    def __getitem__(self, index: Any) -> Any:
        # torch.autograd.grad(loss, ...) and torch.autograd.backward(loss) make a tuple of what
        # is not a tensor, which indexes it: without this they fail with "'DPLoss' object is
        # not iterable" (an __iter__ would make it an Iterable to frameworks' collection walks)
        raise TypeError(
            "a DPLoss is not a tensor, so torch.autograd.grad(loss, ...) and "
            "torch.autograd.backward(loss) cannot take it (nor can anything that iterates over "
            "it, nor index it: loss.loss_per_sample holds the examples' losses): its gradient is "
            "the clipped per-example sum that loss.backward() adds to the optimizer, and an "
            "unclipped gradient of the examples' losses would not be private. Call "
            "loss.backward(). For a gradient that is not the model's update, such as the "
            "input gradient of an adversarial example, compute a loss of your own from the "
            "model's output with the original criterion and take torch.autograd.grad of that"
        )

    def _not_scaled(self, other: Any) -> Any:
        raise TypeError(
            "the private loss (DPLoss) is not scaled: don't multiply it, or divide it by anything "
            "but the accumulation steps k (the optimizer divides the clipped sum by the logical "
            "batch size L). Call loss.backward() as it is. Sample weights go into the criterion: "
            "a criterion module taking (output, target, weight) that returns each example's "
            "weighted loss under reduction='none' (dpclip probes it: a weight normalised over "
            "the batch, w / w.sum(), mixes the examples). A weighted auxiliary loss of the same forward is added "
            "per example: criterion(out, y) + 0.4 * F.cross_entropy(aux, y, reduction='none') "
            "(shape [B]). Mixup's lam * loss(y) + (1 - lam) * loss(y[perm]) mixes the examples' "
            "labels and is not private either way"
        )

    __mul__ = __rmul__ = _not_scaled

    def __truediv__(self, other: Any) -> "DPLoss":
        """``loss / k`` with k the accumulation steps (or 1) is this loss unchanged.

        Dividing each micro-batch's loss by k is how frameworks average a logical batch
        (``accelerator.backward`` does it); dpclip's division of the clipped sum by the
        expected logical batch L = k·B already averages over the k micro-batches, so it
        is accepted and changes nothing. Any other factor would change what is clipped
        (``TypeError``).
        """
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            if self._averages_micro_batches(other):
                return self
            if other == int(other) and other > 1:
                raise TypeError(
                    f"the private loss (DPLoss) divided by {other:g}, but the logical batch has "
                    f"k = {self._optimizer.accumulation_steps} micro-batches (make_private's "
                    "accumulation_steps): a framework "
                    "that averages micro-batches (Accelerator(gradient_accumulation_steps=...)) "
                    "must accumulate the same k. Nothing was added"
                )
        self._not_scaled(other)

    def as_tensor(self) -> torch.Tensor:
        """This loss as a scalar tensor, for frameworks that take only tensors (Lightning's
        ``training_step``): its value is ``detach()``, and its ``backward()`` (also
        through ``/ k``, as frameworks average micro-batches) is this loss's ``backward()``.

        Any other use of its gradient is refused when backward() reaches it: the
        tensor is not a function of the parameters, so it cannot take part in another
        loss (``RuntimeError`` from backward; nothing added).
        """
        anchor = torch.zeros((), device=self.loss_per_sample.device, requires_grad=True)
        return _PrivateBackward.apply(anchor, self.detach(), self)

    def _averages_micro_batches(self, divisor: float, rel_tol: float = 1e-9) -> bool:
        """Whether dividing by ``divisor`` is the frameworks' mean over the k micro-batches
        (or 1): what the division by L already does. ``rel_tol``: how far ``divisor`` may be
        from it (1/k rounded to the loss tensor's dtype)."""
        steps = self._optimizer.accumulation_steps  # None: k varies
        return math.isclose(divisor, 1.0, rel_tol=rel_tol) or (
            steps is not None and math.isclose(divisor, steps, rel_tol=rel_tol)
        )

    def _backward_scaled(self, grad: torch.Tensor) -> None:
        scale = float(grad)
        # a framework divides the loss tensor by k in its dtype: float32's 1/3 is 0.33333334,
        # bfloat16's 0.333984 (Lightning's accumulate_grad_batches=3)
        rel_tol = max(1e-9, 2 * torch.finfo(grad.dtype).eps) if grad.is_floating_point() else 1e-9
        if scale == 0 or not self._averages_micro_batches(1 / scale, rel_tol):
            raise RuntimeError(
                f"the private loss tensor (DPLoss.as_tensor()) reached backward() scaled by {scale:g}: "
                "dpclip clips the unscaled per-example losses and divides by L itself; only the "
                "framework's 1/k for k accumulation steps is accepted. Nothing was added"
            )
        self.backward()

    def detach(self) -> torch.Tensor:
        """The loss reduced as the user's criterion would ("mean", "batchmean" or "sum");
        NaN-free for B=0."""
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


class _PrivateBackward(torch.autograd.Function):
    """A scalar whose backward runs a ``DPLoss``'s clipped backward (``as_tensor``)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, value: torch.Tensor, loss: DPLoss) -> torch.Tensor:
        ctx.loss = loss
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        # runs dpclip's own backward over the model's graph from inside this one (where
        # autograd turned grad mode off)
        with torch.enable_grad():
            ctx.loss._backward_scaled(grad)
        return None, None, None


class DPCriterion:
    """Calls the user's loss module with ``reduction="none"`` and wraps the result.

    Per-sample losses with more than one dimension (e.g. per token) are reduced
    over the non-batch dimensions to what the criterion gives for that example
    alone (``per_example_losses``), so the privacy unit is one example (one sequence).

    The first call with at least 2 examples is probed (``dpclip.independence``,
    unless the clipper's ``check_independence`` is off): the criterion runs once
    more with example 0's inputs and targets changed, and the other examples'
    losses must not move; a loss over the batch raises ``ExamplesMixedError``
    before any loss is returned (its first two arguments with B leading rows count as the
    examples', the targets too: predictions [B, 1] against a target [B] broadcast to
    [B, B], and each example's loss would then depend on every example's target).
    """

    def __init__(self, criterion: nn.Module, optimizer: "DPOptimizer") -> None:
        self.criterion = criterion
        self.optimizer = optimizer
        self._probe_pending = optimizer.clipper.check_independence

    def __call__(self, *args: Any, **kwargs: Any) -> DPLoss:
        random_state = RandomState.capture() if self._probe_pending else None
        with self.optimizer.clipper.counting_loss():
            losses = self._per_example(args, kwargs)
        if random_state is not None:
            try:
                outcome = check_independent(
                    self._per_example, args, kwargs, losses, losses.shape[0], random_state,
                    subject=f"the criterion ({type(self.criterion).__name__})",
                    module=self.criterion, targets=True, hint=_broadcast_hint(args, kwargs),
                    data=self.optimizer.clipper.recorder.independence.data_rows,
                )
                self._probe_pending = outcome is Outcome.UNPROBED
            except ExamplesMixedError:
                self.optimizer.clipper.discard()  # the refused micro-batch's forward
                raise
        return DPLoss(losses, self.optimizer, self.criterion.reduction)

    def _per_example(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return per_example_losses(self.criterion, *args, **kwargs)

    def __repr__(self) -> str:
        return f"DPCriterion({self.criterion!r})"


def _broadcast_hint(args: tuple, kwargs: dict) -> str:
    """What to say of a criterion's first two tensor arguments of different shapes that
    broadcast over each other's batch (predictions [B, 1], target [B]): "" otherwise."""
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)][:2]
    if len(tensors) < 2 or tensors[0].shape == tensors[1].shape:
        return ""
    try:
        shape = torch.broadcast_shapes(tensors[0].shape, tensors[1].shape)
    except RuntimeError:
        return ""
    if shape == tensors[0].shape:
        return ""
    return (
        f"Here the criterion's inputs have shapes {tuple(tensors[0].shape)} and "
        f"{tuple(tensors[1].shape)}, which broadcast to {tuple(shape)}: every example's loss "
        "then compares its prediction with every example's target. Give them the same shape "
        "(output.squeeze(-1), or target.view(-1, 1))."
    )


def per_example_losses(criterion: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """ℓ_i for each example, shape [B]: the loss module called with ``reduction="none"``
    (its own restored after), losses with more than one dimension (e.g. per token)
    reduced over the non-batch dimensions to the module's loss on that example alone:
    a sum ("sum", and ``nn.KLDivLoss``'s "batchmean": the sum over the entries divided by
    one example), or a mean over its positions (over its counted targets for losses over
    class indices: ``_counted_targets``), so the privacy unit is one example (one sequence)."""
    reduction = criterion.reduction
    criterion.reduction = "none"
    try:
        losses = criterion(*args, **kwargs)
    finally:
        criterion.reduction = reduction
    if not isinstance(losses, torch.Tensor) or losses.dim() == 0:
        raise ValueError(
            "the criterion returned a scalar with reduction='none': dpclip needs one loss "
            "per example (shape [B, ...])"
        )
    if losses.dim() > 1:
        dims = tuple(range(1, losses.dim()))
        if reduction in ("sum", "batchmean"):  # (batchmean: KL's sum over the entries, per example)
            return losses.sum(dim=dims)
        counted = _counted_targets(criterion, losses, args, kwargs)
        losses = losses.mean(dim=dims) if counted is None else losses.sum(dim=dims) / counted
    return losses


#: The forwards of torch's losses over class indices ("mean": over the counted targets).
_TORCH_FORWARDS = (nn.CrossEntropyLoss.forward, nn.NLLLoss.forward)
#: A criterion subclass's way to reduce one example's tokens, once it was told apart.
_BY_COUNT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _counted_targets(
    criterion: nn.Module, losses: torch.Tensor, args: tuple, kwargs: dict
) -> torch.Tensor | None:
    """Per example, what the criterion's "mean" divides by when it is called on that
    example alone, where that is not its number of positions (None): torch's losses over
    class indices (``nn.CrossEntropyLoss``, ``nn.NLLLoss``, also with ``label_smoothing``)
    divide by the weight Σ_t w[y_t] of the targets that are not ``ignore_index`` (their
    count without ``weight``), so a padded sequence's loss is the mean over its own labelled
    tokens, not over all T. An example with none has loss 0 (torch's own mean is 0/0).
    A subclass with its own ``forward`` (one that transposes the logits, or a focal loss
    of its own) is called once on one example to tell which of the two it does
    (``_reduces_by_count``)."""
    if not isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return None
    target = kwargs["target"] if "target" in kwargs else args[1] if len(args) > 1 else None
    if not isinstance(target, torch.Tensor) or target.is_floating_point():
        return None  # class probabilities are averaged over the positions
    if target.shape != losses.shape:
        # a subclass that reshapes inside (a causal LM's shift: logits[:, :-1] against
        # labels[:, 1:]): which targets it counts is not known from the outside
        if criterion.weight is None and not bool((target == criterion.ignore_index).any()):
            return None  # every position counts
        return _divisors_alone(criterion, losses, args, kwargs)
    counted = target != criterion.ignore_index
    if criterion.weight is None:
        weights = counted.to(losses.dtype)
    else:
        weights = criterion.weight.to(losses.dtype)[target.masked_fill(~counted, 0)] * counted
    total = weights.sum(dim=tuple(range(1, losses.dim())))
    if type(criterion).forward not in _TORCH_FORWARDS and not _reduces_by_count(criterion, losses, total, args, kwargs):
        return None
    return torch.where(total > 0, total, torch.ones_like(total))


def _loss_alone(criterion: nn.Module, args: tuple, kwargs: dict, i: int, batch: int) -> float:
    """The criterion, with its own reduction, on example ``i`` alone (the arguments'
    rows i of those with ``batch`` rows), without gradient."""

    def alone(a: Any) -> Any:
        return a[i:i + 1] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else a

    with torch.no_grad():
        return float(criterion(*(alone(a) for a in args), **{k: alone(v) for k, v in kwargs.items()}))


def _divisors_alone(criterion: nn.Module, losses: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Per example, what the criterion's "mean" divides its losses by when it is called on
    that example alone: the sum of its per-position losses over that mean (a count of
    targets, rounded, without class weights); 1 for an example with no loss (none counted)."""
    batch = losses.shape[0]
    sums = losses.detach().double().sum(dim=tuple(range(1, losses.dim())))
    divisors = torch.ones(batch, dtype=torch.float64)  # (on the host: filled from floats)
    for i in range(batch):
        one = _loss_alone(criterion, args, kwargs, i, batch)
        if float(sums[i]) != 0.0 and math.isfinite(one) and one != 0.0:
            divisors[i] = float(sums[i]) / one
    if criterion.weight is None:
        divisors = divisors.round()
    return divisors.to(device=losses.device, dtype=losses.dtype)


def _reduces_by_count(
    criterion: nn.Module, losses: torch.Tensor, total: torch.Tensor, args: tuple, kwargs: dict
) -> bool:
    """Whether a subclass's "mean" of one example divides by its counted targets (else by
    its positions): the criterion on the example where the two differ most, alone (once
    per criterion; until some example tells them apart, either is the same)."""
    known = _BY_COUNT.get(criterion)
    if known is not None:
        return known
    positions = losses[0].numel()
    gap = torch.where(total > 0, (total - positions).abs(), torch.zeros_like(total))
    i = int(gap.argmax())
    if float(gap[i]) == 0.0:
        return True
    one = _loss_alone(criterion, args, kwargs, i, losses.shape[0])
    row = losses[i].detach().double()
    by_count = float(row.sum() / total[i])
    _BY_COUNT[criterion] = abs(one - by_count) <= abs(one - float(row.mean()))
    return _BY_COUNT[criterion]
