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

import base64
import enum
import math
import random
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "FixedSchedule",
    "encode_generator_state",
    "restore_generator_state",
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
    """How many micro-batches the next logical batch has, which loader pass it is from,
    and which examples the loader handed out (in order) that training has not used yet."""

    def __init__(self) -> None:
        #: increases each time a pass over the data loader starts
        self.pass_id = 0
        #: micro-batches of the current pass whose logical batches the optimizer applied
        self.consumed = 0
        #: the last pass ended before its end (a break out of the loop over the loader)
        self.left_early = False
        self._active = False
        self._pending: deque[list[int]] = deque()

    def next_logical_batch(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    @contextmanager
    def loader_pass(self, consumed: int = 0) -> Iterator[None]:
        """Mark one pass over the loader (``consumed``: micro-batches of it already
        trained on, for a resumed pass); a second one may not start inside it."""
        if self._active:
            raise RuntimeError(
                "a second pass over the DP data loader started while another is in progress "
                "(their logical batches would interleave): evaluate on the original loader"
            )
        self._active = True
        self.pass_id += 1
        self.consumed = consumed
        self._pending.clear()
        self.left_early = False
        try:
            yield
        except BaseException:  # (GeneratorExit: the loop broke out of the pass)
            self.left_early = True
            raise
        finally:
            self._active = False

    def handed_out(self, indices: list[int]) -> None:
        """The sampler yielded the micro-batch ``indices`` (loader order is training order)."""
        self._pending.append(indices)

    def upcoming(self) -> list[int] | None:
        """The indices ``take`` returns next, left in place; None as for ``take``."""
        return self._pending[0] if self._pending else None

    def take(self) -> list[int] | None:
        """The dataset indices of the micro-batch being trained on; None when training
        runs on batches that did not come from the DP loader."""
        return self._pending.popleft() if self._pending else None

    def stepped(self, micro_batches: int) -> None:
        """The optimizer applied a logical batch of this pass with ``micro_batches`` micro-batches."""
        self.consumed += micro_batches


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


def encode_generator_state(generator: torch.Generator) -> str:
    """A ``torch.Generator``'s state as text (base64), for JSON checkpoints."""
    return base64.b64encode(bytes(generator.get_state().tolist())).decode("ascii")


def restore_generator_state(generator: torch.Generator, text: str) -> None:
    """Set ``generator`` to a state saved by ``encode_generator_state``.

    Raises:
        ValueError: ``text`` is not such a state (for this kind of generator).
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
        generator.set_state(torch.tensor(list(raw), dtype=torch.uint8))
    except (ValueError, RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"not a saved state of this {generator.device} generator: {err}") from None


def _split_consumed(counts: Sequence[int], consumed: int) -> int:
    """How many leading logical batches (with these micro-batch counts) ``consumed`` covers."""
    done, total = 0, 0
    while done < len(counts) and total < consumed:
        total += counts[done]
        done += 1
    if total != consumed:
        raise ValueError(
            f"the saved position ({consumed} micro-batches into the pass) is not at the end of a "
            f"logical batch of this loader (batches of {list(counts[:done + 1])} micro-batches)"
        )
    return done


class PoissonMicroBatchSampler(Sampler[list[int]]):
    """Batch sampler: Poisson logical batches at rate ``sample_rate``, split into micro-batches.

    Args:
        num_samples: N, the number of examples drawn from.
        sample_rate: q = L / N, each example's probability of joining a logical batch.
        steps: logical batches per epoch.
        micro_batches: k, fixed number of micro-batches per logical batch
            (``accumulation_steps``); sizes differ by at most one, some may be empty.
        max_micro_batch_size: M; instead of ``micro_batches``, split each logical
            batch into ceil(size / M) micro-batches (at least one).
        schedule: told when a pass starts and what it yields; with
            ``max_micro_batch_size`` (a ``PlannedSchedule``) also given each
            logical batch's micro-batch count.
        generator: source of randomness: a seeded ``torch.Generator`` for
            reproducible (and exactly resumable) runs, or a ``dpclip.secure``
            source, which cannot be replayed.
        indices: the dataset indices the N examples are (default ``range(N)``):
            the index set of the loader's sampler, e.g. a training split.
        shard: (rank, world size) with several processes (``dpclip.distributed``): each
            logical batch is the same global draw on every rank (the same generator),
            and this rank yields its share, every world-th example of it from ``rank``
            on; with ``max_micro_batch_size`` every rank splits its share into as many
            micro-batches as the largest share needs, so that ranks step together.

    ``len()`` is the exact number of micro-batches of the next epoch (of its
    remainder, for a resumed pass): ``steps · k`` with ``micro_batches``; with
    ``max_micro_batch_size`` it is fixed by drawing that epoch's logical batch
    sizes early.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        steps: int,
        generator: Any,
        micro_batches: int | None = None,
        max_micro_batch_size: int | None = None,
        schedule: MicroBatchSchedule | None = None,
        indices: Sequence[int] | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if (micro_batches is None) == (max_micro_batch_size is None):
            raise ValueError("pass exactly one of micro_batches and max_micro_batch_size")
        if indices is not None and len(indices) != num_samples:
            raise ValueError(f"Expected {num_samples} indices, got {len(indices)}")
        if not (len(shard) == 2 and shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise ValueError(f"Expected shard to be (rank, world size) with 0 <= rank < size, got {shard}")
        self.shard = tuple(shard)
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.micro_batches = micro_batches
        self.max_micro_batch_size = max_micro_batch_size
        self.schedule = schedule if schedule is not None else MicroBatchSchedule()
        self.generator = generator
        self.indices = None if indices is None else list(indices)
        # A pass is (snapshot of the generator before its draws, logical batch sizes,
        # logical batches already trained on): drawn early by len(), restored by
        # load_position, or running.
        self._next: tuple[str | None, list[int], int] | None = None
        self._running: list[Any] | None = None  # [snapshot, sizes, length] while a pass runs

    def _snapshot(self) -> str | None:
        if isinstance(self.generator, torch.Generator):
            return encode_generator_state(self.generator)
        return None  # a secure source has no state to replay

    def _draw_sizes(self, steps: int) -> list[int]:
        if not isinstance(self.generator, torch.Generator):
            return self.generator.binomial(self.num_samples, self.sample_rate, steps)
        counts = torch.full((steps,), float(self.num_samples), dtype=torch.float64)
        probs = torch.full((steps,), self.sample_rate, dtype=torch.float64)
        return [int(s) for s in torch.binomial(counts, probs, generator=self.generator)]

    def _subset(self, size: int) -> list[int]:
        if isinstance(self.generator, torch.Generator):
            chosen = torch.randperm(self.num_samples, generator=self.generator)[:size].tolist()
        else:
            chosen = self.generator.subset(self.num_samples, size)
        return chosen if self.indices is None else [self.indices[j] for j in chosen]

    def _parts(self, size: int) -> int:
        if self.micro_batches is not None:
            return self.micro_batches
        largest_share = math.ceil(size / self.shard[1])  # rank 0's
        return max(1, math.ceil(largest_share / self.max_micro_batch_size))

    def _pass(self) -> tuple[str | None, list[int], int]:
        if self._next is None:
            snapshot = self._snapshot()
            self._next = (snapshot, self._draw_sizes(self.steps), 0)
        return self._next

    def __len__(self) -> int:
        if self._running is not None:  # inside the loop: this pass's length, nothing drawn
            return self._running[2]
        if self._next is None and self.micro_batches is not None:
            return self.steps * self.micro_batches
        _, sizes, done = self._pass()
        return sum(self._parts(s) for s in sizes[done:])

    def __iter__(self) -> Iterator[list[int]]:
        snapshot, sizes, done = self._pass()
        self._next = None
        consumed = sum(self._parts(s) for s in sizes[:done])
        with self.schedule.loader_pass(consumed):
            self._running = [snapshot, sizes, sum(self._parts(s) for s in sizes[done:])]
            try:
                if isinstance(self.schedule, PlannedSchedule):
                    self.schedule.start_epoch([self._parts(s) for s in sizes[done:]])
                rank, world = self.shard
                for size in sizes[done:]:
                    for micro in split_evenly(self._subset(size)[rank::world], self._parts(size)):
                        self.schedule.handed_out(micro)
                        yield micro
            finally:
                self._running = None

    def position(self) -> dict[str, Any]:
        """Where sampling stands, for a checkpoint taken between logical batches:
        the generator's state when the current (or next) pass began drawing, and
        how many of that pass's micro-batches have been trained on."""
        if self._running is not None:
            return {"snapshot": self._running[0], "consumed": self.schedule.consumed, "in_pass": True}
        if self._next is not None:
            snapshot, sizes, done = self._next
            consumed = sum(self._parts(s) for s in sizes[:done])
            return {"snapshot": snapshot, "consumed": consumed, "in_pass": True}
        return {"snapshot": self._snapshot(), "consumed": 0, "in_pass": False}

    def load_position(self, position: dict[str, Any]) -> None:
        """Continue from ``position()`` of another run: the rest of its pass, then new ones,
        exactly as that run would have drawn them (torch generator). A secure source
        cannot replay: the rest of the pass is drawn afresh."""
        snapshot, consumed, in_pass = position["snapshot"], position["consumed"], position["in_pass"]
        before = self.generator.get_state() if isinstance(self.generator, torch.Generator) else None
        if snapshot is not None and isinstance(self.generator, torch.Generator):
            restore_generator_state(self.generator, snapshot)
        elif (snapshot is None) == isinstance(self.generator, torch.Generator):
            raise ValueError("the saved sampling state is for another kind of generator (secure_mode differs)")
        self._next = None
        if not in_pass:
            return
        if snapshot is None:  # secure: fresh draws for the logical batches still to come
            if self.micro_batches is not None:
                left = self.steps - consumed // self.micro_batches
                if left > 0:
                    self._next = (None, self._draw_sizes(left), 0)
            return
        sizes = self._draw_sizes(self.steps)
        try:
            done = _split_consumed([self._parts(s) for s in sizes], consumed)
        except ValueError:
            self.generator.set_state(before)
            raise
        for size in sizes[:done]:
            self._subset(size)  # the draws the saved run made: the generator moves on identically
        if done < len(sizes):
            self._next = (snapshot, sizes, done)


class GroupedBatchSampler(Sampler[list[int]]):
    """The loader's own batches, as logical batches of micro-batches.

    With ``accumulation_steps=k`` each group of k consecutive batches is one
    logical batch; when the epoch's batch count is not a multiple of k, the
    last r < k batches form a shorter logical batch of their own, so that no
    gradient is dropped: call ``step()`` after it (loop style 1 does; in
    style 2 step when ``(i + 1) % k == 0 or i + 1 == len(loader)``), or the
    next ``backward()`` raises. With ``max_micro_batch_size=M`` every batch
    is one logical batch split into ceil(len / M) micro-batches.

    A pass's randomness is the wrapped sampler's: its ``generator`` when it has
    a ``torch.Generator``, and torch's global generator when the pass begins
    (``RandomSampler`` without a generator seeds itself from it). Both are
    saved at the start of each pass, so a checkpoint can resume the pass exactly.
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
        # (snapshot, iterator over the pass's micro-batches, micro-batch counts of its
        # logical batches, logical batches done): prepared by len() or load_position
        self._next: tuple[dict[str, str | None], Iterator[list[int]], list[int], int] | None = None
        self._running: dict[str, str | None] | None = None
        self._running_len = 0

    def _inner_generator(self) -> torch.Generator | None:
        for owner in (self.batch_sampler, getattr(self.batch_sampler, "sampler", None)):
            gen = getattr(owner, "generator", None)
            if isinstance(gen, torch.Generator):
                return gen
        return None

    def _snapshot(self) -> dict[str, str | None]:
        inner = self._inner_generator()
        return {
            "global": base64.b64encode(bytes(torch.random.get_rng_state().tolist())).decode("ascii"),
            "inner": None if inner is None else encode_generator_state(inner),
        }

    def _start(self, snapshot: dict[str, str | None] | None) -> tuple[Iterator[list[int]], list[int]]:
        """Begin drawing a pass (from ``snapshot``'s generator states, if given): an iterator
        over its micro-batches, whose first batch is drawn now, and the logical batches' counts."""
        saved = torch.random.get_rng_state()
        try:
            if snapshot is not None:
                torch.random.set_rng_state(
                    torch.tensor(list(base64.b64decode(snapshot["global"])), dtype=torch.uint8)
                )
                if snapshot["inner"] is not None and self._inner_generator() is not None:
                    restore_generator_state(self._inner_generator(), snapshot["inner"])
            if self.micro_batches is not None:
                n, k = len(self.batch_sampler), self.micro_batches
                counts = [k] * (n // k) + ([n % k] if n % k else [])
                batches = iter(self.batch_sampler)
                first = next(batches, None)  # a RandomSampler seeds itself on its first batch
                it = batches if first is None else _chain_first(first, batches)
                return it, counts
            splits = [self._split(list(batch)) for batch in self.batch_sampler]
            return (m for split in splits for m in split), [len(s) for s in splits]
        finally:
            if snapshot is not None:
                torch.random.set_rng_state(saved)

    def _split(self, batch: list[int]) -> list[list[int]]:
        return split_evenly(batch, max(1, math.ceil(len(batch) / self.max_micro_batch_size)))

    def _pass(self) -> tuple[dict[str, str | None], Iterator[list[int]], list[int], int]:
        if self._next is None:
            snapshot = self._snapshot()
            it, counts = self._start(None)
            self._next = (snapshot, it, counts, 0)
        return self._next

    def __len__(self) -> int:
        if self._running is not None:  # inside the loop: this pass's length
            return self._running_len
        if self._next is not None:
            return sum(self._next[2][self._next[3]:])
        if self.micro_batches is not None:
            return len(self.batch_sampler)
        return sum(self._pass()[2])

    def __iter__(self) -> Iterator[list[int]]:
        with self.schedule.loader_pass():
            snapshot, it, counts, done = self._pass()
            self._next = None
            self.schedule.consumed = sum(counts[:done])
            self._running, self._running_len = snapshot, sum(counts[done:])
            try:
                self.schedule.start_epoch(counts[done:])
                for micro in it:
                    micro = list(micro)
                    self.schedule.handed_out(micro)
                    yield micro
            finally:
                self._running = None

    def position(self) -> dict[str, Any]:
        """As ``PoissonMicroBatchSampler.position``; the snapshot holds the wrapped
        sampler's generator and torch's global generator state at the pass's start."""
        if self._running is not None:
            return {"snapshot": self._running, "consumed": self.schedule.consumed, "in_pass": True}
        if self._next is not None:
            snapshot, _, counts, done = self._next
            return {"snapshot": snapshot, "consumed": sum(counts[:done]), "in_pass": True}
        inner = self._inner_generator()
        state = None if inner is None else encode_generator_state(inner)
        return {"snapshot": {"global": None, "inner": state}, "consumed": 0, "in_pass": False}

    def load_position(self, position: dict[str, Any]) -> None:
        """Continue from ``position()`` of another run: the rest of its pass, then new ones."""
        snapshot, consumed, in_pass = position["snapshot"], position["consumed"], position["in_pass"]
        self._next = None
        if not in_pass:
            inner = self._inner_generator()
            if snapshot["inner"] is not None and inner is not None:
                restore_generator_state(inner, snapshot["inner"])
            return
        inner = self._inner_generator()
        before = None if inner is None else inner.get_state()
        try:
            it, counts = self._start(snapshot)
            done = _split_consumed(counts, consumed)
        except Exception:
            if inner is not None:
                inner.set_state(before)
            raise
        for _ in range(consumed):
            next(it)  # the batches the saved run trained on
        if done < len(counts):
            self._next = (snapshot, it, counts, done)


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _empty_aware_collate(dataset: Any, collate_fn: Any) -> Any:
    """Collate that turns an empty index list into a batch of zero-length tensors
    shaped like one collated example (Poisson micro-batches can be empty)."""

    def collate(batch: list[Any]) -> Any:
        if len(batch) > 0:
            return collate_fn(batch)
        return _emptied(collate_fn([dataset[0]]))

    return collate


def _emptied(batch: Any) -> Any:
    """``batch`` with every tensor cut to zero rows, also inside mappings that torch's tree
    functions do not open (Hugging Face's BatchEncoding, a UserDict: its one example was
    left whole, and trained on as the empty micro-batch)."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        items = {k: _emptied(v) for k, v in batch.items()}
        if type(batch) is dict:
            return items
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_emptied(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_emptied(v) for v in batch)
    return tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, batch)


def micro_batch_rows(dataset: Any, collate_fn: Callable[[list[Any]], Any], schedule: MicroBatchSchedule) -> list[torch.Tensor]:
    """The tensors of the micro-batch being trained on (``schedule.upcoming``) as the
    dataset and the loader's collate function give them; empty when none is known or
    fetching it fails. torch's, Python's and NumPy's global random states are left as they
    were (a dataset's random augmentation draws from them)."""
    indices = schedule.upcoming()
    if not indices:
        return []
    states = torch.get_rng_state(), random.getstate(), numpy.random.get_state()
    try:
        batch = collate_fn([dataset[i] for i in indices])
        leaves, _ = tree_flatten(batch)
        return [t for t in leaves if isinstance(t, torch.Tensor)]
    except Exception:  # noqa: BLE001 - a probe's aid: without it the probe warns instead
        return []
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        numpy.random.set_state(states[2])


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
        # Each iteration draws the workers' base seed from this generator: neither from torch's
        # global one (dropout, a RandomSampler's seed) nor from the loader's (which its sampler
        # may share), whose streams a resumed run must find where they were.
        generator=torch.Generator().manual_seed(torch.initial_seed()),
    )
