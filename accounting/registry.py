"""Accountants by name, as users pick them (``method="prv"``)."""

from __future__ import annotations

from accounting.accountant import Accountant
from accounting.gdp import GdpAccountant
from accounting.pld import PldAccountant
from accounting.prv import PrvAccountant
from accounting.rdp import RdpAccountant

__all__ = ["ACCOUNTANTS", "make_accountant", "accountants_supporting"]

ACCOUNTANTS: dict[str, type[Accountant]] = {
    cls.name: cls for cls in (RdpAccountant, PrvAccountant, PldAccountant, GdpAccountant)
}


def make_accountant(method: str) -> Accountant:
    """A fresh accountant for ``method`` ("rdp" | "prv" | "pld" | "gdp")."""
    if method not in ACCOUNTANTS:
        raise ValueError(f"Expected method={method!r} to be one of {sorted(ACCOUNTANTS)}")
    return ACCOUNTANTS[method]()


def accountants_supporting(event: object) -> list[str]:
    """Names of the accountants that account ``event`` exactly."""
    return [name for name, cls in ACCOUNTANTS.items() if isinstance(event, cls.supported)]
