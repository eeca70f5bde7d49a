"""Accounting benchmark: ε for 10⁵ identical steps per accountant, curve cost, and the
naive-versus-exact table for independent Poisson micro-batches.

Run: ``make bench-accounting`` (or ``.venv/bin/python benchmarks/accounting_bench.py``).
Targets (issue 5): 10⁵ steps under 1 s with RDP and under 5 s with PRV/PLD on 2 cores.
Prints Markdown tables; nothing is written to disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import accounting as acc

DELTA = 1e-5
SPEED_CONFIGS = [(0.01, 1.0), (1e-4, 0.5), (1e-3, 10.0), (0.004, 0.8)]
TARGET_S = {"rdp": 1.0, "pld": 5.0, "prv": 5.0, "gdp": 1.0}
MIXTURE_CONFIGS = [(0.01, 1.0, 1000, 4), (0.005, 0.8, 2000, 8), (0.02, 2.0, 500, 4), (0.001, 1.0, 10000, 16)]


def _timed(fn, repeats):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return value, statistics.median(times)


def speed(steps: int, repeats: int) -> bool:
    print(f"## ε for {steps:,} identical steps (δ = {DELTA}, median of {repeats})\n")
    print("| q | σ | method | ε | seconds | target | met |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for q, sigma in SPEED_CONFIGS:
        ledger = acc.Ledger()
        ledger.record(acc.PoissonGaussian(q, sigma), steps)
        for method in ("rdp", "pld", "prv", "gdp"):
            eps, seconds = _timed(lambda: ledger.epsilon(DELTA, method), repeats)
            met = seconds < TARGET_S[method]
            ok &= met
            label = " (approx.)" if acc.ACCOUNTANTS[method].approximate else ""
            print(f"| {q:g} | {sigma:g} | {method}{label} | {eps:.4f} | {seconds:.2f} | "
                  f"< {TARGET_S[method]:g} s | {'yes' if met else 'NO'} |")
    print()
    return ok


def curve(steps: int, points: int) -> None:
    print(f"## ε-versus-step curve, {points} points over {steps:,} steps (q = 0.01, σ = 1)\n")
    print("| method | curve seconds | one ε seconds | last point = ε |")
    print("|---|---|---|---|")
    ledger = acc.Ledger()
    ledger.record(acc.PoissonGaussian(0.01, 1.0), steps)
    for method in ("rdp", "pld", "prv", "gdp"):
        values, curve_s = _timed(lambda: ledger.epsilon_curve(DELTA, method, points=points), 1)
        eps, one_s = _timed(lambda: ledger.epsilon(DELTA, method), 1)
        print(f"| {method} | {curve_s:.2f} | {one_s:.2f} | {abs(values[-1][1] - eps) < 1e-9} |")
    print()


def mixture() -> None:
    print("## k independent Poisson micro-batches: naive (one step at k·q) vs exact mixture (PLD)\n")
    print("| q | σ | steps | k | naive ε | exact ε | exact above naive |")
    print("|---|---|---|---|---|---|---|")
    for q, sigma, steps, k in MIXTURE_CONFIGS:
        naive, exact = acc.Ledger(), acc.Ledger()
        naive.record(acc.PoissonGaussian(min(1.0, k * q), sigma), steps)
        exact.record(acc.IndependentPoissonGaussian(q, sigma, k), steps)
        e_naive, e_exact = naive.epsilon(DELTA, "pld"), exact.epsilon(DELTA, "pld")
        print(f"| {q:g} | {sigma:g} | {steps} | {k} | {e_naive:.3f} | {e_exact:.3f} | "
              f"{100 * (e_exact / e_naive - 1):+.1f} % |")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-mixture", action="store_true", help="skip the slow mixture table")
    args = parser.parse_args()
    print(f"# accounting benchmark — {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    ok = speed(args.steps, args.repeats)
    curve(10_000, 50)
    if not args.skip_mixture:
        mixture()
    print("all speed targets met" if ok else "SOME SPEED TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
