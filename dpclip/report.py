"""PrivacyReport: what privacy a training run got, and why, in forms to read or archive.

Built from an engine's state (``PrivacyEngine.report`` or ``dpclip report
CHECKPOINT``); every ε in it is ``accounting`` run on the run's own ledger.
A report made from a file says so: its ledger was not checked against a
training run (``checked`` is False), and every format prints that.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
from dataclasses import dataclass, field
from typing import Any

import accounting
from accounting import Ledger
from accounting.events import validate_noise_multiplier, validate_sample_rate

__all__ = ["FOREIGN_BATCHES", "PrivacyReport", "REPORT_SCHEMA", "json_safe", "make_report", "package_versions"]

#: Version tag of the JSON layout; a new layout gets a new tag.
REPORT_SCHEMA = "dpclip.report/1"
#: Accountants reported side by side, in this order.
METHODS = ("prv", "pld", "rdp", "gdp")
#: ε at or above this fraction of max_epsilon is "nearly exceeded".
NEARLY_EXCEEDED = 0.9
#: Below this σ accountant numerics are least reliable.
SMALL_NOISE_MULTIPLIER = 0.5
#: Steps trained on batches dpclip's loader did not draw (the engine's ``foreign_steps``).
FOREIGN_BATCHES = (
    "micro-batches that the data loader make_private returned did not hand out (a loop over "
    "another loader, or batches made by hand) were trained on, and each such step recorded as "
    "drawn by that loader's sampling, which did not draw them"
)


@dataclass(frozen=True)
class PrivacyReport:
    """The privacy of one training run at one δ.

    Attributes:
        epsilon: ε by accountant ("prv", "pld", "rdp", "gdp"); None where the
            accountant cannot account the run's events exactly.
        approximate: accountants in ``epsilon`` whose figure is an estimate,
            not a bound ("gdp").
        epsilon_no_amplification: for shuffled batches, the sound bound (PLD,
            one Gaussian mechanism per epoch); None otherwise.
        delta: δ.
        accountant: the engine's accountant (the one the budget uses).
        steps: optimizer steps taken (= ledger events).
        epochs: steps / steps per epoch (passes over the loader).
        dataset_size: N.
        sample_rate: q of one Poisson draw (see ``LogicalBatchPlan``).
        logical_batch_size: L, expected examples per step.
        micro_batch_size: B (expected B for an Opacus DPDataLoader; the largest
            micro-batch M with max_physical_batch_size).
        accumulation_steps: k, or None when it varies (max_physical_batch_size).
        noise_multiplier: σ, noise std / max_grad_norm.
        max_grad_norm: C, per-example L2 clipping bound.
        sampling: "poisson", "independent-poisson" or "shuffled".
        secure_mode: whether noise came from a cryptographically secure source.
        max_epsilon: the budget cap, or None.
        steps_remaining: optimizer steps the cap still allows, or None.
        versions: dpclip, opacus and torch versions that produced the report.
        warnings: every condition that qualifies the numbers above.
        ledger: the run's ledger state (``accounting.Ledger.state_dict``).
        checked: True for the report of a live engine (its ledger is the one the
            run's steps recorded); False for one read from a file (an engine
            state or a saved report), whose figures nothing checked against a
            training run. A saved report without the field reads as False.
        processes: W, the processes that trained together (``torch.distributed``;
            L = W·k·B); 1 for one process, also for a report saved without the field.
    """

    epsilon: dict[str, float | None]
    approximate: tuple[str, ...]
    epsilon_no_amplification: float | None
    delta: float
    accountant: str
    steps: int
    epochs: float
    dataset_size: int
    sample_rate: float
    logical_batch_size: float
    micro_batch_size: float
    accumulation_steps: int | None
    noise_multiplier: float
    max_grad_norm: float
    sampling: str
    secure_mode: bool
    max_epsilon: float | None
    steps_remaining: int | None
    versions: dict[str, str]
    warnings: tuple[str, ...]
    ledger: dict[str, Any] = field(repr=False)
    checked: bool = False
    processes: int = 1

    # ---- formats -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``"schema": "dpclip.report/1"`` first."""
        out: dict[str, Any] = {"schema": REPORT_SCHEMA}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """``to_dict`` as JSON; ε = ∞ (a run with a σ = 0 step) is written as the string "inf"."""
        return json.dumps(json_safe(self.to_dict()), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrivacyReport":
        """Inverse of ``to_dict``; refuses another schema or a field of the wrong type or range.

        A report written before ``checked`` existed reads as unchecked, one before
        ``processes`` as one process.
        """
        if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"Expected a report with schema {REPORT_SCHEMA!r}, got {got!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - data.keys() - {"checked", "processes"}
        if missing:
            raise ValueError(f"report is missing fields: {sorted(missing)}")
        unknown = data.keys() - names - {"schema"}
        if unknown:
            raise ValueError(f"report has unknown fields: {sorted(map(str, unknown))}")
        values = {k: _decode(data[k]) for k in names if k in data}
        for name, value in values.items():
            _REPORT_FIELDS[name](f"report field {name}", value)
        Ledger().load_state_dict(values["ledger"])  # validates it
        values["approximate"] = tuple(values["approximate"])
        values["warnings"] = tuple(values["warnings"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyReport":
        """Inverse of ``to_json``."""
        return cls.from_dict(json.loads(text))

    def _rows(self) -> list[tuple[str, str]]:
        rows = [("checked against the run", "yes (the live engine's own ledger)" if self.checked else
                 "NO: UNCHECKED, figures read from a file, not checked against a training run")]
        for method in METHODS:
            eps = self.epsilon.get(method)
            note = "  (approximation, not a bound)" if method in self.approximate else ""
            if eps is None:
                value = "n/a (cannot account these steps exactly)"
            else:
                value = f"{eps:.4f}{note}"
            mark = " *" if method == self.accountant else ""
            rows.append((f"epsilon [{method}]{mark}", value))
        if self.epsilon_no_amplification is not None:
            rows.append(("epsilon, no amplification", f"{self.epsilon_no_amplification:.4f}  (pld)"))
        rows += [
            ("delta", f"{self.delta:g}"),
            ("optimizer steps", str(self.steps)),
            ("epochs", f"{self.epochs:.2f}"),
            ("dataset size N", str(self.dataset_size)),
            ("sample rate q", f"{self.sample_rate:.6g}"),
            ("logical batch L", f"{self.logical_batch_size:g}"),
            *([("processes W", str(self.processes))] if self.processes > 1 else []),
            ("micro-batch B", f"{self.micro_batch_size:g}" + (" per process" if self.processes > 1 else "")),
            ("accumulation steps k", "varies" if self.accumulation_steps is None else str(self.accumulation_steps)),
            ("noise multiplier sigma", f"{self.noise_multiplier:.6g}"),
            ("max grad norm C", f"{self.max_grad_norm:g}"),
            ("sampling", self.sampling),
            ("secure mode", str(self.secure_mode)),
        ]
        if self.max_epsilon is not None:
            rows.append(("budget max_epsilon", f"{self.max_epsilon:g}"))
            rows.append(("steps remaining", str(self.steps_remaining)))
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in self.versions.items())))
        return rows

    def __str__(self) -> str:
        rows = self._rows()
        width = max(len(k) for k, _ in rows)
        lines = ["dpclip privacy report", "=" * (width + 40)]
        lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
        lines.append(f"{'':{width}}  * the engine's accountant")
        lines += [f"warning: {w}" for w in self.warnings] or ["warnings: none"]
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        """A two-column Markdown table, then the warnings as a list."""
        lines = ["| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self._rows()]
        lines.append("")
        lines += [f"- **warning:** {w}" for w in self.warnings] or ["No warnings."]
        return "\n".join(lines) + "\n"

    def plot(self, path: str, points: int = 30) -> Any:
        """Write a PNG of ε versus step, one curve per accountant, and the budget line.

        Returns the matplotlib ``Figure`` (headless: the Agg backend).
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("plot() needs matplotlib: pip install 'dpclip[report]'") from None
        ledger = Ledger()
        ledger.load_state_dict(self.ledger)
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.add_subplot()
        for method in METHODS:
            if self.epsilon.get(method) is None or ledger.steps == 0:
                continue
            curve = _quiet(lambda: ledger.epsilon_curve(self.delta, method, points=points))
            approx = method in self.approximate
            ax.plot(
                [t for t, _ in curve],
                [e for _, e in curve],
                label=f"{method} (approximation)" if approx else method,
                linestyle=":" if approx else "-",
            )
        if self.max_epsilon is not None:
            ax.axhline(self.max_epsilon, color="red", linestyle="--", label=f"budget ε = {self.max_epsilon:g}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"ε at δ = {self.delta:g}")
        ax.set_title(f"privacy spent (σ = {self.noise_multiplier:.3g}, q = {self.sample_rate:.3g}, {self.sampling})")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.savefig(path, format="png", dpi=100)
        return fig


def make_report(state: dict[str, Any], delta: float, *, checked: bool = True) -> PrivacyReport:
    """The report for an engine state (``PrivacyEngine.state_dict()``) at ``delta``.

    Args:
        state: the engine state; every field the report uses is type- and range-checked.
        delta: δ, 0 < δ < 1.
        checked: True (the default, what ``PrivacyEngine.report`` passes) when
            ``state`` is the live engine's own; False for a state read from a
            file, which the report then calls unchecked.
    """
    delta = accounting.accountant.validate_delta(delta)
    if not isinstance(checked, bool):
        raise ValueError(f"Expected checked={checked!r} to be a bool")
    _validate_state(state)
    plan, ledger = state["plan"], Ledger()
    ledger.load_state_dict(state["ledger"])
    epsilon: dict[str, float | None] = {}
    failed: list[str] = []
    for method in METHODS:
        try:
            epsilon[method] = _quiet(lambda: ledger.epsilon(delta, method))
        except accounting.UnsupportedEventError:
            epsilon[method] = None
        except (ValueError, ArithmeticError) as err:  # numerics out of range, e.g. tiny σ
            epsilon[method] = None
            failed.append(f"accountant {method!r} could not compute ε: {str(err).splitlines()[0]}")
    shuffled = plan["sampling"] == "shuffled"
    no_amp = ledger.epsilon(delta, "pld", no_amplification=True) if shuffled and ledger.steps else None
    budget = state.get("budget")
    n, sigma = plan["dataset_size"], state["noise_multiplier"]
    main_eps = epsilon.get(state["accountant"])
    warnings: list[str] = []
    if shuffled:
        warnings.append(
            "sampling is shuffled fixed-size batches, not Poisson: every ε above assumes Poisson "
            "sampling at q (no amplification guarantee applies to shuffling); the sound bound is "
            "'epsilon, no amplification'"
        )
    if delta >= 1.0 / n:
        warnings.append(
            f"delta={delta:g} >= 1/N = {1.0 / n:.3g}: releasing one random example outright meets "
            "that δ; choose δ well below 1/N"
        )
    if budget is not None and main_eps is not None:
        if main_eps > budget["max_epsilon"]:
            warnings.append(f"budget exceeded: ε={main_eps:.4f} > max_epsilon={budget['max_epsilon']:g}")
        elif main_eps >= NEARLY_EXCEEDED * budget["max_epsilon"]:
            warnings.append(
                f"budget nearly exhausted: ε={main_eps:.4f} is {100 * main_eps / budget['max_epsilon']:.0f} % "
                f"of max_epsilon={budget['max_epsilon']:g} ({budget['steps_remaining']} steps remain)"
            )
    if sigma < SMALL_NOISE_MULTIPLIER:
        warnings.append(
            f"noise_multiplier={sigma:g} < {SMALL_NOISE_MULTIPLIER}: ε grows fast and the "
            "accountants' numerics are least reliable here"
        )
    k, micro, logical = plan["accumulation_steps"], plan["micro_batch_size"], plan["logical_batch_size"]
    parts = logical / plan.get("processes", 1) / micro
    if k is None and abs(parts - round(parts)) > 1e-9 * parts:
        warnings.append(
            f"k·B differs from the logical batch: L={logical:g} is not a multiple of "
            f"max_physical_batch_size={micro:g}, so micro-batches are uneven "
            f"(about {math.ceil(logical / micro)} per step)"
        )
    foreign = state.get("foreign_steps", 0)
    if foreign:
        warnings.append(
            f"{foreign} of {ledger.steps} steps: {FOREIGN_BATCHES}; every ε above assumes that "
            "sampling, so none is a bound for this run"
        )
    warnings += failed
    if main_eps is None:
        warnings.append(
            f"the engine's accountant {state['accountant']!r} cannot account these steps; see pld"
        )
    return PrivacyReport(
        epsilon=epsilon,
        approximate=tuple(m for m in METHODS if accounting.ACCOUNTANTS[m].approximate),
        epsilon_no_amplification=no_amp,
        delta=delta,
        accountant=state["accountant"],
        steps=ledger.steps,
        epochs=ledger.steps / plan["steps_per_epoch"] if plan["steps_per_epoch"] else 0.0,
        dataset_size=n,
        sample_rate=plan["sample_rate"],
        logical_batch_size=logical,
        micro_batch_size=micro,
        accumulation_steps=k,
        noise_multiplier=sigma,
        max_grad_norm=state["max_grad_norm"],
        sampling=plan["sampling"],
        secure_mode=state["secure_mode"],
        max_epsilon=None if budget is None else budget["max_epsilon"],
        steps_remaining=None if budget is None else budget["steps_remaining"],
        versions=package_versions(),
        warnings=tuple(warnings),
        ledger=state["ledger"],
        checked=checked,
        processes=plan.get("processes", 1),
    )


# ---- validation of what a file claims ----------------------------------------------


def _number(name: str, value: Any, minimum: float = 0.0, *, strict: bool = False, finite: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok and (finite and math.isinf(value) or value < minimum or strict and value == minimum):
        ok = False
    if not ok:
        bound = ">" if strict else ">="
        raise ValueError(f"Expected {name}={value!r} to be a {'finite ' if finite else ''}number {bound} {minimum:g}")


def _int(name: str, value: Any, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected {name}={value!r} to be an int >= {minimum}")


def _optional(check: Any) -> Any:
    return lambda name, value: None if value is None else check(name, value)


def _type(kind: type, what: str) -> Any:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, kind):
            raise ValueError(f"Expected {name} to be {what}, got {type(value).__name__}")
    return check


def _strings(name: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"Expected {name} to be a list of strings")


def _epsilons(name: str, value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"Expected {name} to map accountant names to ε")
    for method, eps in value.items():
        _optional(lambda n, v: _number(n, v, finite=False))(f"{name}[{method!r}]", eps)


def _versions(name: str, value: Any) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"Expected {name} to map package names to version strings")


def _in(choices: Any) -> Any:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"Expected {name}={value!r} to be one of {sorted(choices)}")
    return check


def _checked_by(validate: Any) -> Any:
    def check(name: str, value: Any) -> None:
        try:
            validate(value)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return check


_SAMPLINGS = ("poisson", "independent-poisson", "shuffled")
_REPORT_FIELDS: dict[str, Any] = {
    "epsilon": _epsilons,
    "approximate": _strings,
    "epsilon_no_amplification": _optional(lambda n, v: _number(n, v, finite=False)),
    "delta": _checked_by(accounting.accountant.validate_delta),
    "accountant": _type(str, "a string"),
    "steps": _int,
    "epochs": _number,
    "dataset_size": lambda n, v: _int(n, v, 1),
    "sample_rate": _checked_by(validate_sample_rate),
    "logical_batch_size": lambda n, v: _number(n, v, strict=True),
    "micro_batch_size": lambda n, v: _number(n, v, strict=True),
    "accumulation_steps": _optional(lambda n, v: _int(n, v, 1)),
    "noise_multiplier": _checked_by(validate_noise_multiplier),
    "max_grad_norm": lambda n, v: _number(n, v, strict=True),
    "sampling": _in(_SAMPLINGS),
    "secure_mode": _type(bool, "true or false"),
    "max_epsilon": _optional(lambda n, v: _number(n, v, strict=True)),
    "steps_remaining": _optional(_int),
    "versions": _versions,
    "warnings": _strings,
    "ledger": _type(dict, "a ledger state (an object)"),
    "checked": _type(bool, "true or false"),
    "processes": lambda n, v: _int(n, v, 1),
}
_STATE_FIELDS: dict[str, Any] = {
    "accountant": _in(accounting.ACCOUNTANTS),
    "secure_mode": _REPORT_FIELDS["secure_mode"],
    "noise_multiplier": _REPORT_FIELDS["noise_multiplier"],
    "max_grad_norm": _REPORT_FIELDS["max_grad_norm"],
    "plan": _type(dict, "an object"),
    "budget": _optional(_type(dict, "an object or null")),
    "ledger": _REPORT_FIELDS["ledger"],
}
_PLAN_FIELDS: dict[str, Any] = {
    "dataset_size": _REPORT_FIELDS["dataset_size"],
    "logical_batch_size": _REPORT_FIELDS["logical_batch_size"],
    "micro_batch_size": _REPORT_FIELDS["micro_batch_size"],
    "accumulation_steps": _REPORT_FIELDS["accumulation_steps"],
    "sample_rate": _REPORT_FIELDS["sample_rate"],
    "steps_per_epoch": _int,
    "sampling": _REPORT_FIELDS["sampling"],
}
_BUDGET_FIELDS: dict[str, Any] = {
    "max_epsilon": lambda n, v: _number(n, v, strict=True),
    "delta": _REPORT_FIELDS["delta"],
    "steps_remaining": _int,
}


def _validate_fields(what: str, data: dict[str, Any], checks: dict[str, Any]) -> None:
    missing = checks.keys() - data.keys()
    if missing:
        raise ValueError(f"{what} is missing {sorted(missing)}")
    for name, check in checks.items():
        check(f"{what} {name}", data[name])


def _validate_state(state: Any) -> None:
    """Raise ``ValueError`` naming the first field of an engine state the report cannot use."""
    if not isinstance(state, dict):
        raise ValueError(f"Expected an engine state (an object), got {type(state).__name__}")
    _validate_fields("engine state", state, _STATE_FIELDS)
    _validate_fields("engine state plan", state["plan"], _PLAN_FIELDS)
    if "processes" in state["plan"]:  # (states of one process may leave it out)
        _REPORT_FIELDS["processes"]("engine state plan processes", state["plan"]["processes"])
    if "foreign_steps" in state:  # (left out when 0)
        _int("engine state foreign_steps", state["foreign_steps"], 0)
    if state.get("budget") is not None:
        _validate_fields("engine state budget", state["budget"], _BUDGET_FIELDS)


def _quiet(fn: Any) -> Any:
    """Run ``fn`` without the shuffled-sampling warning: the report carries it itself."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", accounting.SamplingAssumptionWarning)
        return fn()


def package_versions() -> dict[str, str]:
    """Installed versions of dpclip, opacus and torch ("unknown" if not installed)."""
    out = {}
    for name in ("dpclip", "opacus", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def json_safe(value: Any) -> Any:
    """``value`` with every float ∞ replaced by the string "inf": JSON has no infinity,
    and ε = ∞ (a run with a σ = 0 step) must survive a round trip."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if value == "inf":
        return math.inf
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value
