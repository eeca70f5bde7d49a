"""Empirical privacy audit in one training run: a lower bound on ε from canaries.

m canaries are each included in training independently with probability 1/2; after
training an auditor guesses, for r of them, whether each was included, and v guesses
are right. Two bounds turn (m, r, v) into ε:

- ``epsilon_lower_bound`` (Steinke, Nasr & Jagielski 2023, "Privacy auditing with
  one (1) training run", Theorem 5.2): if training is (ε, δ)-DP, v is at most as
  large as a Binomial(r, e^ε/(1+e^ε)) draw, up to a δ term. It holds for any
  mechanism, and for the Gaussian noise of DP-SGD it is loose (about half the ε).
- ``refutes`` (Mahloujifar, Melis & Chaudhuri 2024, "Auditing f-differential
  privacy in one run"): the same test against a whole trade-off curve f. With f of
  DP-SGD itself (``dpsgd_tradeoff``), ``dpsgd_epsilon_lower_bound`` finds σ*, the
  smallest noise multiplier the guesses refute (the run's noise is below it), and
  reports a lower bound on the ε of DP-SGD with σ*, independent of any accountant.

``run`` is the audit: the user's workload trained by dpclip with m gradient canaries
(one scalar parameter each, on a head beside the model, whose per-example gradient
is exactly C times its coordinate), scored white-box from each step's update.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats
import torch
import torch.nn as nn
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset

from accounting.accountant import validate_delta
from accounting.events import PoissonGaussian, validate_int
from dpclip.engine import PrivacyEngine
from dpclip.loss import REDUCTIONS, per_example_losses

__all__ = [
    "AuditResult",
    "canary_scores",
    "dpsgd_epsilon_lower_bound",
    "dpsgd_tradeoff",
    "epsilon_lower_bound",
    "guess_counts",
    "p_value",
    "refutes",
    "run",
]

#: Fractions of the canaries guessed "in" (the highest scores) and as many "out" (the
#: lowest); each choice is tested at (1 − confidence) / len(GUESS_FRACTIONS).
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2)


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    for name, value in (("canaries", canaries), ("guesses", guesses), ("correct", correct)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"Expected {name} to be a whole number >= 0, got {value!r}")
    if not correct <= guesses <= canaries:
        raise ValueError(
            f"Expected correct <= guesses <= canaries, got correct={correct}, guesses={guesses}, "
            f"canaries={canaries}"
        )


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability, under an (ε, δ)-DP training run, of ``correct`` or more right
    guesses out of ``guesses`` about ``canaries`` canaries (each in with probability 1/2).

    With δ = 0 it is the Binomial(r, e^ε/(1+e^ε)) tail P[X ≥ v]; with δ > 0 the paper's
    bound adds 2mδ·max_{1≤i≤v} (P[X ≥ v − i] − P[X ≥ v]) / i (capped at 1).
    """
    _check_counts(canaries, guesses, correct)
    if not epsilon >= 0 or not 0 <= delta < 1:
        raise ValueError(f"Expected epsilon >= 0 and 0 <= delta < 1, got epsilon={epsilon}, delta={delta}")
    q = scipy.special.expit(epsilon)
    tail = float(scipy.stats.binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return tail
    i = np.arange(1, correct + 1)
    spread = (scipy.stats.binom.sf(correct - i - 1, guesses, q) - tail) / i
    return min(1.0, tail + 2 * canaries * delta * float(spread.max()))


def epsilon_lower_bound(
    canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest ε that ``correct`` right guesses out of ``guesses`` refute at
    ``confidence``: p_value(ε, δ) ≤ 1 − confidence; 0 when no ε ≥ 0 is refuted.

    With probability at least ``confidence`` (over the canaries' inclusion and the
    training run) it is below the true ε of an (ε, δ)-DP run.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"Expected 0 < confidence < 1, got {confidence}")
    significance = 1 - confidence

    def refuted(eps: float) -> float:  # > 0 where ε is refuted
        return significance - p_value(canaries, guesses, correct, eps, delta)

    if refuted(0.0) <= 0:
        return 0.0
    high = 1.0
    while refuted(high) > 0:
        if high > 1e3:  # every guess right, δ = 0: each ε is refuted by some margin
            return math.inf
        high *= 2
    return float(scipy.optimize.brentq(refuted, 0.0, high, xtol=1e-9))


def refutes(
    canaries: int, guesses: int, correct: int, tradeoff: Callable[[float], float], significance: float
) -> bool:
    """Whether ``correct`` right guesses out of ``guesses`` (about ``canaries`` canaries,
    each in with probability 1/2) refute the claim that training is f-DP, f = ``tradeoff``,
    at ``significance``: under every f-DP run, that many right guesses or more have
    probability at most ``significance`` (Mahloujifar, Melis & Chaudhuri 2024, the
    numerical bound of their Algorithm "audit_rh_with_cap").

    tradeoff: f(α), the least type II error of a test with type I error α between
        neighbouring datasets (symmetric, convex, decreasing, f(0) <= 1).
    """
    _check_counts(canaries, guesses, correct)
    if not 0 < significance < 1:
        raise ValueError(f"Expected 0 < significance < 1, got {significance}")
    if guesses == 0:
        return False
    # r, h: the probability mass the adversary's right and wrong guesses must carry,
    # grown back from the last right guess; f-DP caps how fast r can outgrow h.
    right = significance * correct / canaries
    wrong = significance * (guesses - correct) / canaries
    for i in range(correct - 1, -1, -1):
        grown = max(wrong, tradeoff(1.0 - right))
        if grown == wrong:
            break
        right = min(1.0, right + i / (guesses - i) * (grown - wrong))
        wrong = grown
    return right + wrong > guesses / canaries


def dpsgd_tradeoff(sample_rate: float, noise_multiplier: float, steps: int) -> Callable[[float], float]:
    """f of ``steps`` Poisson-sampled Gaussian steps (add or remove one example), from
    dp-accounting's privacy-loss distribution: f(α) = sup_ε max(0, 1 − δ(ε) − e^ε α,
    e^−ε (1 − δ(ε) − α)) over a grid of ε. The PLD's δ(ε) are upper bounds (pessimistic
    discretisation) and the grid is finite, so f is a lower bound on the true curve: a
    claim this f refutes, the exact one refutes too.
    """
    eps, deltas = _dpsgd_profile(float(sample_rate), float(noise_multiplier), int(steps))
    up, down = np.exp(eps), np.exp(-eps)

    def f(alpha: float) -> float:
        return max(0.0, float(np.max(1 - deltas - up * alpha)), float(np.max(down * (1 - deltas - alpha))))

    return f


@functools.lru_cache(maxsize=64)
def _dpsgd_profile(sample_rate: float, noise_multiplier: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    pld = _dpsgd_pld(sample_rate, noise_multiplier, steps, pessimistic=True)
    top = min(float(pld.get_epsilon_for_delta(1e-12)), 60.0)
    eps = np.linspace(0.0, max(top, 1.0), 1000)
    return eps, np.asarray(pld.get_delta_for_epsilon(eps), dtype=float)


def _dpsgd_pld(sample_rate: float, noise_multiplier: float, steps: int, *, pessimistic: bool) -> Any:
    """dp-accounting's PLD of ``steps`` DP-SGD steps: pessimistic (δ(ε) from above, for
    the trade-off curve) or optimistic (ε from below). The grid coarsens for small σ,
    which keeps the PLD's size bounded and errs in the same direction."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    return pld_lib.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sampling_prob=sample_rate, pessimistic_estimate=pessimistic,
        use_connect_dots=pessimistic,  # (connect-the-dots is pessimistic only)
        value_discretization_interval=(1e-3 if pessimistic else 1e-4) * max(1.0, noise_multiplier**-2),
    ).self_compose(steps)


def dpsgd_epsilon_lower_bound(
    canaries: int,
    counts: Sequence[tuple[int, int]],
    *,
    sample_rate: float,
    steps: int,
    noise_multiplier: float,
    delta: float,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """(ε, σ*): σ* is the smallest noise multiplier such that DP-SGD with
    (``sample_rate``, σ*, ``steps``) is refuted by some (guesses, correct) pair of
    ``counts`` (each tested at (1 − confidence) / len(counts)), searched within
    [σ/100, 100σ] for σ = ``noise_multiplier`` to 0.5 %; ε is a lower bound on the ε at
    ``delta`` of DP-SGD with σ* (dp-accounting's PLD, optimistic discretisation).

    With probability ``confidence``, the run's noise is below σ* (if it is DP-SGD at
    this sampling rate and step count), so its true ε is above the returned ε.
    (0.0, inf) when even 100σ is not refuted.
    """
    if not counts:
        raise ValueError("Expected at least one (guesses, correct) pair in counts")
    if not 0 < confidence < 1:
        raise ValueError(f"Expected 0 < confidence < 1, got {confidence}")
    significance = (1 - confidence) / len(counts)

    def refuted(sigma: float) -> bool:
        f = dpsgd_tradeoff(sample_rate, sigma, steps)
        return any(refutes(canaries, r, v, f, significance) for r, v in counts)

    low, high = noise_multiplier / 100, noise_multiplier * 100
    if not refuted(high):
        return 0.0, math.inf
    if refuted(low):
        high = low
    else:
        while high / low > 1.005:
            mid = math.sqrt(low * high)
            low, high = (low, mid) if refuted(mid) else (mid, high)
    # from below (optimistic PLD): every accountant's upper bound for σ* is above it
    epsilon = _dpsgd_pld(sample_rate, high, steps, pessimistic=False).get_epsilon_for_delta(delta)
    return max(0.0, float(epsilon)), float(high)


def canary_scores(updates: np.ndarray, sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Each canary's log-likelihood ratio of "included" against "not included".

    updates: shape [steps, m]; updates[t, j] is step t's noisy gradient sum along canary
        j's coordinate in units of C: 1 + σZ when the canary was drawn, σZ otherwise.
    Per step the ratio is 1 − q + q·exp((y − 1/2)/σ²) (the Neyman–Pearson test between a
    canary that is drawn with probability q and one that is absent), summed in logs.
    """
    y = np.asarray(updates, dtype=float)
    drawn = math.log(sample_rate) + (y - 0.5) / noise_multiplier**2
    if sample_rate >= 1:
        return drawn.sum(axis=0)
    return np.logaddexp(math.log1p(-sample_rate), drawn).sum(axis=0)


def guess_counts(
    scores: np.ndarray, included: np.ndarray, fractions: Sequence[float] = GUESS_FRACTIONS
) -> list[tuple[int, int]]:
    """For each fraction p: guess "in" for the ⌈p·m⌉ highest scores and "out" for as many
    lowest; (guesses, right guesses) per distinct guess count."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"Expected scores and included of one shape [m], got {scores.shape} and {included.shape}")
    order = np.argsort(-scores, kind="stable")
    sizes = dict.fromkeys(min(max(1, math.ceil(p * len(scores))), len(scores) // 2) for p in fractions)
    return [
        (2 * k, int(included[order[:k]].sum() + (~included[order[len(scores) - k:]]).sum())) for k in sizes
    ]


@dataclass(frozen=True)
class AuditResult:
    """One audit: the claim, the two lower bounds and what they came from.

    claimed_epsilon: the engine's ε at ``delta`` (its accountant) for the run it took.
    epsilon_lower_bound: a lower bound on the ε of DP-SGD at the run's sampling rate and
        steps with noise σ*, the smallest noise multiplier the guesses refute (f-DP
        one-run bound); computed without the engine's accountant, so an accountant
        that under-reports is caught too.
    epsilon_lower_bound_any_mechanism: Steinke et al.'s bound, assuming nothing about
        the mechanism (looser); for reference, not in the verdict.
    noise_multiplier_bound: σ*; a correct run has σ < σ* at ``confidence``.
    guesses, correct: the (guesses, right guesses) pairs, one per guess fraction.
    """

    claimed_epsilon: float
    epsilon_lower_bound: float
    epsilon_lower_bound_any_mechanism: float
    delta: float
    confidence: float
    canaries: int
    included: int
    noise_multiplier: float
    noise_multiplier_bound: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    guesses: tuple[int, ...]
    correct: tuple[int, ...]
    accountant: str
    seconds: float

    @property
    def consistent(self) -> bool:
        """Whether the claim survives: the lower bound is at most the claimed ε (a correct
        run fails this with probability at most 1 − confidence)."""
        return self.epsilon_lower_bound <= self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["guesses"], out["correct"] = list(self.guesses), list(self.correct)
        out["consistent"] = self.consistent
        return out

    def __str__(self) -> str:
        right, guessed = max(zip(self.correct, self.guesses), key=lambda pair: pair[0] / pair[1])
        verdict = (
            "consistent: no canary evidence against the claimed ε" if self.consistent
            else "INCONSISTENT: the canaries leak more than the claimed ε allows"
        )
        return (
            f"claimed ε                     {self.claimed_epsilon:.3f} (δ = {self.delta:g}, {self.accountant}, "
            f"σ = {self.noise_multiplier:g}, q = {self.sample_rate:.4g}, {self.steps} steps)\n"
            f"empirical ε lower bound       {self.epsilon_lower_bound:.3f} (noise below σ* = "
            f"{self.noise_multiplier_bound:.4g}; confidence {self.confidence:g})\n"
            f"  assuming no mechanism       {self.epsilon_lower_bound_any_mechanism:.3f} (Steinke et al. 2023)\n"
            f"canaries                      {self.canaries} ({self.included} included), "
            f"best guesses {right}/{guessed} right\n"
            f"{verdict} ({self.seconds:.1f} s)\n"
        )


def run(
    workload: Any,
    *,
    noise_multiplier: float,
    logical_batch: int,
    steps: int,
    canaries: int = 10_000,
    max_grad_norm: float = 1.0,
    micro_batch: int | None = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
    lr: float = 0.1,
    accountant: str = "prv",
    memory: str = "auto",
    device: str | None = None,
) -> AuditResult:
    """Audit dpclip's DP-SGD on ``workload`` with ``canaries`` gradient canaries.

    Each canary is included with probability 1/2 (drawn from ``seed``) as one more
    example of the training set: its loss is 2C times its own scalar parameter, on a
    head beside the model that no real example touches, so its clipped gradient is
    exactly C along its own coordinate and the model's parameters get none of it. The
    model trains on its data as usual (``PrivacyEngine.make_private`` with Poisson
    logical batches of expected size ``logical_batch`` out of the data plus the included
    canaries, micro-batches of ``micro_batch``, SGD at ``lr``). After each step the
    auditor reads the head's update (white box, every step), scores each canary by its
    likelihood ratio (``canary_scores``) and guesses.

    What it checks: the noise, the sampling, the clipping and accumulation of a
    canary's gradient, and the ledger's ε, as one mechanism. Not what it checks: the
    per-example norms of the model's own layers (``dpclip compare`` checks those
    against torch.func).

    Args:
        workload: a ``dpclip.workloads.Workload`` or a spec ("mlp", "cnn",
            "transformer", "tiny", "module:function"), as for ``dpclip compare``.
        noise_multiplier: σ, noise std divided by max_grad_norm.
        logical_batch: L, expected examples per optimizer step.
        steps: optimizer steps.
        canaries: m >= 100, canaries (each included with probability 1/2); more
            canaries give a tighter bound and cost time.
        max_grad_norm: C, the per-example L2 bound.
        micro_batch: B, most examples per forward/backward (default min(L, 256)).
        delta: δ of the claim and of both bounds.
        confidence: probability that the lower bounds hold (default 0.95).
        seed: canaries' inclusion, model initialisation, sampling and noise.
        lr: SGD learning rate of the model (the canary head's is 1).
        accountant: the claimed ε's accountant.
        memory: ``make_private``'s memory mode.
        device: "cpu" or "cuda" (default: cuda when available).
    """
    started = time.perf_counter()
    for name, value in (("logical_batch", logical_batch), ("steps", steps)):
        validate_int(name, value)
    validate_int("canaries", canaries, minimum=100)
    micro_batch = min(logical_batch, 256) if micro_batch is None else validate_int("micro_batch", micro_batch)
    if micro_batch > logical_batch:
        raise ValueError(
            f"Expected micro_batch={micro_batch} <= logical_batch={logical_batch}: a micro-batch is "
            "a part of the logical batch"
        )
    if not noise_multiplier > 0:
        raise ValueError(f"Expected noise_multiplier > 0: the audit scores canaries against the noise, got {noise_multiplier}")
    if not max_grad_norm > 0:
        raise ValueError(f"Expected max_grad_norm > 0, got {max_grad_norm}")
    if not 0 < confidence < 1:
        raise ValueError(f"Expected 0 < confidence < 1, got {confidence}")
    validate_delta(delta)
    model_fn, dataset, criterion = _resolve_workload(workload)
    if isinstance(model_fn, nn.Module) or not callable(model_fn):
        raise ValueError(
            "Expected the workload's model_fn to build a fresh model when called (a class or "
            f"function, e.g. Workload(MyModel, ...)), got {type(model_fn).__name__}"
        )
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("Expected the workload's dataset to hold at least one example, got none")
    example = dataset[0]
    if not isinstance(example, (tuple, list)) or len(example) != 2:
        shape = f" of {len(example)}" if isinstance(example, (tuple, list)) else ""
        raise ValueError(
            "Expected the workload's dataset to yield (x, y) pairs (x may be a tensor, tuple or "
            f"dict), got a {type(example).__name__}{shape}"
        )
    reduction = getattr(criterion, "reduction", None)
    if not isinstance(criterion, nn.Module) or reduction not in REDUCTIONS:
        raise ValueError(
            "Expected the workload's criterion to be a loss module with reduction 'mean' or 'sum' "
            "(or nn.KLDivLoss's 'batchmean'), e.g. nn.CrossEntropyLoss(); got "
            f"{criterion!r} with reduction {reduction!r}"
        )
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    data = _CanaryData(dataset, np.flatnonzero(included), canaries)
    if logical_batch > len(data):
        raise ValueError(f"logical_batch={logical_batch} exceeds the audit's dataset size {len(data)}")
    torch.manual_seed(seed)
    model = _WithCanaries(model_fn(), canaries, 2.0 * max_grad_norm).to(device_)
    head = model.canary.weight
    optimizer = torch.optim.SGD(
        [{"params": [p for n, p in model.named_parameters() if not n.startswith("canary.")], "lr": lr},
         {"params": [head], "lr": 1.0}],
    )
    engine = PrivacyEngine(accountant=accountant)
    model, optimizer, dp_criterion, loader = engine.make_private(
        module=model, optimizer=optimizer, criterion=_CanaryLoss(criterion),
        data_loader=DataLoader(data, batch_size=logical_batch), noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, max_physical_batch_size=micro_batch,
        sample_generator=torch.Generator().manual_seed(seed + 1),
        noise_generator=torch.Generator(device=device_).manual_seed(seed + 2), memory=memory,
    )
    expected = float(engine.plan.logical_batch_size)
    scores = np.zeros(canaries)
    before = head.detach()[:canaries, 0].double().cpu().clone()
    while engine.steps < steps:
        for (x, slot), (y, is_canary) in loader:
            x, y = tree_map(lambda t: t.to(device_) if isinstance(t, torch.Tensor) else t, (x, y))
            loss = dp_criterion(model(x, slot.to(device_)), (y, is_canary.to(device_)))
            taken = engine.steps
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if engine.steps > taken:
                after = head.detach()[:canaries, 0].double().cpu().clone()
                # SGD at lr 1: the step is −(S + noise)/L, S_j = C when canary j was drawn
                update = ((before - after) * expected / max_grad_norm).numpy()
                scores += canary_scores(update[None], engine.ledger.entries[-1][0].sample_rate, noise_multiplier)
                before = after
                if engine.steps == steps:
                    break

    entries = engine.ledger.entries
    events = {event for event, _ in entries}
    if len(events) != 1 or not isinstance(next(iter(events)), PoissonGaussian):
        raise RuntimeError(f"the audit expects {steps} Poisson-sampled Gaussian steps in the ledger, got {entries}")
    q = float(next(iter(events)).sample_rate)
    counts = guess_counts(scores, included)
    bound, sigma_star = dpsgd_epsilon_lower_bound(
        canaries, counts, sample_rate=q, steps=steps, noise_multiplier=noise_multiplier, delta=delta,
        confidence=confidence,
    )
    per_choice = 1 - (1 - confidence) / len(counts)
    steinke = max(epsilon_lower_bound(canaries, r, v, delta, per_choice) for r, v in counts)
    return AuditResult(
        claimed_epsilon=float(engine.get_epsilon(delta)), epsilon_lower_bound=bound,
        epsilon_lower_bound_any_mechanism=float(steinke), delta=delta, confidence=confidence,
        canaries=canaries, included=int(included.sum()), noise_multiplier=float(noise_multiplier),
        noise_multiplier_bound=sigma_star, max_grad_norm=float(max_grad_norm), sample_rate=q, steps=steps,
        guesses=tuple(r for r, _ in counts), correct=tuple(v for _, v in counts), accountant=accountant,
        seconds=time.perf_counter() - started,
    )


def _resolve_workload(workload: Any) -> tuple[Callable[[], Any], Any, Any]:
    from dpclip.workloads import Workload, load_workload

    if isinstance(workload, str):
        workload = load_workload(workload)
    if not isinstance(workload, Workload):
        raise ValueError(f"Expected workload to be a dpclip.workloads.Workload or a spec string, got {type(workload).__name__}")
    return workload.model_fn, workload.dataset, workload.criterion


class _CanaryData(Dataset):
    """The workload's examples, then the included canaries: ((x, slot), (y, is_canary)).

    A real example's slot is m (a spare row no loss reads); canary j's slot is j, and
    its x, y are the first example's (its model loss is discarded)."""

    def __init__(self, dataset: Dataset, canaries: np.ndarray, m: int) -> None:
        self.dataset, self.canaries, self.m = dataset, [int(j) for j in canaries], m
        self._stand_in = dataset[0]

    def __len__(self) -> int:
        return len(self.dataset) + len(self.canaries)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[tuple[Any, torch.Tensor], tuple[Any, torch.Tensor]]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if i < n:
            x, y = self.dataset[i]
            return (x, torch.tensor(self.m)), (y, torch.tensor(False))
        x, y = self._stand_in
        return (x, torch.tensor(self.canaries[i - n])), (y, torch.tensor(True))


class _WithCanaries(nn.Module):
    """The user's model and the canary head: one scalar per canary (an embedding row),
    plus a spare row m for the real examples."""

    def __init__(self, model: nn.Module, m: int, scale: float) -> None:
        super().__init__()
        self.model = model
        self.canary = nn.Embedding(m + 1, 1)
        nn.init.zeros_(self.canary.weight)
        self.scale = scale

    def forward(self, x: Any, slot: torch.Tensor) -> tuple[Any, torch.Tensor]:
        return self.model(x), self.scale * self.canary(slot).squeeze(-1)


class _CanaryLoss(nn.Module):
    """The user's loss for a real example, the canary's score for a canary."""

    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion
        self.reduction = criterion.reduction

    def forward(self, output: tuple[Any, torch.Tensor], target: tuple[Any, torch.Tensor]) -> torch.Tensor:
        (out, score), (y, is_canary) = output, target
        losses = per_example_losses(self.criterion, out, y)
        if losses.shape[0] != is_canary.shape[0]:
            raise ValueError(
                f"the workload's criterion returned {losses.shape[0]} losses for a micro-batch of "
                f"{is_canary.shape[0]} examples: it needs one loss per example (shape [B] or [B, ...]). "
                "Flattening [B, T, V] logits to [B·T, V] gives one loss per token: keep the batch "
                "dimension, e.g. nn.CrossEntropyLoss on logits.transpose(1, 2) with labels [B, T]"
            )
        losses = torch.where(is_canary, score.to(losses.dtype), losses)
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()
