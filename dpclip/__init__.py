"""dpclip: DP-SGD for PyTorch with ghost clipping and correct gradient accumulation."""

from dpclip.clipping import NonFiniteNormError, PerSampleClipper, clip_factors
from dpclip.engine import LogicalBatchPlan, PrivacyEngine
from dpclip.loss import DPCriterion, DPLoss
from dpclip.optimizer import DPOptimizer, LogicalBatchError, private_gradient
from dpclip.sampling import GroupedBatchSampler, PoissonMicroBatchSampler

__version__ = "0.1.0"

__all__ = [
    "DPCriterion",
    "DPLoss",
    "DPOptimizer",
    "GroupedBatchSampler",
    "LogicalBatchError",
    "LogicalBatchPlan",
    "NonFiniteNormError",
    "PerSampleClipper",
    "PoissonMicroBatchSampler",
    "PrivacyEngine",
    "__version__",
    "clip_factors",
    "private_gradient",
]
