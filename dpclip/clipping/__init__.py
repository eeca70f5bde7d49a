"""Per-sample gradient norms and the clipped gradient sum of one micro-batch.

For a micro-batch with per-sample losses ℓ_1..ℓ_B and per-sample gradients
g_i = ∇_θ ℓ_i, this package computes

    S = Σ_i c_i · g_i,   c_i = min(1, C / ‖g_i‖)

with one backward pass (book-keeping, Bu et al. 2023): forward hooks record
each layer call's input; one backward gives the gradient of Σ ℓ_i with respect
to each recorded *output* (no parameter gradients). Then, per layer call
(``dpclip.clipping.rules``):

- the per-sample norms, by ghost norm or per-sample gradient, whichever the
  shapes make cheaper (or as the ``clipping`` strategy says);
- S directly from the same tensors (for Linear Σ_i c_i·g_iᵀa_i), no second
  backward.

Layer calls are Linear, convolutions (1-, 2- and 3-d, every padding, groups,
transposed), embedding lookups, linear operations with a trainable weight
inside modules without a rule, the layers Opacus has per-sample rules for
(LayerNorm, GroupNorm, …) and the projections inside
``nn.MultiheadAttention`` (``dpclip.clipping.attention``). A weight used by
several calls (a layer run twice, tied embeddings) gets one ghost norm over all
their positions (``dpclip.clipping.shared``), or where that would hold more, its
per-sample gradients summed before the norm. Any other module that owns parameters gets exact
per-sample gradients by a batched vector-Jacobian product through its own
recorded graph (so dropout masks and keyword inputs are those of the real
forward), and its part of S from those same per-sample gradients.

Unlike Opacus, nothing is written to ``param.grad`` and no attribute is added
to a parameter or module: the caller owns where S is accumulated.

Modules, one concept each:

- ``norms``: the arithmetic (clipping factors, per-row norms, scaled rows), in at
  least float32;
- ``recording``: what the forward records (``LayerCall``, ``GraphCall``), the
  units it records for, and the forward hooks (``Recorder``);
- ``rules``: one file per family of operations, each registering its rules;
- ``attention``: the projections inside ``nn.MultiheadAttention`` as linear calls;
- ``functions``: recording by operation (``F.embedding`` on any trainable weight,
  ``addmm``/``matmul``/``F.linear`` with a trainable weight in a module without a
  rule) and batch provenance: lookups on ids without a batch dimension (position
  ids ``[1, T]``, T5's ``[T, T]`` buckets) followed to where they meet the batch;
- ``graph``: the exact fallback through a unit's recorded graph;
- ``plan``: per layer, the rule and strategy taken and the share of the time
  (``PerSampleClipper.plan()``), and the warning for layers on the graph path;
- ``clipper``: ``PerSampleClipper``, which ties them into S.
"""

from dpclip.clipping.clipper import NonFiniteNormError, PerSampleClipper, validate_module
from dpclip.clipping.norms import clip_factors
from dpclip.clipping.plan import ClippingPlan, LayerPlan, SlowClippingWarning
from dpclip.clipping.recording import LayerCall, validate_clipping
from dpclip.clipping.rules import STRATEGIES, Rule, register, rule_for

__all__ = [
    "STRATEGIES",
    "ClippingPlan",
    "LayerCall",
    "LayerPlan",
    "NonFiniteNormError",
    "PerSampleClipper",
    "Rule",
    "SlowClippingWarning",
    "clip_factors",
    "register",
    "rule_for",
    "validate_clipping",
    "validate_module",
]
