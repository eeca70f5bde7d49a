"""A tqdm progress bar over the DP loader that shows live ε and optimizer steps."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["progress"]


def progress(
    loader: Iterable[Any],
    engine: Any,
    *,
    delta: float,
    method: str | None = None,
    refresh_s: float = 1.0,
    **tqdm_kwargs: Any,
) -> Iterator[Any]:
    """Iterate ``loader`` (the micro-batches) under a tqdm bar with ``eps`` and ``steps``.

    Args:
        loader: the data loader returned by ``make_private``.
        engine: its ``PrivacyEngine``.
        delta: δ at which ε is shown.
        method: accountant for the live ε (default: the engine's). ε is
            recomputed only after a new optimizer step, and at most once every
            ``refresh_s`` seconds (and at the end), so a costly accountant does
            not slow training.
        tqdm_kwargs: passed to ``tqdm`` (``desc``, ``leave``, ``file``, ...).

    Example::

        for x, y in dpclip.progress(train_loader, engine, delta=1e-5, desc="epoch 1"):
            ...
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress() needs tqdm: pip install 'dpclip[report]'") from None
    method = method or engine.accountant
    # The bar is driven by hand: tqdm closes a wrapped iterable's bar as soon as it
    # runs out, before the last optimizer step could be shown.
    try:
        tqdm_kwargs.setdefault("total", len(loader))  # type: ignore[arg-type]
    except TypeError:
        pass
    bar = tqdm(**tqdm_kwargs)
    shown_steps, shown_at = -1, 0.0

    def refresh(force: bool) -> None:
        nonlocal shown_steps, shown_at
        if bar.disable:
            return
        now = time.monotonic()
        if engine.steps != shown_steps and (force or now - shown_at >= refresh_s):
            eps = engine.ledger.epsilon(delta, method)
            bar.set_postfix(eps=f"{eps:.3f}", steps=engine.steps, refresh=force)
            shown_steps, shown_at = engine.steps, now

    try:
        for item in loader:
            refresh(force=False)
            yield item
            bar.update(1)
        refresh(force=True)
    finally:
        bar.close()
