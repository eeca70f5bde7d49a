"""Per-step privacy logging: ε to a CSV file or to TensorBoard, no extra core dependency.

Attach with ``engine.add_step_callback(CSVLogger("privacy.csv", delta=1e-5))``.
The default accountant here is "rdp" (milliseconds per step); the tighter
"prv"/"pld" cost up to seconds per call, so with them log ``every`` n steps.
"""

from __future__ import annotations

import csv
import os
from typing import Any

__all__ = ["CSVLogger", "TensorBoardLogger"]


class _EpsilonLogger:
    def __init__(self, delta: float, method: str, every: int) -> None:
        import accounting

        accounting.accountant.validate_delta(delta)
        accounting.make_accountant(method)  # validates the name
        accounting.events.validate_int("every", every)
        self.delta, self.method, self.every = delta, method, every

    def __call__(self, engine: Any) -> None:
        if engine.steps % self.every == 0:
            import accounting

            try:
                eps = engine.ledger.epsilon(self.delta, self.method)
            except accounting.UnsupportedEventError:  # e.g. rdp on a mixture: use the engine's own
                eps = engine.ledger.epsilon(self.delta, engine.accountant)
            self.log(engine.steps, eps)

    def log(self, step: int, epsilon: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class CSVLogger(_EpsilonLogger):
    """Append ``step,epsilon,delta,method`` rows to ``path`` (header written once).

    Args:
        path: the CSV file; created if missing, appended to otherwise.
        delta: δ at which ε is logged.
        method: accountant ("rdp" default: cheap enough for every step).
        every: log every n-th optimizer step.
    """

    def __init__(self, path: str | os.PathLike, *, delta: float, method: str = "rdp", every: int = 1) -> None:
        super().__init__(delta, method, every)
        self.path = os.fspath(path)
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "epsilon", "delta", "method"])

    def log(self, step: int, epsilon: float) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([step, repr(epsilon), repr(self.delta), self.method])


class TensorBoardLogger(_EpsilonLogger):
    """``writer.add_scalar(tag, ε, step)`` after each logged step.

    Args:
        writer: anything with ``add_scalar(tag, value, step)``, e.g. a
            ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard``
            package, which dpclip does not install), or a log directory to
            open one in.
        delta, method, every: as for ``CSVLogger``.
        tag: the scalar's name.
    """

    def __init__(
        self,
        writer: Any,
        *,
        delta: float,
        method: str = "rdp",
        every: int = 1,
        tag: str = "privacy/epsilon",
    ) -> None:
        super().__init__(delta, method, every)
        if isinstance(writer, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError(
                    "TensorBoardLogger with a log directory needs tensorboard: pip install tensorboard "
                    "(or pass any object with add_scalar)"
                ) from None
            writer = SummaryWriter(os.fspath(writer))
        if not callable(getattr(writer, "add_scalar", None)):
            raise ValueError(f"Expected writer to have add_scalar(tag, value, step), got {type(writer)}")
        self.writer, self.tag = writer, tag

    def log(self, step: int, epsilon: float) -> None:
        self.writer.add_scalar(self.tag, epsilon, step)
