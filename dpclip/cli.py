"""The ``dpclip`` command line (also ``python -m dpclip``).

Every command takes ``--json`` and then prints one JSON object. Errors (a
missing file, a bad number, an impossible target, a malformed state file, a
reader that closed the pipe) exit with status 2 and one line on stderr, no
traceback. An accountant that cannot evaluate a setting at bounded cost is
shown as n/a with its reason (null in JSON), next to those that can.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import accounting
from dpclip.report import json_safe

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpclip", description="DP-SGD privacy accounting and reports.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    methods = sorted(accounting.ACCOUNTANTS)

    rep = sub.add_parser("report", help="the privacy report of a run (saved report or engine checkpoint)")
    rep.add_argument("run", help="a report JSON (report.to_json()), an engine state JSON "
                     "(engine.state_dict()), or a torch checkpoint holding one under 'privacy_engine'")
    rep.add_argument("--delta", type=float, help="δ for an engine checkpoint (default: its budget's δ)")
    fmt = rep.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the report's JSON")
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table")
    rep.add_argument("--plot", metavar="OUT.png", help="also write ε versus step as a PNG")

    cal = sub.add_parser("calibrate", help="noise multiplier σ for a target (ε, δ)")
    cal.add_argument("--target-epsilon", type=float, required=True)
    cal.add_argument("--delta", type=float, required=True)
    rate = cal.add_argument_group("sample rate: --sample-rate, or --dataset-size with --batch-size "
                                  "and --accumulation-steps")
    rate.add_argument("--sample-rate", type=float, help="q = L/N per optimizer step")
    rate.add_argument("--dataset-size", type=int, help="N")
    rate.add_argument("--batch-size", type=int, help="B, the micro-batch")
    rate.add_argument("--accumulation-steps", type=int, default=None, help="k (default 1): L = k·B")
    length = cal.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data")
    cal.add_argument("--accountant", choices=methods, default="prv", help="calibrate with (default prv)")
    cal.add_argument("--json", action="store_true", help="print one JSON object")

    bud = sub.add_parser("budget", help="how many optimizer steps an (ε, δ) budget allows")
    bud.add_argument("--epsilon", type=float, required=True, help="the budget ε")
    bud.add_argument("--delta", type=float, required=True)
    bud.add_argument("--sample-rate", type=float, required=True, help="q = L/N per optimizer step")
    bud.add_argument("--noise-multiplier", type=float, required=True, help="σ = noise std / C")
    bud.add_argument("--accountant", choices=methods, default="prv")
    bud.add_argument("--json", action="store_true", help="print one JSON object")

    cmp = sub.add_parser("compare", help="dpclip vs Opacus BatchMemoryManager on the same model and batches")
    cmp.add_argument("--model", required=True,
                     help="mlp, cnn, transformer (built in), tiny, or module:function returning a "
                          "dpclip.workloads.Workload")
    cmp.add_argument("--logical-batch", type=int, required=True, help="L, expected examples per step")
    cmp.add_argument("--micro-batch", type=int, required=True, help="B, most examples per forward/backward")
    cmp.add_argument("--steps", type=int, required=True, help="timed optimizer steps")
    cmp.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    cmp.add_argument("--repeats", type=int, default=1, help="runs per method, interleaved (default 1)")
    cmp.add_argument("--noise-multiplier", type=float, default=1.0)
    cmp.add_argument("--max-grad-norm", type=float, default=1.0)
    cmp.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    cmp.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                     help="step time as wall time or as the process's CPU time (default wall)")
    cmp.add_argument("--reference", choices=("torch.func", "per-example", "none"), default="torch.func",
                     help="per-sample gradients of the correctness check: torch.func (vmap), "
                          "per-example (one example at a time: models vmap cannot run) or none")
    cmp.add_argument(
        "--methods",
        help="comma-separated subset of the methods (default: all but dpclip-low, dpclip with memory='low')",
    )
    cmp.add_argument("--json", nargs="?", const="-", metavar="OUT.json",
                     help="write the result as JSON to OUT.json (or print it)")
    cmp.add_argument("--markdown", action="store_true", help="print a Markdown table")
    cmp.add_argument("--plot", metavar="OUT.png", help="also write time and memory bars as a PNG")

    eps = sub.add_parser("epsilon", help="ε after some Poisson-sampled Gaussian steps")
    eps.add_argument("--noise-multiplier", type=float, required=True, help="σ = noise std / C")
    eps.add_argument("--delta", type=float, required=True)
    eps.add_argument("--sample-rate", type=float, required=True, help="q = L/N per step")
    eps.add_argument("--steps", type=int, required=True, help="optimizer steps")
    eps.add_argument("--json", action="store_true", help="print one JSON object")

    aud = sub.add_parser("audit", help="an empirical lower bound on ε from canaries in one training run")
    aud.add_argument("--model", required=True,
                     help="built-in workload (mlp, cnn, transformer, tiny) or module:function returning a Workload")
    aud.add_argument("--noise-multiplier", type=float, required=True, help="σ = noise std / C")
    aud.add_argument("--logical-batch", type=int, required=True,
                     help="L, expected examples per step, out of the data plus the included canaries")
    aud.add_argument("--steps", type=int, required=True, help="optimizer steps")
    aud.add_argument("--canaries", type=int, default=10000,
                     help="m >= 100 canaries, each included with probability 1/2 (default 10000)")
    aud.add_argument("--micro-batch", type=int, help="B, most examples per forward/backward (default min(L, 256))")
    aud.add_argument("--max-grad-norm", type=float, default=1.0, help="C (default 1)")
    aud.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    aud.add_argument("--confidence", type=float, default=0.95, help="of the lower bounds (default 0.95)")
    aud.add_argument("--seed", type=int, default=0)
    aud.add_argument("--accountant", choices=methods, default="prv", help="for the claimed ε (default prv)")
    aud.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        out, text = _COMMANDS[args.command](args)
    except (ValueError, OSError, ImportError, ArithmeticError, MemoryError, KeyError, TypeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        parser.exit(2, f"dpclip {args.command}: error: {message}\n")
    # compare --json OUT.json writes the file and prints the table; bare --json prints JSON.
    as_json = args.json == "-" if args.command == "compare" else bool(args.json)
    try:
        print(json.dumps(json_safe(out)) if as_json else text, end="\n" if as_json else "")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (e.g. `| head`) left: point stdout at devnull so that the flush at exit
        # does not raise again, and say once that the output was cut short.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        parser.exit(2, f"dpclip {args.command}: error: output cut short: the reader closed the pipe\n")
    return 0


def _report(args: argparse.Namespace) -> tuple[Any, str]:
    from dpclip.report import REPORT_SCHEMA, PrivacyReport, make_report

    data = _load_run(Path(args.run))
    if data.get("schema") == REPORT_SCHEMA:
        if args.delta is not None:
            raise ValueError(f"{args.run} is a saved report at its own delta={data.get('delta')}; "
                             "--delta applies to engine checkpoints")
        # Whatever the file says about itself, nothing here checked it against a run.
        report = dataclasses.replace(PrivacyReport.from_dict(data), checked=False)
    else:
        from dpclip.engine import ENGINE_SCHEMA, READABLE_ENGINE_SCHEMAS

        if data.get("schema") not in READABLE_ENGINE_SCHEMAS:
            keys = ", ".join(repr(k) for k in list(data)[:12])
            raise ValueError(
                f"{args.run} is neither a {REPORT_SCHEMA} report nor a {ENGINE_SCHEMA} state: dpclip "
                "report reads a saved report, engine.state_dict(), or a checkpoint dict holding "
                f"one engine state under any key (this one's keys: {keys})"
            )
        delta = args.delta
        if delta is None:
            if not isinstance(data.get("budget"), dict) or "delta" not in data["budget"]:
                raise ValueError("pass --delta: this checkpoint has no budget whose δ could be used")
            delta = data["budget"]["delta"]
        report = make_report(data, delta, checked=False)
        _check_state_consistency(data)
    if args.plot:
        report.plot(args.plot)
    if args.json:
        return json.loads(report.to_json()), ""
    return None, report.to_markdown() if args.markdown else str(report)


def _check_state_consistency(data: dict[str, Any]) -> None:
    """A state file's ledger must hold only steps its own plan records (types and ranges
    were checked by ``make_report``): a ledger claiming a lower rate is refused."""
    import accounting
    from dpclip.engine import LogicalBatchPlan, check_ledger_against_plan
    from dpclip.sampling import Sampling

    names = {f.name for f in dataclasses.fields(LogicalBatchPlan)}
    plan = {k: v for k, v in data["plan"].items() if k in names}
    if not isinstance(plan.get("index_set", "all"), str):
        raise ValueError("Expected engine state plan index_set to be a string")
    plan["sampling"] = Sampling(plan["sampling"])
    ledger = accounting.Ledger()
    ledger.load_state_dict(data["ledger"])
    check_ledger_against_plan(ledger, LogicalBatchPlan(**plan), data["noise_multiplier"])


def _load_run(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        data = json.loads(path.read_text())
    except RecursionError:
        raise ValueError(f"{path} nests its JSON too deeply to be a report or an engine state") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        import torch  # a torch checkpoint; weights_only: nothing in it is executed

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is one clear line
            raise ValueError(f"{path} is neither JSON nor a torch checkpoint ({type(err).__name__})") from None
        if isinstance(data, dict) and "privacy_engine" in data:
            data = data["privacy_engine"]
        elif isinstance(data, dict) and isinstance(data.get("callbacks"), dict):
            # a Lightning checkpoint: the engine state is the DPCallback's
            states = [
                v["engine"] for k, v in data["callbacks"].items()
                if str(k).startswith("DPCallback") and isinstance(v, dict) and isinstance(v.get("engine"), dict)
            ]
            if len(states) == 1:
                data = states[0]
        elif isinstance(data, dict) and "schema" not in data:
            # a checkpoint dict of the user's own: the engine state under a key of their choosing
            from dpclip.engine import READABLE_ENGINE_SCHEMAS

            states = [v for v in data.values() if isinstance(v, dict) and v.get("schema") in READABLE_ENGINE_SCHEMAS]
            if len(states) == 1:
                data = states[0]
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a report or an engine state")
    return data


def _calibrate(args: argparse.Namespace) -> tuple[Any, str]:
    if args.sample_rate is not None:
        if args.dataset_size is not None or args.batch_size is not None or args.accumulation_steps is not None:
            raise ValueError("pass --sample-rate or --dataset-size/--batch-size/--accumulation-steps, not both")
        q = args.sample_rate
        steps = args.steps if args.epochs is None else accounting.calibrate.steps_for_epochs(args.epochs, q)
    else:
        if args.dataset_size is None or args.batch_size is None:
            raise ValueError("pass --sample-rate, or --dataset-size and --batch-size (and --accumulation-steps)")
        n, b = args.dataset_size, args.batch_size
        k = 1 if args.accumulation_steps is None else args.accumulation_steps
        for flag, value in (("--dataset-size", n), ("--batch-size", b), ("--accumulation-steps", k)):
            if value < 1:
                raise ValueError(f"Expected {flag}={value} >= 1")
        if k * b > n:
            raise ValueError(f"need k·B = {k * b} <= N = {n} (--accumulation-steps × --batch-size <= --dataset-size)")
        if args.epochs is not None and not (0 < args.epochs < math.inf):
            raise ValueError(f"Expected --epochs={args.epochs} to be finite and > 0")
        q = k * b / n
        # As dpclip's Poisson sampler: N // L optimizer steps per epoch.
        steps = args.steps if args.epochs is None else max(1, math.ceil(args.epochs * (n // (k * b))))
    if steps is None or steps < 1:
        raise ValueError(f"need --steps >= 1, got {steps}")
    sigma = accounting.calibrate_noise(args.target_epsilon, args.delta, q, steps, method=args.accountant)
    epsilons, unavailable = _epsilons(sigma, args.delta, q, steps)
    out = {"noise_multiplier": sigma, "sample_rate": q, "steps": steps, "accountant": args.accountant,
           "epsilon": epsilons, "unavailable": unavailable}
    text = f"noise_multiplier {sigma:.6g}  (sample_rate {q:.6g}, steps {steps}, calibrated with {args.accountant})\n"
    return out, text + _table(epsilons, unavailable)


def _budget(args: argparse.Namespace) -> tuple[Any, str]:
    steps = accounting.max_steps(args.epsilon, args.delta, args.sample_rate, args.noise_multiplier, args.accountant)

    def eps(t: int) -> float:
        return accounting.epsilon_for(args.noise_multiplier, delta=args.delta, sample_rate=args.sample_rate,
                                      steps=t, method=args.accountant)

    out = {"steps": steps, "epsilon": eps(steps) if steps else 0.0, "accountant": args.accountant}
    if steps:
        return out, f"steps {steps}  (epsilon {out['epsilon']:.6g} at delta {args.delta:g}, {args.accountant})\n"
    # No step fits: say what one step costs rather than the ε of doing nothing.
    out["one_step_epsilon"] = first = eps(1)
    why = ": noise_multiplier 0 adds no noise, so no privacy" if args.noise_multiplier == 0 else ""
    return out, (f"steps 0  (a single step already spends epsilon {first:.6g} > {args.epsilon:g} at delta "
                 f"{args.delta:g}, {args.accountant}{why})\n")


def _epsilon(args: argparse.Namespace) -> tuple[Any, str]:
    epsilons, unavailable = _epsilons(args.noise_multiplier, args.delta, args.sample_rate, args.steps)
    return {"epsilon": epsilons, "unavailable": unavailable}, _table(epsilons, unavailable)


def _epsilons(sigma: float, delta: float, q: float, steps: int) -> tuple[dict[str, float | None], dict[str, str]]:
    """ε by every accountant, None where one cannot evaluate the setting (its reason in the second dict).

    An input no accountant takes (a bad δ, q or σ) raises at once: one error, not four.
    """
    epsilons: dict[str, float | None] = {}
    unavailable: dict[str, str] = {}
    for m in sorted(accounting.ACCOUNTANTS):
        try:
            epsilons[m] = accounting.epsilon_for(sigma, delta=delta, sample_rate=q, steps=steps, method=m)
        except accounting.accountant.OutOfRangeError as err:
            epsilons[m], unavailable[m] = None, str(err).splitlines()[0]
    if not unavailable.keys() < set(epsilons):
        raise ValueError(next(iter(unavailable.values())))
    return epsilons, unavailable


def _table(epsilons: dict[str, float | None], unavailable: dict[str, str]) -> str:
    def value(method: str) -> str:
        if epsilons[method] is None:
            return f"n/a ({unavailable[method]})"
        approximate = accounting.ACCOUNTANTS[method].approximate
        return f"{epsilons[method]:.6g}" + ("  (approximation, not a bound)" if approximate else "")

    return "".join(f"epsilon[{m}] {value(m)}\n" for m in epsilons)


def _compare(args: argparse.Namespace) -> tuple[Any, str]:
    from dpclip import compare

    methods = compare.DEFAULT_METHODS if args.methods is None else tuple(m.strip() for m in args.methods.split(","))
    result = compare.run(
        args.model, logical_batch=args.logical_batch, micro_batch=args.micro_batch, steps=args.steps,
        noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm, methods=methods,
        warmup=args.warmup, repeats=args.repeats, threads=args.threads, clock=args.clock,
        reference=None if args.reference == "none" else args.reference,
    )
    if args.plot:
        result.plot(args.plot)
    if args.json not in (None, "-"):
        Path(args.json).write_text(result.to_json())
    return json.loads(result.to_json()), result.to_markdown()


def _audit(args: argparse.Namespace) -> tuple[Any, str]:
    from dpclip import audit

    result = audit.run(
        args.model, noise_multiplier=args.noise_multiplier, logical_batch=args.logical_batch, steps=args.steps,
        canaries=args.canaries, micro_batch=args.micro_batch, max_grad_norm=args.max_grad_norm,
        delta=args.delta, confidence=args.confidence, seed=args.seed, accountant=args.accountant,
    )
    return result.to_dict(), str(result)


_COMMANDS = {"report": _report, "calibrate": _calibrate, "budget": _budget, "compare": _compare,
             "epsilon": _epsilon, "audit": _audit}


if __name__ == "__main__":
    sys.exit(main())
