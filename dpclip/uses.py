"""How often each example has been used: the sound bound for batches that are not Poisson.

Without amplification by sampling, an example's privacy loss is that of the
Gaussian mechanisms it took part in. An example that appears m times in one
step's batch adds m·C to that step's sum (a Gaussian mechanism with μ = m/σ);
μ² adds up over steps (Dong, Roth & Su 2019, Cor. 3.3). So example i has
spent W_i = Σ_s m_{i,s}² mechanisms' worth, and the run's bound is the worst
example's, W = max_i W_i (``accounting.CountedShuffledGaussian``).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ExampleUses", "added_uses"]


def added_uses(totals: np.ndarray, worst: int, indices: Sequence[int]) -> int:
    """How much one step over the examples ``indices`` (repeats allowed) raises
    W = max_i Σ_s m_{i,s}², given the running ``totals`` (W_i per example) and ``worst`` (W).

    >>> added_uses(np.zeros(4, dtype=np.int64), 0, [1, 1, 2])
    4
    """
    if len(indices) == 0:
        return 0
    ids, counts = np.unique(np.asarray(indices, dtype=np.int64), return_counts=True)
    return max(0, int((totals[ids] + counts.astype(np.int64) ** 2).max()) - worst)


class ExampleUses:
    """W_i for each of ``dataset_size`` examples and W, updated one applied step at a time.

    Args:
        dataset_size: N; indices are 0..N-1 (dataset indices, as the loader yields them).
    """

    def __init__(self, dataset_size: int) -> None:
        self.totals = np.zeros(dataset_size, dtype=np.int64)
        #: W, the worst example's Σ_s m², which the sound bound composes
        self.worst = 0

    def added(self, indices: Sequence[int]) -> int:
        """What a step over ``indices`` would add to W (nothing is changed)."""
        self._check(indices)
        return added_uses(self.totals, self.worst, indices)

    def commit(self, indices: Sequence[int]) -> None:
        """Count a step over ``indices`` that was applied."""
        self._check(indices)
        self.worst += added_uses(self.totals, self.worst, indices)
        ids, counts = np.unique(np.asarray(indices, dtype=np.int64), return_counts=True)
        self.totals[ids] += counts.astype(np.int64) ** 2

    def _check(self, indices: Sequence[int]) -> None:
        if len(indices) and not (0 <= min(indices) and max(indices) < len(self.totals)):
            raise ValueError(f"example indices must lie in 0..{len(self.totals) - 1}")

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the examples used so far and their W_i (little-endian int64, base64)."""
        used = np.flatnonzero(self.totals)
        return {
            "dataset_size": len(self.totals),
            "indices": base64.b64encode(used.astype("<i8").tobytes()).decode("ascii"),
            "totals": base64.b64encode(self.totals[used].astype("<i8").tobytes()).decode("ascii"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; raises ``ValueError`` (and changes nothing) if malformed."""
        try:
            if state["dataset_size"] != len(self.totals):
                raise ValueError(f"it counts {state['dataset_size']} examples, not {len(self.totals)}")
            used = np.frombuffer(base64.b64decode(state["indices"], validate=True), dtype="<i8")
            totals = np.frombuffer(base64.b64decode(state["totals"], validate=True), dtype="<i8")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed example-use state: {err}") from None
        if len(used) != len(totals) or (len(used) and (used.min() < 0 or used.max() >= len(self.totals))):
            raise ValueError("malformed example-use state: indices out of range")
        if (totals < 1).any():
            raise ValueError("malformed example-use state: counts must be >= 1")
        fresh = np.zeros_like(self.totals)
        fresh[used] = totals
        self.totals = fresh
        self.worst = int(fresh.max()) if len(fresh) else 0
