"""Logical batches and their split into micro-batches.

The default sampler draws each logical batch by Poisson sampling at rate
q = L/N (every example independently with probability q), exactly what the
accountant assumes, and yields it as micro-batches. Drawing the size from
Binomial(N, q) and then a uniformly random subset of that size is the same
distribution as N independent coin flips; drawing the sizes first is what
makes ``len()`` exact before the epoch runs.

The optimizer learns where a logical batch ends from a ``MicroBatchSchedule``
that the sampler fills: an explicit plan, not a signal from the loader.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils._pytree import tree_map

__all__ = [
    "FixedSchedule",
    "Sampling",
    "GroupedBatchSampler",
    "MicroBatchSchedule",
    "PlannedSchedule",
    "PoissonMicroBatchSampler",
    "split_evenly",
    "wrap_data_loader",
]


class Sampling(enum.Enum):
    """How a run's logical batches are drawn; it decides the privacy event each step records."""

    #: One Poisson draw at q = L/N per step, split into micro-batches (dpclip's sampler).
    POISSON = "poisson"
    #: Each micro-batch an independent Poisson draw at q (an Opacus ``DPDataLoader``
    #: accumulated k times): a mixture of Gaussians, accounted exactly by PLD.
    INDEPENDENT_POISSON = "independent-poisson"
    #: The loader's own shuffled fixed-size batches: no amplification by sampling.
    SHUFFLED = "shuffled"


class MicroBatchSchedule:
    """How many micro-batches the next logical batch has, and which loader pass it is from."""

    def __init__(self) -> None:
        #: increases each time a pass over the data loader starts
        self.pass_id = 0
        self._active = False

    def next_logical_batch(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    @contextmanager
    def loader_pass(self) -> Iterator[None]:
        """Mark one pass over the loader; a second one may not start inside it."""
        if self._active:
            raise RuntimeError(
                "a second pass over the DP data loader started while another is in progress "
                "(their logical batches would interleave): evaluate on the original loader"
            )
        self._active = True
        self.pass_id += 1
        try:
            yield
        finally:
            self._active = False


class FixedSchedule(MicroBatchSchedule):
    """Every logical batch is ``micro_batches`` micro-batches (``accumulation_steps``)."""

    def __init__(self, micro_batches: int) -> None:
        super().__init__()
        self.micro_batches = micro_batches

    def next_logical_batch(self) -> int:
        return self.micro_batches


class PlannedSchedule(MicroBatchSchedule):
    """Micro-batch counts queued by a sampler, one per logical batch, in order."""

    def __init__(self) -> None:
        super().__init__()
        self._counts: deque[int] = deque()

    def start_epoch(self, counts: Sequence[int]) -> None:
        """Replace the plan with this epoch's counts (a new iteration starts afresh)."""
        self._counts = deque(counts)

    def next_logical_batch(self) -> int:
        if not self._counts:
            raise RuntimeError(
                "no logical batch is planned: with max_physical_batch_size or "
                "poisson_sampling=False, iterate the data loader returned by make_private"
            )
        return self._counts.popleft()


def split_evenly(indices: list[int], parts: int) -> list[list[int]]:
    """``parts`` consecutive chunks whose sizes differ by at most one (some may be empty)."""
    base, extra = divmod(len(indices), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append(indices[start:end])
        start = end
    return out


class PoissonMicroBatchSampler(Sampler[list[int]]):
    """Batch sampler: Poisson logical batches at rate ``sample_rate``, split into micro-batches.

    Args:
        num_samples: N, dataset size.
        sample_rate: q = L / N, each example's probability of joining a logical batch.
        steps: logical batches per epoch.
        micro_batches: k, fixed number of micro-batches per logical batch
            (``accumulation_steps``); sizes differ by at most one, some may be empty.
        max_micro_batch_size: M; instead of ``micro_batches``, split each logical
            batch into ceil(size / M) micro-batches (at least one).
        schedule: told when a pass starts; with ``max_micro_batch_size`` (a
            ``PlannedSchedule``) also given each logical batch's micro-batch count.
        generator: source of randomness; reproducible runs pass a seeded one.

    ``len()`` is the exact number of micro-batches of the next epoch:
    ``steps · k`` with ``micro_batches``; with ``max_micro_batch_size`` it is
    fixed by drawing that epoch's logical batch sizes early.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        steps: int,
        generator: torch.Generator,
        micro_batches: int | None = None,
        max_micro_batch_size: int | None = None,
        schedule: MicroBatchSchedule | None = None,
    ) -> None:
        if (micro_batches is None) == (max_micro_batch_size is None):
            raise ValueError("pass exactly one of micro_batches and max_micro_batch_size")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.micro_batches = micro_batches
        self.max_micro_batch_size = max_micro_batch_size
        self.schedule = schedule
        self.generator = generator
        self._next_sizes: list[int] | None = None

    def _draw_sizes(self) -> list[int]:
        counts = torch.full((self.steps,), float(self.num_samples), dtype=torch.float64)
        probs = torch.full((self.steps,), self.sample_rate, dtype=torch.float64)
        return [int(s) for s in torch.binomial(counts, probs, generator=self.generator)]

    def _parts(self, size: int) -> int:
        if self.micro_batches is not None:
            return self.micro_batches
        return max(1, math.ceil(size / self.max_micro_batch_size))

    def __len__(self) -> int:
        if self.micro_batches is not None:
            return self.steps * self.micro_batches
        if self._next_sizes is None:
            self._next_sizes = self._draw_sizes()
        return sum(self._parts(s) for s in self._next_sizes)

    def __iter__(self) -> Iterator[list[int]]:
        schedule = self.schedule if self.schedule is not None else MicroBatchSchedule()
        with schedule.loader_pass():
            sizes = self._next_sizes if self._next_sizes is not None else self._draw_sizes()
            self._next_sizes = None
            if isinstance(schedule, PlannedSchedule):
                schedule.start_epoch([self._parts(s) for s in sizes])
            for size in sizes:
                subset = torch.randperm(self.num_samples, generator=self.generator)[:size].tolist()
                yield from split_evenly(subset, self._parts(size))


class GroupedBatchSampler(Sampler[list[int]]):
    """The loader's own batches, as logical batches of micro-batches.

    With ``accumulation_steps=k`` each group of k consecutive batches is one
    logical batch; when the epoch's batch count is not a multiple of k, the
    last r < k batches form a shorter logical batch of their own, so that no
    gradient is dropped: call ``step()`` after it (loop style 1 does; in
    style 2 step when ``(i + 1) % k == 0 or i + 1 == len(loader)``), or the
    next ``backward()`` raises. With ``max_micro_batch_size=M`` every batch
    is one logical batch split into ceil(len / M) micro-batches.
    """

    def __init__(
        self,
        batch_sampler: Any,
        schedule: PlannedSchedule,
        *,
        micro_batches: int | None = None,
        max_micro_batch_size: int | None = None,
    ) -> None:
        if (micro_batches is None) == (max_micro_batch_size is None):
            raise ValueError("pass exactly one of micro_batches and max_micro_batch_size")
        self.batch_sampler = batch_sampler
        self.schedule = schedule
        self.micro_batches = micro_batches
        self.max_micro_batch_size = max_micro_batch_size
        self._next_epoch: list[list[list[int]]] | None = None

    def __len__(self) -> int:
        if self.micro_batches is not None:
            return len(self.batch_sampler)
        if self._next_epoch is None:
            self._next_epoch = self._draw_epoch()
        return sum(len(split) for split in self._next_epoch)

    def _draw_epoch(self) -> list[list[list[int]]]:
        # The epoch's batches are drawn early (as the Poisson sampler draws its sizes)
        # so that len() is exact even when the sizes are random.
        return [self._split(list(batch)) for batch in self.batch_sampler]

    def _split(self, batch: list[int]) -> list[list[int]]:
        return split_evenly(batch, max(1, math.ceil(len(batch) / self.max_micro_batch_size)))

    def __iter__(self) -> Iterator[list[int]]:
        with self.schedule.loader_pass():
            if self.micro_batches is not None:
                n, k = len(self.batch_sampler), self.micro_batches
                self.schedule.start_epoch([k] * (n // k) + ([n % k] if n % k else []))
                yield from self.batch_sampler
                return
            splits = self._next_epoch if self._next_epoch is not None else self._draw_epoch()
            self._next_epoch = None
            self.schedule.start_epoch([len(s) for s in splits])
            for s in splits:
                yield from s


def _empty_aware_collate(dataset: Any, collate_fn: Any) -> Any:
    """Collate that turns an empty index list into a batch of zero-length tensors
    shaped like one collated example (Poisson micro-batches can be empty)."""

    def collate(batch: list[Any]) -> Any:
        if len(batch) > 0:
            return collate_fn(batch)
        example = collate_fn([dataset[0]])
        return tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, example)

    return collate


def wrap_data_loader(loader: DataLoader, batch_sampler: Sampler) -> DataLoader:
    """A DataLoader over the same dataset and workers with ``batch_sampler`` in charge."""
    return DataLoader(
        loader.dataset,
        batch_sampler=batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=_empty_aware_collate(loader.dataset, loader.collate_fn),
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        persistent_workers=loader.persistent_workers,
    )
