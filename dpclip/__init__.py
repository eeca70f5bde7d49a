"""dpclip: DP-SGD for PyTorch with ghost clipping and correct gradient accumulation."""

from dpclip import callbacks
from dpclip.budget import PrivacyBudget, PrivacyBudgetExceeded
from dpclip.clipping import (
    STRATEGIES,
    ClippingPlan,
    NonFiniteNormError,
    PerSampleClipper,
    SlowClippingWarning,
    clip_factors,
)
from dpclip.engine import LogicalBatchPlan, PrivacyEngine
from dpclip.independence import ExamplesMixedError
from dpclip.loss import DPCriterion, DPLoss
from dpclip.optimizer import DPOptimizer, LogicalBatchError, private_gradient
from dpclip.progress import progress
from dpclip.report import PrivacyReport
from dpclip.sampling import GroupedBatchSampler, PoissonMicroBatchSampler, Sampling

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
    "callbacks",
    "clip_factors",
    "private_gradient",
    "progress",
]
