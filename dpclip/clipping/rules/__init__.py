"""Per-layer rules: per-sample gradient norms and the clipped gradient sum of one
layer call, from the activations of its forward and the gradient of its output
(one backward pass, book-keeping: Bu et al., "Differentially private
optimization on large model at small cost", ICML 2023).

For a layer call with input a and output gradient g, per example i:

- ghost norm (Li et al. 2022): ‖∇W ℓ_i‖² = Σ_{s,t} (a_is·a_it)(g_is·g_it), cost ~T²(d+p)
  per example for T positions, d inputs, p outputs, nothing of size p·d kept;
- per-sample gradient: ∇W ℓ_i = Σ_t g_itᵀ a_it materialised, cost ~T·p·d and
  memory B·p·d;
- clipped sum: Σ_i c_i ∇W ℓ_i = Σ_i Σ_t (c_i g_it)ᵀ a_it, the layer's ordinary
  weight gradient with each example's output gradient scaled by c_i: no second
  backward pass through the model.

Mixed ghost clipping (Bu et al., NeurIPS 2022) picks, per layer, the cheaper of
the first two from the shapes. The costs counted here (``Rule.costs``) are
multiply-adds per example, with each number of a materialised per-sample
gradient counted ``MEMORY_WEIGHT`` times: it is written, read for the norm and
read again for the clipped sum, at memory speed rather than matrix-multiply
speed. For a Linear layer that is ghost when T²(d+p) ≤ 64·p·d (at a tie the ghost norm,
which keeps no per-example gradient).

One file per family of operations (``linear``, ``bilinear``, ``conv``, ``embedding``,
``norm``, ``prelu``, ``elementwise``, ``broadcast``), each registering its rules with
``register`` (``elementwise``'s and ``broadcast``'s are given to operations by
``dpclip.clipping.functions``, not to module types);
``fallback`` registers Opacus's per-sample rules for the layer types none of them
claims. A new family is a new
file that defines its ``Rule`` subclass and registers it, and one import below.
"""

# each family registers its rules when imported
from dpclip.clipping.rules import (  # noqa: F401
    bilinear,
    broadcast,
    conv,
    elementwise,
    embedding,
    embedding_bag,
    fallback,
    linear,
    norm,
    prelu,
)
from dpclip.clipping.rules.base import MEMORY_WEIGHT, STRATEGIES, Rule, Target, register, rule_for
from dpclip.clipping.rules.linear import LINEAR

__all__ = ["LINEAR", "MEMORY_WEIGHT", "STRATEGIES", "Rule", "Target", "register", "rule_for"]
