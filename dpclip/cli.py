"""The ``dpclip`` command line (also ``python -m dpclip``)."""

from __future__ import annotations

import argparse
import json
import sys

import accounting

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpclip", description="DP-SGD privacy accounting from the command line."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    methods = sorted(accounting.ACCOUNTANTS)

    cal = sub.add_parser(
        "calibrate", help="noise multiplier for a target (ε, δ) over Poisson-sampled steps"
    )
    cal.add_argument("--target-epsilon", type=float, required=True)
    cal.add_argument("--delta", type=float, required=True)
    cal.add_argument("--sample-rate", type=float, required=True, help="q = L/N per step")
    cal.add_argument("--steps", type=int, required=True, help="optimizer steps")
    cal.add_argument("--accountant", choices=methods, default="prv")
    cal.add_argument("--json", action="store_true", help="print one JSON object")

    eps = sub.add_parser("epsilon", help="ε after some Poisson-sampled Gaussian steps")
    eps.add_argument("--noise-multiplier", type=float, required=True, help="σ = noise std / C")
    eps.add_argument("--delta", type=float, required=True)
    eps.add_argument("--sample-rate", type=float, required=True, help="q = L/N per step")
    eps.add_argument("--steps", type=int, required=True, help="optimizer steps")
    eps.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "calibrate":
            sigma = accounting.calibrate_noise(
                args.target_epsilon, args.delta, args.sample_rate, args.steps, method=args.accountant
            )
            epsilons = _epsilons(sigma, args)
            out = {"noise_multiplier": sigma, "epsilon": epsilons}
            text = f"noise_multiplier {sigma:.6g}\n" + _table(epsilons)
        else:
            epsilons = _epsilons(args.noise_multiplier, args)
            out = {"epsilon": epsilons}
            text = _table(epsilons)
    except ValueError as err:
        parser.exit(2, f"dpclip {args.command}: error: {err}\n")
    print(json.dumps(out) if args.json else text, end="" if not args.json else "\n")
    return 0


def _epsilons(sigma: float, args: argparse.Namespace) -> dict[str, float]:
    return {
        m: accounting.epsilon_for(
            sigma, delta=args.delta, sample_rate=args.sample_rate, steps=args.steps, method=m
        )
        for m in sorted(accounting.ACCOUNTANTS)
    }


def _table(epsilons: dict[str, float]) -> str:
    def label(method: str) -> str:
        return "  (approximation, not a bound)" if accounting.ACCOUNTANTS[method].approximate else ""

    return "".join(f"epsilon[{m}] {e:.6g}{label(m)}\n" for m, e in epsilons.items())


if __name__ == "__main__":
    sys.exit(main())
