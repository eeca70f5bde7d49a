"""accounting: torch-free privacy accounting for dpclip (and anyone else).

Events describe what a training step did; a ``Ledger`` records them; an
accountant ("prv", "rdp", "pld", or the "gdp" approximation) turns the ledger
into (ε, δ). ``calibrate_noise`` and ``max_steps`` invert it; the
``gaussian`` module calibrates a single Gaussian release.
"""

from accounting.accountant import Accountant, UnsupportedEventError
from accounting.calibrate import calibrate_noise, epsilon_for, max_steps
from accounting.events import (
    CountedShuffledGaussian,
    Event,
    IndependentPoissonGaussian,
    PoissonGaussian,
    ShuffledGaussian,
)
from accounting.gaussian import (
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
    gaussian_delta,
    gaussian_epsilon,
)
from accounting.gdp import GdpAccountant
from accounting.ledger import Ledger, SamplingAssumptionWarning
from accounting.pld import PldAccountant
from accounting.prv import PrvAccountant
from accounting.rdp import RdpAccountant
from accounting.registry import ACCOUNTANTS, accountants_supporting, make_accountant

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "CountedShuffledGaussian",
    "Event",
    "GdpAccountant",
    "IndependentPoissonGaussian",
    "Ledger",
    "PldAccountant",
    "PoissonGaussian",
    "PrvAccountant",
    "RdpAccountant",
    "SamplingAssumptionWarning",
    "ShuffledGaussian",
    "UnsupportedEventError",
    "accountants_supporting",
    "analytic_gaussian_sigma",
    "calibrate_noise",
    "classic_gaussian_sigma",
    "epsilon_for",
    "gaussian_delta",
    "gaussian_epsilon",
    "make_accountant",
    "max_steps",
]
