"""Whether a forward runs inside a region of non-reentrant gradient checkpointing.

Inside ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (Hugging Face's
``gradient_checkpointing_enable``) torch's own saved-tensor hooks take what autograd
saves, so what ``memory="auto"`` counts on its first forward (bytes and dtypes of the
saved activations, ``dpclip.clipping.memory.SavedActivations``) misses the region:
"auto" takes "fast" there, and ``memory="low"`` warns on a float64 model, whose layers
may compute in float32 inside unseen.

The region is told by the top saved-tensor pack hook, checkpoint's own (it holds the
region's frame): torch.utils.checkpoint's internals. Where it is not found, the forward
counts as not checkpointed, as before.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["checkpoint_region"]


def checkpoint_region() -> Any | None:
    """The checkpointed region whose forward is running (torch's frame object), or None."""
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):  # another torch
        return None
    if hooks is None or not getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook."):
        return None
    return _cell(hooks[0], "frame")


def _cell(fn: Any, name: str) -> Any | None:
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not closure or name not in code.co_freevars:
        return None
    try:
        return closure[code.co_freevars.index(name)].cell_contents
    except ValueError:  # (an empty cell)
        return None
