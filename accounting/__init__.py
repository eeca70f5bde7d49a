"""accounting: torch-free privacy accounting for dpclip (and anyone else).

Events describe what a training step did; a ``Ledger`` records them; an
accountant ("rdp", "prv", "pld") turns the ledger into (ε, δ).
"""

from accounting.accountant import Accountant, UnsupportedEventError
from accounting.calibrate import calibrate_noise, epsilon_for
from accounting.events import IndependentPoissonGaussian, PoissonGaussian
from accounting.ledger import Ledger
from accounting.pld import PldAccountant
from accounting.prv import PrvAccountant
from accounting.rdp import RdpAccountant
from accounting.registry import ACCOUNTANTS, make_accountant

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "IndependentPoissonGaussian",
    "Ledger",
    "PldAccountant",
    "PoissonGaussian",
    "PrvAccountant",
    "RdpAccountant",
    "UnsupportedEventError",
    "calibrate_noise",
    "epsilon_for",
    "make_accountant",
]
