"""PrivacyEngine: make a model, optimizer, criterion and loader private, Opacus-style."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import secrets
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from opacus.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)
from torch.optim import Optimizer
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

import accounting
from accounting import CountedShuffledGaussian, Event, Ledger, PoissonGaussian, ShuffledGaussian
from accounting.calibrate import step_event
from accounting.events import validate_int, validate_positive
from dpclip.allocator import keep_freed_memory
from dpclip.budget import PrivacyBudget, PrivacyBudgetExceeded
from dpclip.clipping import ClippingPlan, PerSampleClipper, validate_clipping, validate_module
from dpclip.clipping.memory import check_memory
from dpclip.distributed import (
    World, agree, data_fingerprint, inner_module, parameter_fingerprint, shared_seed, stop_ddp_sync, world_of,
)
from dpclip.loss import REDUCTIONS, DPCriterion
from dpclip.optimizer import DPOptimizer, LogicalBatchError
from dpclip.report import FOREIGN_BATCHES, PrivacyReport, make_report
from dpclip.sampling import (
    FixedSchedule,
    GroupedBatchSampler,
    MicroBatchSchedule,
    PlannedSchedule,
    PoissonMicroBatchSampler,
    Sampling,
    encode_generator_state,
    micro_batch_rows,
    restore_generator_state,
    wrap_data_loader,
)
from dpclip.secure import SecureRandom
from dpclip.uses import ExampleUses

__all__ = [
    "ENGINE_SCHEMA",
    "LogicalBatchPlan",
    "PrivacyEngine",
    "check_ledger_against_plan",
    "plan_logical_batches",
    "poisson_indices",
]

#: Version tag of ``PrivacyEngine.state_dict()``. Version 1 states (no generator
#: states or sampling position) can be reported on but not resumed from.
ENGINE_SCHEMA = "dpclip.engine/2"
READABLE_ENGINE_SCHEMAS = ("dpclip.engine/1", ENGINE_SCHEMA)

# Objects already made private (by any engine): wrapping twice would clip twice.
_CLAIMED: "weakref.WeakSet[Any]" = weakref.WeakSet()


@dataclass(frozen=True)
class LogicalBatchPlan:
    """Sizes of one training run's logical batches, and how they are drawn.

    Attributes:
        dataset_size: N.
        logical_batch_size: L, expected examples per optimizer step (the
            divisor of the clipped sum; not an integer for an Opacus
            ``DPDataLoader``, whose expected batch is q·N).
        micro_batch_size: B with ``accumulation_steps`` (expected, for a
            ``DPDataLoader``), or M, the largest micro-batch, with
            ``max_physical_batch_size``.
        accumulation_steps: k micro-batches per logical batch, or None when
            the count varies (``max_physical_batch_size``).
        sample_rate: q of one draw: L/N for a Poisson logical batch or a
            shuffled batch; each micro-batch's rate for independent Poisson
            micro-batches.
        steps_per_epoch: optimizer steps in one pass of the returned loader.
        sampling: how batches are drawn, which fixes the event each step records.
        index_set: which examples Poisson sampling draws from: "all" (the whole
            dataset), or "sha256:…" of the sorted indices the loader's sampler can
            yield (a training split), so a resumed run can check it is the same set.
        processes: W, the processes training together (``dpclip.distributed``); the
            micro-batch is per process, L = W·k·B.
    """

    dataset_size: int
    logical_batch_size: float
    micro_batch_size: float
    accumulation_steps: int | None
    sample_rate: float
    steps_per_epoch: int
    sampling: Sampling
    index_set: str = "all"
    processes: int = 1

    def event(self, noise_multiplier: float, micro_batches: int, added_uses: int = 1) -> Event:
        """The privacy event of one optimizer step that summed ``micro_batches`` micro-batches
        (and, for shuffled batches, raised the worst example's count of uses by ``added_uses``)."""
        if self.sampling is Sampling.SHUFFLED:
            return CountedShuffledGaussian(self.sample_rate, noise_multiplier, added_uses)
        if self.sampling is Sampling.INDEPENDENT_POISSON:
            return step_event(self.sample_rate, noise_multiplier, micro_batches)
        return PoissonGaussian(self.sample_rate, noise_multiplier)


def plan_logical_batches(
    data_loader: DataLoader,
    *,
    accumulation_steps: int | None,
    max_physical_batch_size: int | None,
    poisson_sampling: bool,
    world_size: int = 1,
) -> LogicalBatchPlan:
    """Validate the loader and batching arguments; derive L, q, steps per epoch and the sampling.

    A loader drawn by Opacus's ``UniformWithReplacementSampler`` (an Opacus
    ``DPDataLoader``) keeps its own sampler: each of its batches is a Poisson
    draw at its ``sample_rate``.

    With ``world_size`` W > 1 processes (``dpclip.distributed``) the loader's batch is
    per rank: L = W·k·B (W times the loader's batch with ``max_physical_batch_size``),
    drawn by dpclip's Poisson sampler over the whole dataset.
    """
    if not isinstance(data_loader, DataLoader):
        raise ValueError(f"Expected data_loader to be a torch DataLoader, got {type(data_loader)}")
    if accumulation_steps is not None and max_physical_batch_size is not None:
        raise ValueError(
            "pass accumulation_steps (loader batch = micro-batch) or max_physical_batch_size "
            "(loader batch = logical batch), not both"
        )
    if not isinstance(poisson_sampling, bool):
        raise ValueError(f"Expected poisson_sampling to be a bool, got {poisson_sampling!r}")
    try:
        n = len(data_loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("data_loader.dataset must have a len(): dpclip samples by index") from None
    if n < 1:
        raise ValueError("data_loader.dataset is empty")
    sampler = data_loader.batch_sampler
    if isinstance(sampler, DistributedUniformWithReplacementSampler):
        raise ValueError(
            "data_loader is a distributed Opacus DPDataLoader, whose ranks draw independently: "
            "pass a plain DataLoader over the whole dataset (the same on every rank); dpclip "
            "draws one global Poisson logical batch per step and gives each rank its share"
        )
    if world_size > 1:
        if isinstance(sampler, UniformWithReplacementSampler):
            raise ValueError(
                "data_loader is an Opacus DPDataLoader, which would draw on each rank on its "
                "own: with several processes pass a plain DataLoader over the whole dataset "
                "(the same on every rank)"
            )
        if not poisson_sampling:
            raise ValueError(
                "poisson_sampling=False is not supported with several processes (each rank's "
                "shuffled batches are not accounted across ranks): leave poisson_sampling=True"
            )
    if isinstance(sampler, UniformWithReplacementSampler):
        return _plan_opacus_poisson(sampler, n, accumulation_steps, max_physical_batch_size, poisson_sampling)
    batch = data_loader.batch_size
    if batch is None:
        prepared = type(data_loader).__module__.startswith("accelerate")
        raise ValueError(
            "data_loader.batch_size is None (custom batch_sampler): dpclip reads the "
            "batch size from it; build the loader with batch_size="
            + (
                ". This loader is accelerate's (accelerator.prepare replaces the batch size by "
                "a batch sampler): call make_private with the loader you built, then prepare "
                "the loader make_private returns" if prepared else ""
            )
        )
    if max_physical_batch_size is not None:
        m = validate_int("max_physical_batch_size", max_physical_batch_size)
        k, logical, micro = None, world_size * batch, m
    else:
        k = validate_int("accumulation_steps", 1 if accumulation_steps is None else accumulation_steps)
        logical, micro = world_size * k * batch, batch
    index_set = "all"
    if poisson_sampling:
        indices = poisson_indices(data_loader)
        if indices is not None:
            n = len(indices)
            digest = hashlib.sha256(",".join(map(str, sorted(indices))).encode()).hexdigest()
            index_set = f"sha256:{digest}"
    if logical > n:
        ranks = f" over {world_size} processes" if world_size > 1 else ""
        raise ValueError(
            f"logical batch L={logical}{ranks} exceeds the dataset size N={n} (the examples the "
            "loader's sampler yields; sample rate L/N > 1)"
        )
    if poisson_sampling:
        steps, sampling = n // logical, Sampling.POISSON
    else:
        inner = getattr(data_loader.batch_sampler, "sampler", None)
        if isinstance(inner, WeightedRandomSampler) or (isinstance(inner, RandomSampler) and inner.replacement):
            raise ValueError(
                "poisson_sampling=False needs a loader that visits each example at most once per "
                "pass (the no-amplification bound counts one batch per example per epoch); this "
                "loader samples with replacement"
            )
        steps = math.ceil(len(data_loader) / k) if k is not None else len(data_loader)
        sampling = Sampling.SHUFFLED
    return LogicalBatchPlan(n, logical, micro, k, logical / n, steps, sampling, index_set, world_size)


def poisson_indices(data_loader: DataLoader) -> list[int] | None:
    """The dataset indices Poisson sampling draws from: those the loader's sampler can
    yield (None: the whole dataset). Raises ``ValueError`` for a sampler whose index set
    cannot be read, rather than sample examples it would never have yielded."""
    sampler, n = data_loader.sampler, len(data_loader.dataset)  # type: ignore[arg-type]
    if isinstance(sampler, SequentialSampler):
        return None
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == n:
        return None
    if isinstance(sampler, DistributedSampler):
        # each rank's shard of the whole dataset: dpclip draws from all of it, and gives
        # each rank its share of every logical batch instead
        return None
    if isinstance(sampler, SubsetRandomSampler):
        indices = [int(i) for i in sampler.indices]
        if not indices:
            raise ValueError("the loader's SubsetRandomSampler has no indices: nothing to train on")
        if len(set(indices)) != len(indices) or min(indices) < 0 or max(indices) >= n:
            raise ValueError(
                "the loader's SubsetRandomSampler repeats indices or has indices outside the "
                f"dataset (0..{n - 1}): Poisson sampling draws each example at most once per step"
            )
        return indices
    raise ValueError(
        f"poisson_sampling=True draws each logical batch itself, from the examples the loader's "
        f"sampler can yield, but it cannot tell which examples a {type(sampler).__name__} yields "
        "(or it repeats them): pass a torch.utils.data.Subset of the dataset (or "
        "SubsetRandomSampler(indices)) with a plain loader, or poisson_sampling=False to keep "
        "this sampler's batches"
    )


def _plan_opacus_poisson(
    sampler: UniformWithReplacementSampler,
    n: int,
    accumulation_steps: int | None,
    max_physical_batch_size: int | None,
    poisson_sampling: bool,
) -> LogicalBatchPlan:
    q = float(sampler.sample_rate)
    if not poisson_sampling:
        raise ValueError(
            "poisson_sampling=False, but data_loader is an Opacus DPDataLoader, whose batches "
            "are Poisson draws: leave poisson_sampling at True"
        )
    draws = len(sampler)
    if max_physical_batch_size is not None:
        # Each draw is one logical batch, split: exactly one Poisson step at q.
        m = validate_int("max_physical_batch_size", max_physical_batch_size)
        return LogicalBatchPlan(n, q * n, m, None, q, draws, Sampling.POISSON)
    k = validate_int("accumulation_steps", 1 if accumulation_steps is None else accumulation_steps)
    sampling = Sampling.POISSON if k == 1 else Sampling.INDEPENDENT_POISSON
    return LogicalBatchPlan(n, k * q * n, q * n, k, q, math.ceil(draws / k), sampling)


class PrivacyEngine:
    """Drop-in replacement for ``opacus.PrivacyEngine`` with correct accumulation.

    Args:
        accountant: how ``get_epsilon`` turns the ledger into ε: "prv"
            (default, tight numerical bound), "rdp", "pld" (the only one for
            an Opacus ``DPDataLoader`` accumulated over k > 1 micro-batches)
            or "gdp" (an approximation, not a bound).
        secure_mode: True draws the noise and the Poisson logical batches from the
            operating system's cryptographically secure generator, four Gaussians
            summed per noise value against floating-point attacks (as Opacus does;
            ``dpclip.secure``, docs/secure_mode.md): about 100× slower noise, runs
            not reproducible, and a resumed run continues with fresh randomness.
            False (default): torch generators, seedable, resumable bit-exactly.

    Example (see examples/quickstart.py for a full run)::

        engine = PrivacyEngine(accountant="prv")
        model, optimizer, criterion, loader = engine.make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
            data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            accumulation_steps=4)
    """

    def __init__(self, accountant: str = "prv", secure_mode: bool = False) -> None:
        if accountant not in accounting.ACCOUNTANTS:
            raise ValueError(
                f"Expected accountant={accountant!r} to be one of {sorted(accounting.ACCOUNTANTS)}"
            )
        if not isinstance(secure_mode, bool):
            raise ValueError(f"Expected secure_mode to be True or False, got {secure_mode!r}")
        self.accountant = accountant
        self.secure_mode = secure_mode
        self.ledger = Ledger()
        self.plan: LogicalBatchPlan | None = None
        self.noise_multiplier: float | None = None
        self.max_grad_norm: float | None = None
        self.optimizer: DPOptimizer | None = None
        self.budget: PrivacyBudget | None = None
        # (ledger steps when computed, steps allowed from there, ledger entries then)
        self._budget_cache: tuple[int, int, tuple[Any, ...]] | None = None
        self._batch_sampler: PoissonMicroBatchSampler | GroupedBatchSampler | None = None
        self._uses: ExampleUses | None = None  # shuffled batches: each example's uses
        self._pending_uses: list[int] = []  # the examples of the step being taken
        #: applied steps with a micro-batch that the returned data loader did not hand out
        self.foreign_steps = 0
        self._pending_foreign = False

    @property
    def steps(self) -> int:
        """Optimizer steps taken (= events in the ledger)."""
        return self.ledger.steps

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        criterion: nn.Module,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        accumulation_steps: int | None = None,
        max_physical_batch_size: int | None = None,
        poisson_sampling: bool = True,
        noise_generator: torch.Generator | None = None,
        sample_generator: torch.Generator | None = None,
        max_epsilon: float | None = None,
        target_delta: float | None = None,
        clipping: str | Mapping[str, str] = "auto",
        check_independence: bool = True,
        memory: str = "auto",
    ) -> tuple[nn.Module, DPOptimizer, DPCriterion, DataLoader]:
        """Wrap the training objects; returns (module, optimizer, criterion, data_loader).

        Args:
            module: the model; trained in place and returned as is (hooks added).
            optimizer: a ``torch.optim`` optimizer over the model's parameters.
                Frozen ones (``requires_grad=False``, e.g. a LoRA model's base
                weights in an optimizer built from ``model.parameters()``) may be
                in it: they get no noise and no update.
            criterion: a loss module with a ``reduction`` of "mean" or "sum".
            data_loader: its ``batch_size`` is the micro-batch size B, or with
                ``max_physical_batch_size`` the logical batch size L.
            noise_multiplier: σ, noise std divided by max_grad_norm (unitless, >= 0).
            max_grad_norm: C, the per-example L2 gradient bound (> 0).
            accumulation_steps: k micro-batches per optimizer step (default 1):
                expected logical batch L = k·B.
            max_physical_batch_size: instead of k: logical batches of expected
                size L = loader batch size, split into micro-batches of at most M
                (the BatchMemoryManager migration).
            poisson_sampling: True (default): each step draws a Poisson logical
                batch at q = L/N and splits it (exactly what ε assumes), over the
                examples the loader's sampler can yield (all of the dataset, or a
                ``SubsetRandomSampler``'s indices; other samplers are refused). False:
                the loader's own shuffled batches are used, k at a time; the
                ledger records ``ShuffledGaussian`` steps, whose ε comes with a
                warning (no amplification by sampling applies). An Opacus
                ``DPDataLoader`` keeps its own sampler: with k > 1 its micro-
                batches are independent Poisson draws, recorded as
                ``IndependentPoissonGaussian`` (exact with accountant "pld").
            noise_generator: source of the Gaussian noise; default: a new
                generator seeded from the operating system. Never give two runs
                the same seeded generator (their noise would repeat): to continue
                a run, ``load_state_dict`` its state, which moves this generator on.
                Refused with ``secure_mode=True``.
            sample_generator: source of the Poisson sampling; same default.
            max_epsilon: a budget cap (with ``target_delta``): the optimizer
                raises ``PrivacyBudgetExceeded`` instead of taking the step
                that would take ε (this engine's accountant) past it, before
                any noise or parameter change, and the step is not recorded.
                Steps with fewer micro-batches than k count as full ones.
            target_delta: the δ at which ``max_epsilon`` is measured.
            clipping: how per-sample gradient norms are computed, per layer:
                "auto" (default: ghost norm or per-sample gradient, whichever the
                layer's shapes make cheaper), "ghost", "per_sample", or a mapping
                from module names to these ("auto" for the rest). All give the
                same update up to rounding; see ``dpclip.PerSampleClipper``.
            check_independence: probe the first micro-batch for examples that
                depend on each other (batch statistics, a batch/sequence transpose,
                a loss over the batch) and raise ``ExamplesMixedError``: one extra
                no-grad forward and criterion call, once per run
                (``dpclip.independence``). Turn it off only for a model you know
                computes each example's outputs from its own inputs alone.
            memory: what the clipping keeps between the backward and the clipped
                sum (``dpclip.clipping.memory``): "fast" keeps each layer's output
                gradient (or per-example gradients) from its norm to the clipped sum
                (one backward pass), "low" keeps nothing and gets the clipped sum
                from a second backward of Σ c_i·ℓ_i through the graph the first
                kept (one more backward pass), "auto" (default) chooses on the
                first micro-batch, before its backward: "low" where "fast" would
                keep more than 0.8 times the bytes of the activations autograd
                saved, else "fast" (``auto_mode``; ``clipping_plan().memory`` says
                which it chose).
                All give the same update up to rounding; under autocast,
                "low"'s clipped sum has the layers' own (bfloat16) rounding, as
                Opacus's does, where "fast" adds it in float32.

        Returns:
            The same module; a ``DPOptimizer`` (step once per logical batch);
            a ``DPCriterion`` whose losses' ``backward()`` clips and accumulates;
            a loader of micro-batches whose ``len()`` is exact: steps per epoch
            (N // L with Poisson sampling) times k, or with
            ``max_physical_batch_size`` the micro-batches of the next epoch.
        """
        if self.optimizer is not None:
            raise RuntimeError(
                "this PrivacyEngine already made a model private; use one engine per training run"
            )
        if not isinstance(module, nn.Module):
            raise ValueError(f"Expected module to be an nn.Module, got {type(module)}")
        world = world_of(module)
        inner = inner_module(module)
        try:
            plan, budget, noise_multiplier, max_grad_norm = self._check_arguments(
                inner, module, optimizer, criterion, data_loader, noise_multiplier, max_grad_norm,
                accumulation_steps, max_physical_batch_size, poisson_sampling, noise_generator,
                sample_generator, max_epsilon, target_delta, clipping, check_independence, memory, world,
            )
        except (ValueError, RuntimeError) as err:
            if world.distributed:  # the other ranks raise too, instead of waiting for this one
                agree(world, err, {})
            raise
        if world.distributed:
            agree(world, None, {
                "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm,
                "accountant": self.accountant, "batching": plan, "clipping": clipping, "memory": memory,
                "max_epsilon": max_epsilon, "target_delta": target_delta,
                "sample_generator": sample_generator, "parameters": parameter_fingerprint(inner),
                "data": data_fingerprint(data_loader.dataset),
            })
            if sample_generator is None:  # one global Poisson draw: the same stream on every rank
                sample_generator = torch.Generator().manual_seed(shared_seed(world))

        # All arguments are valid: from here on, state changes (undone if anything fails,
        # except the process's malloc setting, which changes no result).
        keep_freed_memory()
        try:
            return self._wrap(
                module, optimizer, criterion, data_loader, plan, noise_multiplier,
                max_grad_norm, noise_generator, sample_generator, budget, clipping,
                check_independence, memory, world,
            )
        except BaseException:
            _CLAIMED.discard(module)
            _CLAIMED.discard(inner)
            _CLAIMED.discard(optimizer)
            self.plan = self.noise_multiplier = self.max_grad_norm = None
            self.optimizer = self.budget = self._batch_sampler = self._uses = None
            self._budget_cache = None
            raise

    def _check_arguments(
        self,
        module: nn.Module,
        given: nn.Module,
        optimizer: Optimizer,
        criterion: nn.Module,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        accumulation_steps: int | None,
        max_physical_batch_size: int | None,
        poisson_sampling: bool,
        noise_generator: torch.Generator | None,
        sample_generator: torch.Generator | None,
        max_epsilon: float | None,
        target_delta: float | None,
        clipping: str | Mapping[str, str],
        check_independence: bool,
        memory: str,
        world: World,
    ) -> tuple[LogicalBatchPlan, PrivacyBudget | None, float, float]:
        """``make_private``'s arguments checked (``module``: the model, ``given``: as passed,
        perhaps its DistributedDataParallel); nothing changes. (plan, budget, σ, C)."""
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, DPOptimizer):
            raise ValueError(
                f"Expected optimizer to be a plain torch.optim optimizer, got {type(optimizer)}"
            )
        for name, obj in (("module", given), ("module", module), ("optimizer", optimizer)):
            if obj in _CLAIMED:
                raise RuntimeError(
                    f"this {name} was already made private; make_private it once (build a "
                    "fresh model and optimizer for a new run)"
                )
        if getattr(criterion, "reduction", None) not in REDUCTIONS:
            raise ValueError(
                "Expected criterion to be a loss module with reduction 'mean' or 'sum' "
                "(or nn.KLDivLoss's 'batchmean'), e.g. nn.CrossEntropyLoss(); got "
                f"{criterion!r} with reduction {getattr(criterion, 'reduction', None)!r}"
            )
        noise_multiplier = accounting.events.validate_noise_multiplier(noise_multiplier)
        max_grad_norm = validate_positive("max_grad_norm", max_grad_norm)
        for name, gen in (("noise_generator", noise_generator), ("sample_generator", sample_generator)):
            if gen is not None and not isinstance(gen, torch.Generator):
                raise ValueError(f"Expected {name} to be a torch.Generator, got {type(gen)}")
            if gen is not None and self.secure_mode:
                raise ValueError(
                    f"secure_mode=True draws from the operating system's secure generator: "
                    f"leave {name} out (a torch.Generator is not cryptographically secure)"
                )
        plan = plan_logical_batches(
            data_loader,
            accumulation_steps=accumulation_steps,
            max_physical_batch_size=max_physical_batch_size,
            poisson_sampling=poisson_sampling,
            world_size=world.size,
        )
        if self.secure_mode and world.distributed:
            raise ValueError(
                "secure_mode=True is not supported with several processes yet (each rank's secure "
                "generator would draw its own logical batches): train in one process, or leave "
                "secure_mode False"
            )
        if self.secure_mode and (
            plan.sampling is not Sampling.POISSON
            or isinstance(data_loader.batch_sampler, UniformWithReplacementSampler)
        ):
            raise ValueError(
                "secure_mode=True samples with dpclip's own Poisson sampler; this loader's batches "
                "would come from torch's generator (poisson_sampling=False, or an Opacus "
                "DPDataLoader): pass a plain DataLoader and poisson_sampling=True"
            )
        if plan.sampling is Sampling.INDEPENDENT_POISSON:
            largest = plan.event(noise_multiplier, plan.accumulation_steps)
            if not accounting.ACCOUNTANTS[self.accountant]().supports(largest):
                raise ValueError(
                    f"accountant={self.accountant!r} cannot account this run's steps exactly "
                    f"({largest!r}): use PrivacyEngine(accountant="
                    f"{accounting.accountants_supporting(largest)[0]!r})"
                )
        validate_module(module)
        validate_clipping(module, clipping)
        check_memory(memory)
        if not isinstance(check_independence, bool):
            raise ValueError(f"Expected check_independence to be True or False, got {check_independence!r}")
        # Frozen parameters of the module may be in the optimizer (one built from
        # model.parameters() around a PEFT/LoRA model): they get no gradient, so no
        # noise and no update. A parameter from elsewhere is not clipped at all.
        owned = set(module.parameters())
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p not in owned:
                    raise ValueError(
                        f"the optimizer has a parameter of shape {tuple(p.shape)} that is not a "
                        "parameter of module: per-example clipping covers the module's "
                        "parameters only. Build the optimizer from module.parameters()"
                    )

        budget = None
        if (max_epsilon is None) != (target_delta is None):
            raise ValueError("pass max_epsilon and target_delta together (the budget is ε at a δ)")
        if max_epsilon is not None:
            budget = PrivacyBudget(max_epsilon, target_delta, self.accountant)

        return plan, budget, noise_multiplier, max_grad_norm

    def _wrap(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        criterion: nn.Module,
        data_loader: DataLoader,
        plan: LogicalBatchPlan,
        noise_multiplier: float,
        max_grad_norm: float,
        noise_generator: torch.Generator | None,
        sample_generator: torch.Generator | None,
        budget: PrivacyBudget | None,
        clipping: str | Mapping[str, str],
        check_independence: bool,
        memory: str,
        world: World,
    ) -> tuple[nn.Module, DPOptimizer, DPCriterion, DataLoader]:
        given, module = module, inner_module(module)
        trainable = [p for p in module.parameters() if p.requires_grad]
        device = trainable[0].device
        if self.secure_mode:
            noise_generator, sample_generator = SecureRandom(), SecureRandom()
        if noise_generator is None:
            noise_generator = _os_seeded_generator(device)
        if sample_generator is None:
            sample_generator = _os_seeded_generator(torch.device("cpu"))
        schedule: MicroBatchSchedule
        own_sampler = isinstance(data_loader.batch_sampler, UniformWithReplacementSampler)
        if plan.sampling is Sampling.POISSON and not own_sampler and plan.accumulation_steps:
            schedule = FixedSchedule(plan.accumulation_steps)
        else:
            schedule = PlannedSchedule()
        if plan.sampling is Sampling.POISSON and not own_sampler:
            batch_sampler: PoissonMicroBatchSampler | GroupedBatchSampler = PoissonMicroBatchSampler(
                num_samples=plan.dataset_size,
                sample_rate=plan.sample_rate,
                steps=plan.steps_per_epoch,
                generator=sample_generator,
                micro_batches=plan.accumulation_steps,
                max_micro_batch_size=None if plan.accumulation_steps else int(plan.micro_batch_size),
                schedule=schedule,
                indices=poisson_indices(data_loader),
                shard=(world.rank, world.size),
            )
        else:
            batch_sampler = GroupedBatchSampler(
                data_loader.batch_sampler,
                schedule,  # type: ignore[arg-type]
                micro_batches=plan.accumulation_steps,
                max_micro_batch_size=None if plan.accumulation_steps else int(plan.micro_batch_size),
            )
        uses = ExampleUses(plan.dataset_size) if plan.sampling is Sampling.SHUFFLED else None
        self._batch_sampler, self._uses = batch_sampler, uses
        self.plan = plan
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.budget = budget
        self._budget_cache = None
        clipper = PerSampleClipper(
            module, max_grad_norm, clipping, check_independence=check_independence, memory=memory
        )
        try:
            return self._finish_wrap(
                given, optimizer, criterion, data_loader, clipper, noise_generator, batch_sampler, world
            )
        except BaseException:
            clipper.remove()  # the module leaves as it came
            raise

    def _finish_wrap(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        criterion: nn.Module,
        data_loader: DataLoader,
        clipper: PerSampleClipper,
        noise_generator: torch.Generator | SecureRandom,
        batch_sampler: PoissonMicroBatchSampler | GroupedBatchSampler,
        world: World,
    ) -> tuple[nn.Module, DPOptimizer, DPCriterion, DataLoader]:
        plan, budget, uses = self.plan, self.budget, self._uses
        dp_optimizer = DPOptimizer(
            optimizer,
            clipper=clipper,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=plan.logical_batch_size,
            schedule=batch_sampler.schedule,
            accumulation_steps=plan.accumulation_steps,
            ledger=self.ledger,
            step_event=self._step_event,
            generator=noise_generator,
            step_guard=self._check_budget,
            world=world,
        )
        self.optimizer = dp_optimizer
        if uses is not None:
            dp_optimizer.step_callbacks.append(self._count_uses)
        dp_optimizer.step_callbacks.append(self._count_foreign)
        _CLAIMED.add(module)
        _CLAIMED.add(clipper.module)
        _CLAIMED.add(optimizer)
        stop_ddp_sync(module)
        if budget is not None:
            self._budget_state()  # the steps the cap allows, known from the start
        loader = wrap_data_loader(data_loader, batch_sampler)
        clipper.recorder.independence.data_rows = functools.partial(
            micro_batch_rows, loader.dataset, loader.collate_fn, batch_sampler.schedule
        )
        if world.distributed:
            # it yields this rank's share of each global logical batch already: accelerate's
            # prepare() must not shard it again (the attribute it checks for that)
            loader._is_accelerate_prepared = True
        return module, dp_optimizer, DPCriterion(criterion, dp_optimizer), loader

    def _step_event(self, micro_batches: int, examples: list[int] | None) -> Event:
        added = 1
        self._pending_foreign = examples is None
        if self._uses is not None:
            if examples is None:
                raise LogicalBatchError(
                    "with poisson_sampling=False every micro-batch must come from the data loader "
                    "make_private returned (the sound ε bound counts each example's uses): this "
                    "logical batch had a micro-batch from elsewhere; it was not applied"
                )
            added = self._uses.added(examples)
            self._pending_uses = examples
        return self.plan.event(self.noise_multiplier, micro_batches, added)

    def _count_foreign(self) -> None:
        # after the step is recorded: a refused step is no step
        if not self._pending_foreign:
            return
        self.foreign_steps += 1
        if self.foreign_steps == 1:
            warnings.warn(
                f"{FOREIGN_BATCHES}. The ε of this run understates its privacy loss, and its "
                "report says so: iterate the data loader make_private returned",
                stacklevel=4,  # the user's optimizer.step() or loss.backward()
            )

    def _count_uses(self) -> None:
        # after the step is recorded: the uses of a refused step are never counted
        self._uses.commit(self._pending_uses)

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        criterion: nn.Module,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float,
        accumulation_steps: int | None = None,
        max_physical_batch_size: int | None = None,
        poisson_sampling: bool = True,
        noise_generator: torch.Generator | None = None,
        sample_generator: torch.Generator | None = None,
        max_epsilon: float | None = None,
        clipping: str | Mapping[str, str] = "auto",
        check_independence: bool = True,
        memory: str = "auto",
    ) -> tuple[nn.Module, DPOptimizer, DPCriterion, DataLoader]:
        """``make_private`` with the smallest σ (this engine's accountant) such that
        ``epochs`` epochs of optimizer steps at q = L/N are (target_epsilon, target_delta)-DP."""
        epochs = validate_int("epochs", epochs)
        plan = plan_logical_batches(
            data_loader,
            accumulation_steps=accumulation_steps,
            max_physical_batch_size=max_physical_batch_size,
            poisson_sampling=poisson_sampling,
            world_size=world_of(module).size,
        )
        independent = plan.sampling is Sampling.INDEPENDENT_POISSON
        if plan.sampling is Sampling.SHUFFLED:
            warnings.warn(
                "poisson_sampling=False: σ is calibrated as if batches were Poisson samples at "
                f"q = L/N; shuffled batches give no such amplification, so ε={target_epsilon} is "
                "not guaranteed",
                accounting.SamplingAssumptionWarning,
                stacklevel=2,
            )
        sigma = accounting.calibrate_noise(
            target_epsilon=target_epsilon,
            delta=target_delta,
            sample_rate=plan.sample_rate,
            steps=epochs * plan.steps_per_epoch,
            method=self.accountant,
            micro_batches=plan.accumulation_steps if independent else 1,
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            accumulation_steps=accumulation_steps,
            max_physical_batch_size=max_physical_batch_size,
            poisson_sampling=poisson_sampling,
            noise_generator=noise_generator,
            sample_generator=sample_generator,
            max_epsilon=max_epsilon,
            target_delta=None if max_epsilon is None else target_delta,
            clipping=clipping,
            check_independence=check_independence,
            memory=memory,
        )

    def get_epsilon(self, delta: float, *, no_amplification: bool = False) -> float:
        """ε spent so far at ``delta``, by this engine's accountant.

        With ``poisson_sampling=False`` the ledger holds ``ShuffledGaussian``
        steps: ε is then the Poisson figure with a ``SamplingAssumptionWarning``,
        or with ``no_amplification=True`` the sound per-epoch bound.
        """
        return self.ledger.epsilon(delta, method=self.accountant, no_amplification=no_amplification)


    @property
    def steps_remaining(self) -> int | None:
        """Optimizer steps the budget cap still allows (None without a cap)."""
        if self.budget is None or self.plan is None or self.noise_multiplier is None:
            return None
        base, allowed = self._budget_state()
        return max(0, allowed - (self.ledger.steps - base))

    def _budget_state(self) -> tuple[int, int]:
        # The k-micro-batch event dominates shorter logical batches: count every step as one.
        event = self.plan.event(self.noise_multiplier, self.plan.accumulation_steps or 1)
        entries = self.ledger.entries
        cache = self._budget_cache
        if cache is None or not self.budget.covers(cache[2], entries, event):
            # First use, or the ledger changed otherwise than by this run's steps (merge, load).
            cache = (self.ledger.steps, self.budget.steps_allowed(self.ledger, event), entries)
            self._budget_cache = cache
        return cache[0], cache[1]

    def _check_budget(self, event: accounting.Event) -> None:
        if self.budget is None:
            return
        if self.steps_remaining == 0:
            # the budget is spent: this logical batch can never be applied. Its clipped sums
            # are dropped (no parameter, noise or ledger changed), so that the run can save
            # its final state (state_dict() refuses a logical batch in progress)
            micro_batches = self.optimizer.micro_batches_accumulated
            self.optimizer._reset_logical_batch()
            raise PrivacyBudgetExceeded(
                f"step {self.ledger.steps + 1} would take ε past max_epsilon={self.budget.max_epsilon:g} "
                f"at delta={self.budget.delta:g} ({self.budget.method}); it was not taken, and its "
                f"logical batch ({micro_batches} micro-batches) was dropped: "
                f"ε so far is {self.ledger.epsilon(self.budget.delta, self.budget.method):.4f}. "
                "Save the model and engine.state_dict() now"
            )

    def add_step_callback(self, callback: Callable[["PrivacyEngine"], None]) -> None:
        """Call ``callback(engine)`` after every optimizer step (e.g. ``dpclip.callbacks.CSVLogger``)."""
        if self.optimizer is None:
            raise RuntimeError("call make_private before adding step callbacks")
        self.optimizer.step_callbacks.append(lambda: callback(self))

    def _summary(self) -> dict[str, Any]:
        """What ε depends on: settings, batching and the ledger (no generator states)."""
        if self.plan is None:
            raise RuntimeError("nothing to save: call make_private first")
        plan = dataclasses.asdict(self.plan)
        plan["sampling"] = self.plan.sampling.value
        if plan["processes"] == 1:  # (as states saved before several processes were supported)
            del plan["processes"]
        budget = None
        if self.budget is not None:
            budget = {
                "max_epsilon": self.budget.max_epsilon,
                "delta": self.budget.delta,
                "steps_remaining": self.steps_remaining,
            }
        return {
            "schema": ENGINE_SCHEMA,
            "accountant": self.accountant,
            "secure_mode": self.secure_mode,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "plan": plan,
            "budget": budget,
            "ledger": self.ledger.state_dict(),
            # (left out when 0, as states saved before it was counted)
            **({"foreign_steps": self.foreign_steps} if self.foreign_steps else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything the run's privacy and its future noise and batches depend on,
        JSON-serialisable (schema ``dpclip.engine/2``); take it between logical batches.

        Save it with the model and optimizer checkpoint; ``load_state_dict`` in a
        new process continues bit-exactly (same noise, same batches, same ledger),
        ``dpclip report`` reads it.

        .. warning:: It holds the noise generator's state, from which the noise
           of past and future steps can be recomputed: keep checkpoints as private
           as the training data, and release only the model (or ``report()``).

        Raises:
            RuntimeError: a logical batch is in progress (micro-batches accumulated
                since the last applied step): its clipped sum cannot be saved.
        """
        state = self._summary()
        if self.optimizer.micro_batches_accumulated:
            raise RuntimeError(
                f"a logical batch is in progress ({self.optimizer.micro_batches_accumulated} "
                "micro-batches accumulated, not yet applied): save the engine state right after "
                "an optimizer.step() that applied (optimizer.micro_batches_accumulated == 0)"
            )
        schedule = self.optimizer.schedule
        spent = self.budget is not None and self.steps_remaining == 0
        if schedule.left_early and not schedule._active and not spent:
            warnings.warn(
                "engine.state_dict() after the loop broke out of the DP loader's pass: that pass "
                "ended there, so this state resumes with a new pass (as this process would if it "
                "iterated the loader again), not inside the one the loop left. To resume inside a "
                "pass, take the state inside the loop, right after an optimizer.step() that applied",
                stacklevel=2,
            )
        generator = self.optimizer.generator
        state["rng"] = {
            "noise": encode_generator_state(generator) if isinstance(generator, torch.Generator) else None,
            "sampling": self._batch_sampler.position(),
        }
        state["example_uses"] = None if self._uses is None else self._uses.state_dict()
        # the mode memory="auto" chose: a resumed run takes the same (the modes' rounding differs)
        state["memory_mode"] = self.optimizer.clipper.chosen_mode
        return state

    def load_state_dict(self, state: dict[str, Any], *, replace_steps: bool = False) -> None:
        """Resume: continue the run saved by ``state_dict`` (ledger, noise, batches).

        The engine must have been made private with the same settings (σ, C,
        batching, sampling, examples, secure mode: checked), and every step in
        the saved ledger must be one this run's plan could have recorded. Nothing
        changes unless the whole state is accepted.

        Args:
            state: a ``state_dict()``.
            replace_steps: an engine that has already taken steps refuses a state,
                since the steps it took would be forgotten; True replaces its ledger
                (and generators) with the saved ones. Only do that when the model
                and optimizer are rolled back to the same checkpoint: the privacy
                cost of the discarded steps is then dropped with their updates.
        """
        if self.plan is None:
            raise RuntimeError("call make_private before load_state_dict")
        if not isinstance(state, dict) or state.get("schema") != ENGINE_SCHEMA:
            got = state.get("schema") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"Expected an engine state with schema {ENGINE_SCHEMA!r}, got {got!r} (states of "
                "dpclip.engine/1 hold no generator states: they can be reported on, not resumed)"
            )
        if not isinstance(replace_steps, bool):
            raise ValueError(f"Expected replace_steps to be True or False, got {replace_steps!r}")
        mine = self._summary()
        for key in ("noise_multiplier", "max_grad_norm", "secure_mode"):
            if state.get(key) != mine[key]:
                raise ValueError(f"saved {key}={state.get(key)!r} differs from this engine's {mine[key]!r}")
        if state.get("plan") != mine["plan"]:
            saved = state.get("plan") if isinstance(state.get("plan"), dict) else {}
            changed = [
                f"{key} {saved.get(key)!r} saved, {mine['plan'].get(key)!r} here"
                for key in sorted(set(saved) | set(mine["plan"])) if saved.get(key) != mine["plan"].get(key)
            ]
            what = "; ".join(changed) or repr(state.get("plan"))
            raise ValueError(
                f"the saved batching differs from this engine's ({what}): "
                "the state resumes only the run it was saved from. Make the model private as that run "
                "did (the same dataset, batch size, accumulation steps or max_physical_batch_size, "
                "sampling and processes), or start a new run (and account for both)"
            )
        ledger = Ledger()
        ledger.load_state_dict(state.get("ledger"))
        check_ledger_against_plan(ledger, self.plan, self.noise_multiplier)
        uses = None
        if self._uses is not None:
            uses = ExampleUses(self.plan.dataset_size)
            uses.load_state_dict(state.get("example_uses"))
            recorded = sum(e.added_uses * n for e, n in ledger.entries)  # type: ignore[union-attr]
            if recorded != uses.worst:
                raise ValueError(
                    f"the saved ledger counts {recorded} uses of the most-used example, its "
                    f"example-use state {uses.worst}: the state is not from one run"
                )
        foreign = state.get("foreign_steps", 0)
        if isinstance(foreign, bool) or not isinstance(foreign, int) or not 0 <= foreign <= ledger.steps:
            raise ValueError(f"Expected the saved foreign_steps to be an int in [0, {ledger.steps}], got {foreign!r}")
        rng = state.get("rng")
        if not isinstance(rng, dict) or set(rng) != {"noise", "sampling"}:
            raise ValueError("the saved state has no generator states ('rng'): it cannot be resumed")
        position = _checked_position(rng["sampling"])
        memory_mode = state.get("memory_mode")
        if memory_mode not in (None, "fast", "low"):
            raise ValueError(f"Expected the saved memory_mode to be 'fast', 'low' or None, got {memory_mode!r}")
        if self.ledger.steps or self.optimizer.micro_batches_accumulated:
            if self.optimizer.micro_batches_accumulated:
                raise RuntimeError(
                    "a logical batch is in progress: load the state before training, or after a step"
                )
            if not replace_steps:
                raise RuntimeError(
                    f"this engine has taken {self.ledger.steps} steps, which loading would forget "
                    f"(the saved run has {ledger.steps}): load a checkpoint into a fresh engine, or "
                    "pass replace_steps=True when the model is rolled back to the same checkpoint"
                )
        generator = self.optimizer.generator
        if isinstance(generator, torch.Generator):
            if not isinstance(rng["noise"], str):
                raise ValueError("the saved state has no noise generator state")
            before = generator.get_state()
            restore_generator_state(generator, rng["noise"])
        try:
            self._batch_sampler.load_position(position)
        except Exception as err:
            if isinstance(generator, torch.Generator):
                generator.set_state(before)
            raise ValueError(f"cannot resume the saved sampling position: {err}") from None
        self.ledger.load_state_dict(state["ledger"])
        self.foreign_steps = foreign
        if uses is not None:
            self._uses = uses
        self.optimizer.clipper.resume_mode(memory_mode)
        self._budget_cache = None

    def clipping_plan(self) -> ClippingPlan:
        """Per layer of the private model: the rule and strategy its per-example gradient
        norms take and, after the first micro-batch, its share of dpclip's backward() time;
        ``print()`` it for a table (``dpclip.clipping.plan``). Layers on the exact graph
        path are the slow ones."""
        if self.optimizer is None:
            raise RuntimeError("no private model to show the clipping plan of: call make_private first")
        return self.optimizer.clipper.plan()

    def report(self, delta: float | None = None) -> PrivacyReport:
        """The run's ``PrivacyReport`` at ``delta`` (default: the budget's δ)."""
        if delta is None:
            if self.budget is None:
                raise ValueError("pass delta (there is no budget whose δ could be used)")
            delta = self.budget.delta
        return make_report(self._summary(), delta)


def check_ledger_against_plan(ledger: Ledger, plan: LogicalBatchPlan, noise_multiplier: float) -> None:
    """Raise ``ValueError`` unless every step in ``ledger`` is one a run with this plan and
    σ records: same q, σ and sampling (a state claiming a lower rate or more noise would
    under-report ε)."""
    k = plan.accumulation_steps or 1
    for event, count in ledger.entries:
        if plan.sampling is Sampling.SHUFFLED:
            allowed = (
                isinstance(event, CountedShuffledGaussian)
                and event == plan.event(noise_multiplier, k, event.added_uses)
            ) or event == ShuffledGaussian(plan.sample_rate, noise_multiplier, plan.steps_per_epoch)
        elif plan.sampling is Sampling.INDEPENDENT_POISSON:
            allowed = any(event == plan.event(noise_multiplier, j) for j in range(1, k + 1))
        else:
            allowed = event == plan.event(noise_multiplier, k)
        if not allowed:
            raise ValueError(
                f"the ledger has {count} step(s) of {event!r}, which a run with this plan "
                f"(q={plan.sample_rate:g}, σ={noise_multiplier:g}, {plan.sampling.value} "
                "sampling) never records: the state does not describe one run"
            )


def _checked_position(position: Any) -> dict[str, Any]:
    if not isinstance(position, dict) or set(position) != {"snapshot", "consumed", "in_pass"}:
        raise ValueError("the saved sampling position is malformed")
    consumed, in_pass = position["consumed"], position["in_pass"]
    if isinstance(consumed, bool) or not isinstance(consumed, int) or consumed < 0:
        raise ValueError(f"the saved sampling position has consumed={consumed!r}")
    if not isinstance(in_pass, bool) or (consumed and not in_pass):
        raise ValueError(f"the saved sampling position has in_pass={in_pass!r}, consumed={consumed!r}")
    snapshot = position["snapshot"]
    ok = snapshot is None or isinstance(snapshot, str) or (
        isinstance(snapshot, dict)
        and set(snapshot) == {"global", "inner"}
        and all(v is None or isinstance(v, str) for v in snapshot.values())
    )
    if not ok:
        raise ValueError("the saved sampling position has a malformed generator snapshot")
    return position


def _os_seeded_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))
