"""Several processes (``torch.distributed``): one logical batch over all ranks, one noise draw.

The user's code is ordinary data-parallel training: ``DistributedDataParallel(model)``,
the same loader on every rank. With W processes, k micro-batches of B per rank:

- the expected logical batch is L = W·k·B and q = L/N. Every rank draws the same global
  Poisson subset (one sampling generator, the same on every rank) and trains on its
  share (``PoissonMicroBatchSampler(shard=...)``): the union is exactly one Poisson draw;
- each rank adds its micro-batches' clipped sums locally: DDP's own gradient all-reduce
  is switched off (it would average per backward, before clipping could be undone);
- at the step, rank 0 adds the noise N(0, σ²C²) to its sum, then **one** all-reduce
  (sum) gives every rank S + noise, bit-identical; each divides by L and runs the same
  optimizer step: the replicas stay equal, and the noise is drawn once, not once per rank;
- every rank records the same step at q = L/N in its ledger.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "World", "agree", "all_reduce_sums", "inner_module", "parameter_fingerprint", "shared_seed",
    "stop_ddp_sync", "world_of",
]


@dataclass(frozen=True)
class World:
    """The processes training one model together: ``size`` ranks, this one ``rank``."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_of(module: nn.Module) -> World:
    """This process's place in the default process group (one process: ``World()``).

    Raises:
        ValueError: an ``nn.DataParallel`` module (replicas on threads, made anew each
            forward: per-example clipping cannot follow them; use DistributedDataParallel).
    """
    if isinstance(module, nn.DataParallel):
        raise ValueError(
            "make_private got an nn.DataParallel module: its replicas are rebuilt on every "
            "forward, which per-example clipping cannot follow. Use one process per device with "
            "DistributedDataParallel (torchrun), or the plain module in one process"
        )
    if isinstance(module, nn.parallel.DistributedDataParallel) and getattr(module, "static_graph", False):
        raise ValueError(
            "make_private got a DistributedDataParallel with static_graph=True, whose reducer "
            "expects its own backward hooks every iteration: dpclip reduces the clipped sums "
            "itself, once per logical batch; build it with static_graph=False (the default)"
        )
    if not (dist.is_available() and dist.is_initialized()):
        if isinstance(module, nn.parallel.DistributedDataParallel):
            raise ValueError("make_private got a DistributedDataParallel module but no process group is initialised")
        return World()
    return World(dist.get_rank(), dist.get_world_size())


def inner_module(module: nn.Module) -> nn.Module:
    """The model a ``DistributedDataParallel`` wraps (the module itself otherwise)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def stop_ddp_sync(module: nn.Module) -> None:
    """Switch off a ``DistributedDataParallel``'s own gradient all-reduce: dpclip reduces
    the clipped sums once per logical batch instead (``all_reduce_sums``)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        # DDP's forward prepares its reducer only while this is True (what no_sync() clears)
        module.require_backward_grad_sync = False
        # and broadcasts buffers before a forward while this is: a collective per forward,
        # which hangs when another rank skips the forward of an empty micro-batch
        # (add_empty_micro_batch); the constructor already broadcast them
        module.require_forward_param_sync = False


def shared_seed(world: World) -> int:
    """A seed drawn from the operating system on rank 0 and sent to every rank."""
    seed = [secrets.randbits(63) if world.rank == 0 else 0]
    dist.broadcast_object_list(seed, src=0)
    return int(seed[0])


def agree(world: World, failure: BaseException | None, settings: dict[str, Any]) -> None:
    """One collective at ``make_private``: every rank learns whether all ranks' arguments
    were accepted and the same. Raises ``ValueError`` on every rank when a rank's
    ``failure`` is set (that rank re-raises its own) or the ``settings`` differ, so that
    no rank waits for one that left."""
    mine = {"failure": None if failure is None else f"{type(failure).__name__}: {failure}"}
    mine.update({k: _digest(v) for k, v in settings.items()})
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, mine)
    if failure is not None:
        return
    for rank, theirs in enumerate(gathered):
        if theirs["failure"] is not None:
            raise ValueError(f"make_private failed on rank {rank}: {theirs['failure']}")
    for rank, theirs in enumerate(gathered):
        for key, value in mine.items():
            if theirs.get(key) != value:
                raise ValueError(
                    f"make_private on rank {world.rank} and rank {rank} differ in {key}: every rank "
                    "must pass the same model (DistributedDataParallel broadcasts rank 0's), the "
                    "same settings, the same whole dataset (not a shard of its own: dpclip gives "
                    "each rank its share of every logical batch), and a sample_generator seeded the "
                    "same or none (one global Poisson logical batch is drawn on every rank)"
                )


def parameter_fingerprint(module: nn.Module) -> list[tuple[str, tuple[int, ...], float, float]]:
    """Per parameter: name, shape, and two float64 sums (plain and weighted by position):
    replicas that differ at the start would train apart."""
    out = []
    for name, p in module.named_parameters():
        flat = p.detach().reshape(-1).double()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        out.append((name, tuple(p.shape), float(flat.sum()), float((flat * weights).sum())))
    return out


def data_fingerprint(dataset: Any, samples: int = 8) -> str:
    """A digest of ``samples`` examples spread over ``dataset`` (read under fixed random
    seeds, so that random transforms read the same): ranks that hand-shard the data
    (``Subset(ds, range(rank, N, W))``) differ here even when their sizes agree, and
    their ε would be computed for the wrong N."""
    import random

    import numpy as np

    n = len(dataset)
    positions = sorted({(n - 1) * i // max(samples - 1, 1) for i in range(samples)}) if n else []
    digest = hashlib.sha256(f"{n}".encode())
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            for i in positions:
                _feed(digest, dataset[i])
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Adds an example's contents (tensors, arrays, numbers, strings, nested) to ``digest``;
    of other objects only the type (a repr may hold a memory address)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (int, float, complex, str, bytes, bool)) or value is None:
        digest.update(repr(value).encode())
    elif hasattr(value, "__array__"):  # numpy arrays, PIL images
        import numpy as np

        array = np.asarray(value)
        digest.update(f"{array.dtype}{array.shape}".encode() + array.tobytes())
    else:
        digest.update(type(value).__name__.encode())


def _digest(value: Any) -> str:
    if isinstance(value, torch.Generator):
        value = bytes(value.get_state().tolist())
    return hashlib.sha256(repr(value).encode() if not isinstance(value, bytes) else value).hexdigest()


def all_reduce_sums(tensors: list[torch.Tensor], control: list[float]) -> list[float]:
    """Sum ``tensors`` over all ranks, in place, and the numbers ``control`` (returned
    summed), in one all-reduce per dtype and device of ``tensors`` (one in all, as a rule)
    over a flat copy; ``control`` travels with the first."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    if not groups:
        groups[(torch.float64, torch.device("cpu"))] = []
    summed = control
    for i, ((dtype, device), group) in enumerate(groups.items()):
        parts = [t.reshape(-1) for t in group]
        if i == 0:  # (float32 holds the step counts exactly up to 2**24)
            parts.append(torch.tensor(control, dtype=dtype, device=device))
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()
        if i == 0:
            summed = flat[offset:].tolist()
    return summed
