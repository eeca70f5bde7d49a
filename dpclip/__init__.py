"""dpclip: DP-SGD for PyTorch with ghost clipping and correct gradient accumulation."""

import importlib
from typing import Any

# Names are imported on first use (PEP 562): the command line's accounting commands
# (`python -m dpclip epsilon ...`) then start without importing torch (seconds).
_EXPORTS = {
    "audit": None,
    "callbacks": None,
    "PrivacyBudget": "dpclip.budget",
    "PrivacyBudgetExceeded": "dpclip.budget",
    "STRATEGIES": "dpclip.clipping",
    "ClippingPlan": "dpclip.clipping",
    "NonFiniteNormError": "dpclip.clipping",
    "PerSampleClipper": "dpclip.clipping",
    "SlowClippingWarning": "dpclip.clipping",
    "clip_factors": "dpclip.clipping",
    "LogicalBatchPlan": "dpclip.engine",
    "PrivacyEngine": "dpclip.engine",
    "ExamplesMixedError": "dpclip.independence",
    "DPCriterion": "dpclip.loss",
    "DPLoss": "dpclip.loss",
    "DPOptimizer": "dpclip.optimizer",
    "LogicalBatchError": "dpclip.optimizer",
    "private_gradient": "dpclip.optimizer",
    "progress": "dpclip.progress",
    "PrivacyReport": "dpclip.report",
    "GroupedBatchSampler": "dpclip.sampling",
    "PoissonMicroBatchSampler": "dpclip.sampling",
    "Sampling": "dpclip.sampling",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dpclip' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = (
        importlib.import_module(f"dpclip.{name}") if module is None
        else getattr(importlib.import_module(module), name)
    )
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"

__all__ = [
    "ClippingPlan",
    "DPCriterion",
    "DPLoss",
    "DPOptimizer",
    "ExamplesMixedError",
    "GroupedBatchSampler",
    "LogicalBatchError",
    "LogicalBatchPlan",
    "NonFiniteNormError",
    "PerSampleClipper",
    "PoissonMicroBatchSampler",
    "PrivacyBudget",
    "PrivacyBudgetExceeded",
    "PrivacyEngine",
    "PrivacyReport",
    "STRATEGIES",
    "Sampling",
    "SlowClippingWarning",
    "__version__",
    "audit",
    "callbacks",
    "clip_factors",
    "private_gradient",
    "progress",
]
